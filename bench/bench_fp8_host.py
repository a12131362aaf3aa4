"""Host time of eager FP8: torchao's Float8Linear against nn.Linear, forward + backward per layer, at shapes so small
that the arithmetic is negligible and what is timed is the host's dispatch (why eager `--fp8` is host-bound and the
trainer warns about `--fp8` with `--compile none`; README, FP8). Runs on the CPU (or the GPU with --device cuda).

    python bench/bench_fp8_host.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def per_layer_us(fp8: bool, device: str, layers: int = 50, repeats: int = 20) -> float:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(layers)])
    model = model.to(device=device, dtype=torch.bfloat16)
    if fp8:
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for step in range(3 + repeats):
        if step == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        model(x).float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats / layers * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    bf16, fp8 = per_layer_us(False, args.device), per_layer_us(True, args.device)
    print(
        json.dumps(
            dict(device=args.device, bf16_linear_us_per_layer=round(bf16), float8_linear_us_per_layer=round(fp8))
        )
    )


if __name__ == "__main__":
    main()
