"""--fp8 (training/fp8.py) on CPU: the module filter, flag checks and refusals, and the trainer end to end with torch's
CPU FP8 matmuls (same numerics as on a GPU, no speed-up): the flat layout and FSDP2 with float8 all-gather, loss
close to the unquantized run, unchanged checkpoint names, exact resume, compiled blocks. GPU: test_fp8_gpu.py."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from train_helpers import base_args, checkpoint_weights, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.training import fp8, train_args

# The tiny model's linear layers have 16..512 features: let every aligned one run in FP8.
TINY_FP8 = ["--fp8", "tensorwise", "--fp8_min_features", "16"]


@pytest.mark.parametrize(
    ("fqn", "shape", "min_features", "kept"),
    [
        ("down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q", (1280, 1280), 1280, None),
        ("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj", (1280, 10240), 1280, None),
        ("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", (5120, 1280), 1280, None),
        ("mid_block.attentions.0.proj_in", (1280, 1280), 1280, None),
        ("down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_k", (2048, 1280), 1280, "77 text tokens"),
        ("down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_v", (2048, 1280), 1280, "77 text tokens"),
        ("time_embedding.linear_2", (1280, 1280), 1280, "one row per image"),
        ("add_embedding.linear_1", (2816, 1280), 1280, "one row per image"),
        ("down_blocks.2.resnets.0.time_emb_proj", (1280, 1280), 1280, "one row per image"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640), 1280, "below --fp8_min_features"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640), 640, None),
        ("x.proj", (1000, 1280), 16, "not multiples of 16"),
    ],
)
def test_the_filter_keeps_small_and_conditioning_layers_in_bf16(fqn, shape, min_features, kept):
    reason = fp8.keeps_high_precision(fqn, shape[0], shape[1], min_features)
    assert reason == kept if kept is None else kept in reason


def test_full_size_sdxl_conversion_keeps_names_and_parameters():
    """On the meta device: the 1280-channel stages' attention, feed-forward and projections become Float8Linear
    (60 transformer blocks x 8 + 6 stages x 2); every parameter keeps its name and object."""
    from diffusers import UNet2DConditionModel

    from sdxl_trainer.models import shapes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**shapes.UNET)
    before = dict(unet.named_parameters())
    report = fp8.convert(unet, "tensorwise", fp8.DEFAULT_MIN_FEATURES)
    converted = [n for n, m in unet.named_modules() if type(m).__name__ == "Float8Linear"]
    assert report["fp8_layers"] == len(converted) == 60 * 8 + 6 * 2
    assert not any(re.search(r"attn2\.to_[kv]|time_emb|embedding", n) for n in converted)
    assert all(unet.get_submodule(n).in_features >= 1280 for n in converted)
    after = dict(unet.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_a_model_without_qualifying_layers_is_refused():
    with pytest.raises(fp8.Fp8Error, match="--fp8_min_features 4096"):
        fp8.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), "tensorwise", 4096)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_token_rows_not_divisible_by_16_are_padded_without_changing_outputs_or_gradients(recipe, monkeypatch):
    """Batch 2 of a 26 x 38 bucket gives 1976 rows, which FP8 matmuls refuse on a GPU (measured on an H200): the
    layer pads to a multiple of 16 with zero rows, so its matmuls only ever see such row counts, and the rows kept
    and the weight gradient equal those of the same input padded by hand."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    fp8.convert(layer, recipe, 16)
    x = torch.randn(3, 5, 64, requires_grad=True)  # 15 rows
    seen_rows = []
    inner = fp8.torch.nn.functional.pad

    def spying_pad(t, pad, *args, **kwargs):
        out = inner(t, pad, *args, **kwargs)
        seen_rows.append(out.shape[0])
        return out

    monkeypatch.setattr(fp8.torch.nn.functional, "pad", spying_pad)
    out = layer(x)
    monkeypatch.undo()
    assert seen_rows == [16] and out.shape == (3, 5, 32)
    out.square().sum().backward()
    grad_weight, grad_x = layer[0].weight.grad.clone(), x.grad.clone()

    layer[0].weight.grad = None
    by_hand = torch.cat([x.detach().reshape(15, 64), torch.zeros(1, 64)]).requires_grad_()
    reference = layer(by_hand)[:15]
    reference.square().sum().backward()
    torch.testing.assert_close(out.detach().reshape(15, 32), reference.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad_weight, layer[0].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_x.reshape(15, 64), by_hand.grad[:15], rtol=0, atol=0)


def test_flag_checks_and_refusals(tmp_path, monkeypatch, caplog):
    def parse(*extra):
        return train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), *extra])

    assert parse().fp8 == "none" and parse().fp8_min_features == fp8.DEFAULT_MIN_FEATURES
    assert parse("--fp8", "rowwise").fp8 == "rowwise"
    with pytest.raises(SystemExit):
        parse("--fp8", "fp4")
    with pytest.raises(train_args.ArgsError, match="--fp8 with --mixed_precision fp16"):
        train_args.validate_args(train_args.build_parser().parse_args(
            ["--cached_dataset_dirs", str(tmp_path), "--fp8", "tensorwise", "--mixed_precision", "fp16"]))  # fmt: skip
    assert fp8.support_error(torch.device("cpu")) is None
    assert "not on mps" in fp8.support_error(torch.device("mps"))
    # A card without FP8 tensor cores (an A100, 8.0) is refused at start, naming the flag; an H100/H200 is not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(train_args.ArgsError, match=r"--fp8: NVIDIA A100 has compute capability 8\.0"):
        train_args.validate_args(
            train_args.build_parser().parse_args(["--cached_dataset_dirs", str(tmp_path), "--fp8", "tensorwise"])
        )
    with pytest.raises(fp8.Fp8Error, match="8.9 or newer"):
        fp8.Fp8Plan.for_run("rowwise", 1280, torch.device("cuda", 0), "none", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.support_error(torch.device("cuda", 0)) is None
    assert fp8.Fp8Plan.for_run("none", 1280, torch.device("cuda", 0), "none", True).recipe is None
    # Eager FP8 on a GPU is warned about (host-bound); compiled, or on the CPU (checks only), it is not.
    assert "--compile transformers" in fp8.eager_warning("cuda", "none")
    assert fp8.eager_warning("cuda", "transformers") is None and fp8.eager_warning("cpu", "none") is None
    with caplog.at_level(logging.WARNING, logger=fp8.__name__):
        fp8.Fp8Plan.for_run("tensorwise", 1280, torch.device("cuda", 0), "none", True, "none")
    assert "eager float8 is host-bound" in caplog.text
    # Float8 all-gather: tensorwise under FSDP2 over plain fp32 shards only.
    assert fp8.Fp8Plan.for_run("tensorwise", 1280, torch.device("cpu"), "full_shard", True).float8_all_gather
    assert not fp8.Fp8Plan.for_run("rowwise", 1280, torch.device("cpu"), "full_shard", True).float8_all_gather
    assert not fp8.Fp8Plan.for_run("tensorwise", 1280, torch.device("cpu"), "none", True).float8_all_gather
    assert not fp8.Fp8Plan.for_run("tensorwise", 1280, torch.device("cpu"), "full_shard", False).float8_all_gather


def test_compiled_float8_block_matches_eager(tiny_model_dir):
    """dynamo traces torchao's Float8Linear inside a compiled transformer block (aot_eager: no C compiler needed):
    same output and gradients as eager."""
    from diffusers.models.attention import BasicTransformerBlock

    from sdxl_trainer.training import compiling

    torch.manual_seed(0)
    eager = BasicTransformerBlock(64, 4, 16, cross_attention_dim=80)
    fp8.convert(eager, "tensorwise", 16)
    compiled = BasicTransformerBlock(64, 4, 16, cross_attention_dim=80)
    fp8.convert(compiled, "tensorwise", 16)
    compiled.load_state_dict(eager.state_dict())
    wrapper = torch.nn.Sequential(compiled)
    # Static shapes keep this test short; the trainer compiles with dynamic sizes (test_fp8_gpu.py, Inductor).
    assert compiling.compile_regions(wrapper, "transformers", dynamic=False, backend="aot_eager") == 1
    x, context = torch.randn(2, 48, 64), torch.randn(2, 77, 80)
    out_e = eager(x, encoder_hidden_states=context)
    out_c = wrapper[0](x, encoder_hidden_states=context)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    w = "ff.net.0.proj.weight"
    torch.testing.assert_close(compiled.get_parameter(w).grad, eager.get_parameter(w).grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


@pytest.mark.slow
def test_fp8_trains_close_to_full_precision_and_resumes_exactly(tiny_model_dir, cache_root, tmp_path):
    """Flat layout, then FSDP2 (float8 all-gather): FP8 losses within 1 % of the unquantized run's; the checkpoint
    holds the same names as an unquantized one; resuming the FSDP2 run repeats its last step exactly; an unquantized
    checkpoint continues under rowwise FP8 (--fp8 may change at resume, RESUME_RULES)."""
    common = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--no-save_final_model"]
    runs = {
        "reference": [],
        "flat": TINY_FP8,
        "fsdp": [*TINY_FP8, "--sharding", "full_shard"],
    }
    for name, extra in runs.items():
        assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, tmp_path / name, *common, *extra)) == 0
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name)] for name in runs}
    assert len(losses["reference"]) == 3
    assert losses["flat"] == pytest.approx(losses["reference"], rel=0.01)
    assert losses["flat"] != losses["reference"]  # the FP8 matmuls did run
    assert losses["fsdp"] == pytest.approx(losses["flat"], rel=1e-3)  # fp8 all-gather: scales from the fp32 shards
    log = (tmp_path / "fsdp" / "train.log").read_text()
    assert re.search(r"--fp8 tensorwise \{'fp8_layers': \d+, .*'float8_all_gather': True\}", log)
    reference = checkpoint_weights(tmp_path / "reference" / "checkpoints" / "step-3")
    for name in ("flat", "fsdp"):
        saved = checkpoint_weights(tmp_path / name / "checkpoints" / "step-3")
        assert saved.keys() == reference.keys()
        assert all(v.dtype == torch.float32 and not torch.equal(v, reference[k]) for k, v in saved.items()
                   if k.endswith("attn1.to_q.weight"))  # fmt: skip

    resumed = tmp_path / "resumed"
    resume = ["--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoints" / "step-2")]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, resumed, *common, *runs["fsdp"], *resume)) == 0
    assert [r["loss"] for r in read_metrics(resumed)] == losses["fsdp"][2:]
    final_a = checkpoint_weights(tmp_path / "fsdp" / "checkpoints" / "step-3")
    final_b = checkpoint_weights(resumed / "checkpoints" / "step-3")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    rowwise = tmp_path / "rowwise"
    resume = ["--resume_from_checkpoint", str(tmp_path / "reference" / "checkpoints" / "step-1"), "--fp8", "rowwise",
              "--fp8_min_features", "16"]  # fmt: skip
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, rowwise, *common, *resume)) == 0
    continued = [r["loss"] for r in read_metrics(rowwise)]
    assert continued == pytest.approx(losses["reference"][1:], rel=0.01) and continued != losses["reference"][1:]
    assert "--fp8 rowwise {'fp8_layers'" in (rowwise / "train.log").read_text()
    assert json.loads((rowwise / "config.json").read_text())["fp8"] == "rowwise"


@pytest.mark.slow
def test_two_ranks_with_float8_all_gather_match_one_process(tiny_model_dir, tmp_path):
    """FSDP2 over 2 gloo processes with tensorwise float8 all-gather (each rank casts its fp32 shard with a scale
    all-reduced over the ranks, the float8 shards are all-gathered): the same losses as one process with the same
    global batch, up to FP8's input scales (computed over each rank's own images instead of the whole batch)."""
    from test_fsdp_multiprocess import two_ranks_and_one_process

    a, b, two = two_ranks_and_one_process(tiny_model_dir, tmp_path, TINY_FP8, TINY_FP8)
    assert "'float8_all_gather': True" in (two / "train.log").read_text()
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=0.01)
