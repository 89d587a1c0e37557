"""The cnn stem's memory layout: training steps of a CIFAR-10 hybrid with its trunk on NCHW maps
against channels-last (NHWC) maps, in fp32 and in bf16 autocast, on this machine.

    .venv/bin/python benchmarks/conv_layout.py                 # configs/cifar10_vit.py, batch 128
    .venv/bin/python benchmarks/conv_layout.py --config cifar10_vit --batch 256 --reps 12 --threads 2

One process; the two layouts' steps alternate (a load spike hits both alike); each row is the median
of the timed steps after two warm-up steps, and the ratio is NHWC images/s over NCHW images/s in the
same run. `CnnStem.channels_last` is the switch (on by default); the weights keep their layout. The
models run as built (torch's AdamW, no vitkit fast paths), so the rates sit below a training run's.

2026-12-07, 2-core AMD EPYC (avx512_bf16, no AMX), torch 2.13, `--batch 256 --threads 2`, alone:
fp32 105 -> 117 images/s (1.11x), bf16 177 -> 212 images/s (1.20x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitkit.models.vit import VisionTransformer
from vitkit.registry import get_config
from vitkit.train import load_experiment
from vitkit.train.precision import machine_summary


def step_seconds(model: VisionTransformer, optimizer, images, labels, dtype) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, dtype: str) -> dict[str, float]:
    exp = load_experiment(args.config)
    config = get_config(exp.model.name, num_classes=10, img_size=exp.data.img_size, **exp.model.overrides)
    if config.stem != "cnn":
        raise SystemExit(f"{args.config}: stem {config.stem!r}, not 'cnn': no layout to compare")
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, *config.img_size)
    labels = torch.randint(0, 10, (args.batch,))
    models = {}
    for layout in ("NCHW", "NHWC"):
        torch.manual_seed(0)
        model = VisionTransformer(config).train()
        model.patch_embed.channels_last = layout == "NHWC"
        models[layout] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = {layout: [] for layout in models}
    for rep in range(args.reps + 2):
        for layout, (model, optimizer) in models.items():
            seconds = step_seconds(model, optimizer, images, labels, dtype)
            if rep >= 2:
                times[layout].append(seconds)
    return {layout: args.batch / statistics.median(t) for layout, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cifar10_vit")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine_summary()}")
    print(f"# {args.config}, batch {args.batch}, {torch.get_num_threads()} threads, {args.reps} timed steps")
    print("| precision | NCHW images/s | NHWC images/s | NHWC / NCHW |\n|---|---:|---:|---:|")
    for dtype in ("fp32", "bf16"):
        rates = measure(args, dtype)
        print(
            f"| {dtype} | {rates['NCHW']:.0f} | {rates['NHWC']:.0f} | {rates['NHWC'] / rates['NCHW']:.2f}x |"
        )


if __name__ == "__main__":
    main()
