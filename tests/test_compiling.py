"""Regional torch.compile (--compile): compiled blocks give eager's outputs and gradients, the count is the number
of matching blocks, and a second latent size reuses the graphs of the first (spatial sizes are dynamic)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

from sdxl_trainer.training import compiling


def _unet(model_dir) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    unet.enable_gradient_checkpointing()  # the trainer's default: compiled blocks run inside checkpoints
    return unet.train()


def _loss_and_grads(unet, height: int, width: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(height * 100 + width)
    prediction = unet(
        torch.randn(2, 4, height, width, generator=g),
        torch.tensor([1, 999]),
        encoder_hidden_states=torch.randn(2, 77, 80, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 40, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64], [80, 60, 2, 1, 64, 64]]),
        },
    ).sample
    prediction.square().mean().backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    return prediction.detach(), grads


@pytest.mark.parametrize("choice", ["blocks", "stages"])
def test_compiled_regions_match_eager_and_a_new_size_reuses_the_graphs(tiny_model_dir, choice):
    torch._dynamo.reset()
    compiled = _unet(tiny_model_dir)
    eager = copy.deepcopy(compiled)
    matching = [m for m in compiled.modules() if type(m).__name__ in compiling.REGIONS[choice]]
    # aot_eager: dynamo and AOTAutograd as in training, without Inductor's C++ compile time.
    assert compiling.compile_regions(compiled, choice, dynamic=True, backend="aot_eager") == len(matching) > 0
    new_graphs = []
    for height, width in [(8, 8), (8, 12)]:  # square first: height and width must not become one symbol
        before = counters["stats"]["unique_graphs"]
        prediction, grads = _loss_and_grads(compiled, height, width)
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
        reference, reference_grads = _loss_and_grads(eager, height, width)
        torch.testing.assert_close(prediction, reference, atol=1e-6, rtol=0)
        for grad, reference_grad in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=0)
    assert new_graphs[0] > 0 and new_graphs[1] == 0
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and handoffs keep their names


def test_none_compiles_nothing(tiny_model_dir):
    torch._dynamo.reset()
    unet = _unet(tiny_model_dir)
    assert compiling.compile_regions(unet, "none", dynamic=True) == 0
    before = counters["stats"]["unique_graphs"]
    _loss_and_grads(unet, 8, 8)
    assert counters["stats"]["unique_graphs"] == before
    assert all(m._compiled_call_impl is None for m in unet.modules())


@pytest.mark.parametrize(
    ("device_type", "sharding", "compiler", "expected"),
    [
        ("cuda", "none", "/usr/bin/cc", "transformers"),  # measured +10 % for the default recipe on one H200
        ("cuda", "full_shard", "/usr/bin/cc", "none"),  # regional compilation measured slower under FSDP2
        ("cpu", "none", "/usr/bin/cc", "none"),  # Inductor's C++ compile: minutes, no measured gain
        ("cuda", "none", None, "none"),  # Triton cannot build its launchers without a C compiler
    ],
)
def test_auto_compiles_only_where_it_measured_faster(monkeypatch, device_type, sharding, compiler, expected):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: compiler)
    assert compiling.resolve_choice("auto", device_type, sharding) == expected
    assert compiling.resolve_choice("blocks", device_type, sharding) == "blocks"  # an explicit choice stands
