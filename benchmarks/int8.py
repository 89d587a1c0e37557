"""int8 against vitkit's float paths: ViT-B/16 at 224, batch 16, images per second on this CPU.

    .venv/bin/python benchmarks/int8.py                     # ~10 min on a quiet 2-core machine
    .venv/bin/python benchmarks/int8.py --repeats 3 --checkpoint runs/demo --split test

In one process, the candidates' repetitions interleaved (a load spike hits all of them alike), each
after one warm-up call, medians of the repetitions:
- PyTorch fp32: vitkit's model with its fp32 fast paths (`apply_fast_paths(model, "cpu", "fp32")`);
- PyTorch bf16: the weights stored in bf16 with the bf16 fast paths (`vitkit.fast.prepare_inference`
  where it exists, else the same steps by hand), bf16 images;
- onnxruntime fp32: the graph `vitkit export` writes (dynamic batch and size);
- onnxruntime int8: that graph quantized as `vitkit quantize` does (`vitkit.quantize`: dynamic
  uint8 activations x per-channel int8 weights in every MatMul and Gemm with a weight).
The ratio is int8 over the fastest float path. Random weights (speed does not depend on them); the
largest logit difference of int8 against PyTorch fp32 on the same random images is printed beside.
With --checkpoint, the accuracy half: `quantize_int8` on a real split (fp32 and int8 top-1).

Measured on the 2-core development CPU (AMD EPYC, AVX-512 with VNNI and avx512_bf16, no AMX; torch
2.13, onnxruntime 1.32), 2026-12-06, quiet machine, `benchmarks/int8.py --repeats 3`; bf16 through
`prepare_inference` (native bf16 kernels, the calibration's choice here):

    candidate             images/s  vs best float
    PyTorch fp32              3.93          0.50x
    onnxruntime fp32          4.18          0.53x
    onnxruntime int8         11.70          1.49x
    PyTorch bf16              7.86          1.00x
    int8 vs PyTorch fp32 on the random images: max |logit error| 0.126 (logits up to 4.03), argmax
    agreement 100%

The quantizer's settings, compared in an earlier run on the same CPU under heavy load (3
repetitions): PyTorch fp32 0.45, onnxruntime fp32 0.46 images/s, and int8 with per-channel int8
weights 1.11, per-tensor 1.18 and uint8 weights 0.63: per-channel costs nothing measurable and signed weights suit
VNNI (u8 x s8). Accuracy on a real split: the demo model (`vitkit train --config digits_vit`, width
64, depth 4) on the 359 images of the digits test split, fp32 98.61%, int8 98.61% (no drop); a
configs/cifar10_vit.py model (conv stem, width 192, depth 6, a few minutes of training) on all 10000
CIFAR-10 test images (`vitkit quantize CKPT --split test`, its own data config), fp32 40.41%, int8
40.39% (a drop of 0.02 points).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vitkit import create_model
from vitkit.export import export_onnx
from vitkit.fast import apply_fast_paths
from vitkit.quantize import OnnxClassifier, quantize_int8, quantize_linear_layers
from vitkit.runtime import keep_freed_memory
from vitkit.train.precision import machine_summary


def bf16_model(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch bf16 inference path: `prepare_inference` where this checkout has it."""
    try:
        from vitkit.fast import prepare_inference
    except ImportError:
        prepare_inference = None
    if prepare_inference is not None:
        prepared, _ = prepare_inference(model, "cpu", "bf16")
        return prepared
    prepared = apply_fast_paths(model.eval(), "cpu", "bf16").to(torch.bfloat16)
    return lambda images: prepared(images.to(torch.bfloat16))


def time_call(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        predict(images)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="B/16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="also measure top-1 on a real split")
    parser.add_argument("--root", default=None, help="ImageFolder root (default: the checkpoint's data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=0)
    args = parser.parse_args()
    keep_freed_memory()
    print(f"# {machine_summary()}")

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, zero_head=False).eval()
    size = model.config.img_size
    images = torch.randn(args.batch_size, 3, *size)
    with tempfile.TemporaryDirectory() as folder:
        fp32_graph = export_onnx(model, Path(folder) / "fp32.onnx", check=False).path
        quantize_linear_layers(fp32_graph, Path(folder) / "int8.onnx")
        candidates = {
            "onnxruntime fp32": OnnxClassifier(fp32_graph),
            "onnxruntime int8": OnnxClassifier(Path(folder) / "int8.onnx"),
        }
        with torch.inference_mode():
            fp32 = apply_fast_paths(model, "cpu", "fp32")
            reference = fp32(images)
            error = (candidates["onnxruntime int8"](images) - reference).abs().max().item()
            agree = (candidates["onnxruntime int8"](images).argmax(-1) == reference.argmax(-1)).float().mean()
        candidates = {"PyTorch fp32": fp32, **candidates}
        bf16_copy = create_model(args.model, num_classes=1000, zero_head=False)
        bf16_copy.load_state_dict(model.state_dict())
        candidates["PyTorch bf16"] = bf16_model(bf16_copy)

        times: dict[str, list[float]] = {name: [] for name in candidates}
        for predict in candidates.values():
            time_call(predict, images)  # warm-up
        for _ in range(args.repeats):
            for name, predict in candidates.items():
                times[name].append(time_call(predict, images))
    rates = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    best_float = max(rate for name, rate in rates.items() if "int8" not in name)
    print(f"# {args.model} at {size[0]}x{size[1]}, batch {args.batch_size}, {args.repeats} repetitions")
    print(f"{'candidate':20s} {'images/s':>9s} {'vs best float':>14s}")
    for name, rate in rates.items():
        print(f"{name:20s} {rate:9.2f} {rate / best_float:13.2f}x")
    print(
        f"int8 / best float path: {rates['onnxruntime int8'] / best_float:.2f}x; int8 vs PyTorch fp32 "
        f"on these images: max |logit error| {error:.3g} (logits up to {reference.abs().max():.3g}), "
        f"argmax agreement {agree:.0%}"
    )
    if args.checkpoint is not None:
        with tempfile.TemporaryDirectory() as folder:
            report = quantize_int8(
                args.checkpoint,
                Path(folder) / "model.int8.onnx",
                split=args.split,
                root=args.root,
                max_samples=args.max_samples,
                max_top1_drop=100.0,  # measured here, not refused
            )
        print(report.describe())


if __name__ == "__main__":
    main()
