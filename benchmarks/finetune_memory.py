"""Fine-tuning memory: peak memory and step time of full vs attention-only fine-tuning vs activation
checkpointing ("Three things everyone should know about ViTs", #2, and `set_grad_checkpointing`).

    .venv/bin/python benchmarks/finetune_memory.py                 # ViT-B/16 at 384, batch 8, fp32
    .venv/bin/python benchmarks/finetune_memory.py --quick         # ViT-S/16 at 224, batch 16, 2 steps

Each configuration runs in a fresh subprocess, so its peak resident memory (`ru_maxrss`) is its own:
"peak RSS" is the whole process (weights, gradients, AdamW state, activations, the Python runtime),
"step peak" is the rise above the RSS after building the model, i.e. what one training step adds.
On a GPU (--device cuda) both come from the CUDA allocator instead. Step time is the median of the
timed steps after one warm-up step. Ratios are against full fine-tuning in the same run. The
configurations run one after another, so on a shared machine a change of load shows in the step
times (not in the memory): read step times from a quiet machine.

Measured (2-core AVX-512 CPU shared with other jobs, torch 2.13, `--quick`: ViT-S/16 at 224, batch 16,
fp32): step peak 1728 MB full, 0.77x attention-only, 0.61x full + checkpointing, 0.32x both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitkit import create_model
from vitkit.fast import apply_fast_paths
from vitkit.train.optim import apply_freeze_rule
from vitkit.train.precision import machine_summary

CONFIGURATIONS = {
    "full": dict(freeze="none", checkpointing=False),
    "attention-only": dict(freeze="attention-only", checkpointing=False),
    "full + checkpointing": dict(freeze="none", checkpointing=True),
    "attention-only + checkpointing": dict(freeze="attention-only", checkpointing=True),
}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """One configuration in this process: build, train `steps` steps, report memory and time."""
    setting = CONFIGURATIONS[args.child]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, num_classes=100).to(device).train()
    apply_fast_paths(model, device, "bf16" if args.bf16 else "fp32")
    trainable = apply_freeze_rule(model, setting["freeze"])
    model.set_grad_checkpointing(setting["checkpointing"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype, enabled=args.bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {
        "trainable": trainable,
        "peak_mb": peak,
        "step_peak_mb": peak - base,
        "step_s": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 at 224, batch 16, 2 timed steps")
    parser.add_argument("--model", default=None, help="default B/16 (S/16 with --quick)")
    parser.add_argument("--img-size", type=int, default=None, help="default 384 (224 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (16 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3, 2 with --quick)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("S/16" if args.quick else "B/16")
    args.img_size = args.img_size or (224 if args.quick else 384)
    args.batch = args.batch or (16 if args.quick else 8)
    args.steps = args.steps or (2 if args.quick else 3)
    if args.child:
        print(json.dumps(run_one(args)))
        return

    print(f"# {machine_summary()}")
    forwarded = ["--model", args.model, "--img-size", str(args.img_size), "--batch", str(args.batch)]
    forwarded += ["--steps", str(args.steps), "--device", args.device] + (["--bf16"] if args.bf16 else [])
    results = {}
    for name in tqdm(CONFIGURATIONS, desc="configurations", unit="config"):
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, *forwarded], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"configuration {name!r} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(
        f"\n{args.model} at {args.img_size}, batch {args.batch}, {precision}, AdamW, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps\n"
    )
    print(
        "| configuration | trainable params | peak RSS (MB) | step peak (MB) | vs full | step (s) | vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    full = results["full"]
    for name, r in results.items():
        print(
            f"| {name} | {r['trainable'] / 1e6:.1f} M | {r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | "
            f"{r['step_peak_mb'] / full['step_peak_mb']:.2f}x | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
