"""Single-file export (diffusers -> original SGM layout) and import (single file -> our loaders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_trainer import __version__
from sdxl_trainer.models import loading, shapes, single_file, single_file_keys

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# SDXL base's shapes, written out in the package so the check runs without any download.
SDXL_UNET, SDXL_VAE = shapes.UNET, shapes.VAE
CLIP_COMMON, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2 = shapes.CLIP_COMMON, shapes.TEXT_ENCODER, shapes.TEXT_ENCODER_2


@pytest.fixture(scope="module")
def sdxl_on_meta():
    """Full-size SDXL UNet, VAE and both text encoders with shapes but no storage (no weights allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **SDXL_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **SDXL_TEXT_ENCODER_2)),
        }
    state_dicts = {name: m.state_dict() for name, m in modules.items()}
    return modules, state_dicts, single_file_keys.convert_pipeline_state_dicts(**state_dicts)


@pytest.fixture(scope="module")
def tiny_fp32_file(tiny_model_dir, tmp_path_factory) -> Path:
    return single_file.save_single_file(tiny_model_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors", "fp32")


def _prefixed(ckpt: dict, prefix: str) -> dict:
    return {k: v for k, v in ckpt.items() if k.startswith(prefix)}


# ---- the mapping at SDXL scale, checked against diffusers' own single-file conversion ----------------------


def test_sdxl_unet_keys_land_where_the_original_sdxl_checkpoint_has_them(sdxl_on_meta):
    _, _, ckpt = sdxl_on_meta
    # Keys of Stability's sd_xl_base_1.0.safetensors, including the SDXL-specific upsampler slots
    # (output_blocks.2.2 and 5.2: the level has attention) and the 10-deep transformers of the last level.
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
    ]:
        assert key in ckpt, key
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ckpt["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3840, 1280)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" not in ckpt  # SD 1.x's slot, wrong for SDXL


def test_diffusers_recognises_the_export_as_sdxl_base(sdxl_on_meta):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(sdxl_on_meta[2]) == "xl_base"


def test_diffusers_maps_every_exported_unet_and_text_encoder_1_tensor_back_to_its_own_key(sdxl_on_meta):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    modules, sds, ckpt = sdxl_on_meta
    back = convert_ldm_unet_checkpoint(ckpt, dict(modules["unet"].config))
    assert set(back) == set(sds["unet"])
    assert len(back) == len(_prefixed(ckpt, single_file_keys.UNET_PREFIX))  # one to one: nothing left over
    # Renames pass the very tensor objects through, so identity proves each one reached its own key.
    assert all(back[k] is sds["unet"][k] for k in back)

    back = convert_ldm_clip_checkpoint(ckpt)
    # transformers 5 saves CLIPTextModel without its text_model. wrapper; diffusers strips the prefix then.
    assert set(back) == {"text_model." + k for k in sds["text_encoder"]}
    assert len(back) == len(_prefixed(ckpt, single_file_keys.TEXT_ENCODER_PREFIX))
    assert all(back["text_model." + k] is v for k, v in sds["text_encoder"].items())


def test_diffusers_maps_every_exported_vae_and_text_encoder_2_tensor_back_with_its_shape(sdxl_on_meta):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_open_clip_checkpoint

    modules, sds, ckpt = sdxl_on_meta
    back = convert_ldm_vae_checkpoint(ckpt, dict(modules["vae"].config))
    assert set(back) == set(sds["vae"])
    assert len(back) == len(_prefixed(ckpt, single_file_keys.VAE_PREFIX))
    assert all(back[k].shape == sds["vae"][k].shape for k in back)

    te2 = modules["text_encoder_2"]
    back = convert_open_clip_checkpoint(te2, ckpt, prefix=single_file_keys.TEXT_ENCODER_2_PREFIX)
    assert set(back) == set(sds["text_encoder_2"])
    assert all(back[k].shape == sds["text_encoder_2"][k].shape for k in back)
    # Every exported key is used: q/k/v come from one packed tensor per layer, all else one to one.
    packed = te2.config.num_hidden_layers * 2  # in_proj_weight and in_proj_bias per layer
    assert len(back) == len(_prefixed(ckpt, single_file_keys.TEXT_ENCODER_2_PREFIX)) + 2 * packed


# ---- pure functions on small real tensors ------------------------------------------------------------------


def test_text_encoder_2_packs_q_k_v_in_that_order_and_transposes_the_projection():
    sd = {"text_projection.weight": torch.arange(6.0).reshape(2, 3)}
    for i, name in enumerate(single_file_keys.QKV_ORDER):
        sd[f"text_model.encoder.layers.0.self_attn.{name}.weight"] = torch.full((3, 3), float(i))
        sd[f"text_model.encoder.layers.0.self_attn.{name}.bias"] = torch.full((3,), float(i))
    out = single_file_keys.convert_text_encoder_2_state_dict(sd)
    p = single_file_keys.TEXT_ENCODER_2_PREFIX
    assert torch.equal(
        out[p + "transformer.resblocks.0.attn.in_proj_weight"][:, 0], torch.tensor([0.0] * 3 + [1.0] * 3 + [2.0] * 3)
    )
    assert torch.equal(
        out[p + "transformer.resblocks.0.attn.in_proj_bias"], torch.tensor([0.0] * 3 + [1.0] * 3 + [2.0] * 3)
    )
    assert torch.equal(out[p + "text_projection"], sd["text_projection.weight"].T)

    del sd["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(single_file_keys.ConversionError, match="lacks v_proj bias"):
        single_file_keys.convert_text_encoder_2_state_dict(sd)


def test_text_encoder_1_gets_the_text_model_prefix_whichever_way_transformers_saved_it():
    w = torch.ones(2)
    flat = single_file_keys.convert_text_encoder_state_dict(
        {"final_layer_norm.weight": w, "embeddings.position_ids": w}
    )
    wrapped = single_file_keys.convert_text_encoder_state_dict({"text_model.final_layer_norm.weight": w})
    assert flat == wrapped == {single_file_keys.TEXT_ENCODER_PREFIX + "text_model.final_layer_norm.weight": w}


def test_vae_attention_projections_become_1x1_convolutions():
    sd = {
        "encoder.mid_block.attentions.0.to_q.weight": torch.randn(4, 4),
        "encoder.mid_block.attentions.0.to_q.bias": torch.randn(4),
        "encoder.mid_block.attentions.0.group_norm.weight": torch.randn(4),
    }
    out = single_file_keys.convert_vae_state_dict(sd)
    q = out["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (4, 4, 1, 1) and torch.equal(q[:, :, 0, 0], sd["encoder.mid_block.attentions.0.to_q.weight"])
    assert out["first_stage_model.encoder.mid.attn_1.q.bias"].shape == (4,)
    assert out["first_stage_model.encoder.mid.attn_1.norm.weight"].shape == (4,)


def test_unknown_parameters_are_errors_not_silent_drops():
    unet = {"down_blocks.0.resnets.0.norm1.weight": torch.ones(1), "up_blocks.0.resnets.1.norm1.weight": torch.ones(1)}
    assert "model.diffusion_model.output_blocks.1.0.in_layers.0.weight" in single_file_keys.convert_unet_state_dict(
        unet
    )
    with pytest.raises(single_file_keys.ConversionError, match="lora_up"):
        single_file_keys.convert_unet_state_dict({**unet, "down_blocks.0.resnets.0.lora_up.weight": torch.ones(1)})
    with pytest.raises(single_file_keys.ConversionError, match="not an SDXL-shaped"):
        single_file_keys.convert_vae_state_dict({"encoder.mystery.weight": torch.ones(1)})
    with pytest.raises(single_file_keys.ConversionError, match="CLIPTextModel"):
        single_file_keys.convert_text_encoder_state_dict({"vision_model.weight": torch.ones(1)})


def test_dtype_names_are_parsed_and_bad_ones_name_the_flag():
    assert single_file.parse_dtype("half") == ("fp16", torch.float16)
    assert single_file.parse_dtype("torch.bfloat16") == ("bf16", torch.bfloat16)
    assert single_file.parse_dtype(torch.float32) == ("fp32", torch.float32)
    with pytest.raises(single_file_keys.ConversionError, match="--dtype"):
        single_file.parse_dtype("int8")


def test_weight_files_prefer_the_sharded_index_then_the_plain_file_over_variants(tmp_path):
    one = {"a": torch.zeros(1)}
    save_file(one, tmp_path / "model.fp16.safetensors")
    assert single_file.find_weight_files(tmp_path) == [tmp_path / "model.fp16.safetensors"]  # the only one
    save_file(one, tmp_path / "model.safetensors")
    assert single_file.find_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file(one, tmp_path / shard)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [f.name for f in single_file.find_weight_files(tmp_path)] == sorted(weight_map.values())


# ---- the round trip on the tiny pipeline ---------------------------------------------------------------------


def _reallocate(pipe) -> None:
    # Weights read from a safetensors file are memory-mapped at whatever alignment the file gives, and
    # oneDNN picks a different summation order for unaligned data (last-bit differences, measured). Fresh
    # aligned copies make "same weights" mean "same image" bit for bit; the values are already compared.
    for part in PARTS:
        for p in getattr(pipe, part).parameters():
            p.data = p.data.clone()


def test_single_file_round_trips_every_tensor_and_the_image_exactly(tiny_model_dir, tiny_fp32_file):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(tiny_fp32_file), config=str(tiny_model_dir), local_files_only=True
    )
    for part in PARTS:
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert set(got) == set(want), part
        for key, value in want.items():
            assert got[key].dtype == torch.float32 and torch.equal(got[key], value), f"{part}: {key}"

    _reallocate(ref)
    _reallocate(pipe)
    kwargs = dict(prompt="a red cube on a table", num_inference_steps=2, height=64, width=64, output_type="np")
    image = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    expected = ref(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    assert (image == expected).all()


def test_fp16_export_is_fp16_throughout_and_carries_provenance(tiny_model_dir, tmp_path):
    out = single_file.save_single_file(tiny_model_dir, tmp_path / "tiny-fp16.safetensors", dtype="fp16")
    ref = single_file_keys.convert_pipeline_state_dicts(
        **{p: single_file.load_part_state_dict(tiny_model_dir / p, torch.float32) for p in PARTS}
    )
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(ref)
        for key in f.keys():  # noqa: SIM118
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float16, key
            assert torch.equal(tensor, ref[key].half()), key
        meta = f.metadata()
    assert meta["dtype"] == "fp16" and meta["sdxl_trainer_version"] == __version__
    assert meta["source"] == tiny_model_dir.name  # the name only: no local paths in a shared file
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_existing_output_is_kept_unless_overwrite_and_no_temp_file_is_left(tiny_model_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(single_file_keys.ConversionError, match="--overwrite"):
        single_file.save_single_file(tiny_model_dir, out)
    assert out.read_bytes() == b"keep me"
    single_file.save_single_file(tiny_model_dir, out, dtype="bf16", overwrite=True)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["dtype"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_folders_that_are_not_sdxl_pipelines_get_clear_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(single_file_keys.ConversionError, match="--model_path: .* is not a folder"):
        single_file.save_single_file(tmp_path / "missing", out)
    with pytest.raises(single_file_keys.ConversionError, match="no model_index.json"):
        single_file.save_single_file(tmp_path, out)
    sd15_like = tmp_path / "sd15"
    shutil.copytree(tiny_model_dir, sd15_like, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((sd15_like / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (sd15_like / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(single_file_keys.ConversionError, match="lacks text_encoder_2"):
        single_file.save_single_file(sd15_like, out)
    with pytest.raises(single_file_keys.ConversionError, match="--checkpoint_path: .* must end in .safetensors"):
        single_file.save_single_file(tiny_model_dir, tmp_path / "out.ckpt")
    assert not out.exists()


def test_cli_writes_the_file_and_rejects_conflicting_flags(tiny_model_dir, tmp_path, capsys):
    from convert_diffusers_to_original_sdxl import main

    out = tmp_path / "cli.safetensors"
    main(["--model_path", str(tiny_model_dir), "--checkpoint_path", str(out), "--half", "--use_safetensors"])
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["dtype"] == "fp16"
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["--model_path", str(tiny_model_dir), "--checkpoint_path", str(out)])
    with pytest.raises(SystemExit) as exc:
        main(["--model_path", str(tiny_model_dir), "--checkpoint_path", str(out), "--half", "--dtype", "fp32"])
    assert exc.value.code == 2 and "--half" in capsys.readouterr().err


# ---- import: our loaders read a single file ------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)


def test_every_loader_reads_a_single_file_like_the_folder(tiny_model_dir, tiny_fp32_file):
    f, cfg = str(tiny_fp32_file), str(tiny_model_dir)
    assert _same_weights(loading.load_unet(f, single_file_config=cfg), loading.load_unet(cfg))
    assert _same_weights(loading.load_vae(f, single_file_config=cfg), loading.load_vae(cfg))
    got, want = loading.load_text_encoders(f, single_file_config=cfg), loading.load_text_encoders(cfg)
    assert _same_weights(got.text_encoder, want.text_encoder)
    assert _same_weights(got.text_encoder_2, want.text_encoder_2)
    assert got.tokenizer_2("a cat").input_ids == want.tokenizer_2("a cat").input_ids
    assert loading.load_noise_scheduler(f, single_file_config=cfg).config == loading.load_noise_scheduler(cfg).config
    loading.set_single_file_config(cfg)  # the process-wide route: callers pass nothing
    try:
        pipe = loading.load_pipeline(f, torch_dtype=torch.float16)
    finally:
        loading.set_single_file_config(None)
    assert pipe.unet.dtype == torch.float16 and type(pipe).__name__ == "StableDiffusionXLPipeline"
    # What saving uses: the architecture without weights, and the pipeline around a given (trained) UNet.
    assert loading.load_unet_config(f, single_file_config=cfg) == loading.load_unet_config(cfg)
    assert loading.load_pipeline(f, single_file_config=cfg, unet=pipe.unet).unet is pipe.unet


def test_single_file_errors_name_the_flag_to_fix(tiny_model_dir, tiny_fp32_file, tmp_path):
    f, cfg = str(tiny_fp32_file), str(tiny_model_dir)
    with pytest.raises(loading.ModelLoadError, match="--single_file_config: --pretrained_model_name_or_path"):
        loading.load_unet(f)
    with pytest.raises(loading.ModelLoadError, match="--single_file_config: .*no model_index.json"):
        loading.check_model_args(f, str(tmp_path))
    with pytest.raises(loading.ModelLoadError, match="only used with a single-file"):
        loading.check_model_args(cfg, cfg)
    loading.check_model_args(f, cfg)  # the good pair passes
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80")
    with pytest.raises(loading.ModelLoadError, match="not a .safetensors file"):
        loading.load_unet(str(pickle), single_file_config=cfg)
    unet_only = tmp_path / "unet-only.safetensors"
    with safe_open(f, framework="pt") as src:
        save_file({k: src.get_tensor(k) for k in src.keys() if k.startswith(single_file_keys.UNET_PREFIX)}, unet_only)  # noqa: SIM118
    with pytest.raises(loading.ModelLoadError, match="holds no VAE weights"):
        loading.load_vae(str(unet_only), single_file_config=cfg)


def test_add_model_args_adds_the_config_flag():
    import argparse

    parser = argparse.ArgumentParser()
    loading.add_model_args(parser)
    assert parser.parse_args(["--single_file_config", "base"]).single_file_config == "base"
    assert parser.parse_args([]).single_file_config is None
