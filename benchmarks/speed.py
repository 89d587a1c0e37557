"""Speed side by side: vitkit against HuggingFace transformers and timm, same weights.

    make bench                                  # = .venv/bin/python benchmarks/speed.py: ~15 min
    .venv/bin/python benchmarks/speed.py --quick   # Ti/16 and B/16, 3 repetitions: ~5 min
    .venv/bin/python benchmarks/speed.py --compile --memory   # also compiled candidates, peak memory

In one process, with the candidates' repetitions interleaved (so a load spike hits all of them alike),
for ViT-Ti/16 and ViT-S/16 (batch 32) and ViT-B/16 (batch 16) at 224, in fp32 and bf16:
- inference throughput and batch-1 latency of vitkit, the peers, and (with --compile) each of them
  under torch.compile;
- the ceiling: the same model's matrix products alone (patch projection, qkv, q k^T, attention x v,
  projection, fc1, fc2, head; torch.mm/bmm), timed in the row's dtype and, for bf16 on a CPU, also
  as fp32 GEMMs (vitkit's second bf16 path, taken where the calibration measured it faster); the
  faster is the ceiling. "%
  ceiling" is ceiling time over model time, and MFU is the model's FLOPs (vitkit.analysis.flops)
  per second over that matmul rate;
- training-step throughput (forward, cross-entropy, backward, AdamW) of ViT-Ti/16 at 224 (batch 32)
  and of a CIFAR-size ViT-Ti/4 at 32 px (batch 128), bf16 meaning autocast over fp32 weights;
- "Three things" #1: ViT-S 18x2 with the fused ParallelBlock, the same model branch by branch, and
  the sequential ViT-S 36x1 with the same parameters, in inference and training;
- peak memory: the rise of the peak RSS during a first call in a fresh process (reset through
  /proc/self/clear_refs), or torch.cuda.max_memory_allocated on a GPU.
Ratios are against the best peer of the same row group (compiled or not). Medians of the repetitions.

Inference in bf16 stores the weights in bf16 (every candidate alike); fp32 is fp32 throughout.
On CUDA (--device cuda), SDPA picks flash attention in every candidate; timings synchronise the device.

The process keeps freed memory (vitkit.runtime.keep_freed_memory) for every candidate alike;
VITKIT_MALLOC=system runs with glibc's defaults.

vitkit's candidate computes as vitkit's commands do: the fast paths of its precision and the kernels
the machine's calibration chose (vitkit.fast.machine: bf16 on native or fp32-unit GEMMs, the
training attention path). The header prints the calibration and the precision "auto" takes; the
last table ("vitkit against the best peer") sets vitkit as it chooses against the best peer
configuration of any precision, with its MFU (model FLOPs per second over the matmul rate of its
precision). Peers: real transformers, and real timm through a stand-in `torchvision` package
(benchmarks/_torchvision_standin.py) since torchvision's wheels need CUDA. Every training candidate
steps a fused AdamW.

Seen 2026-12-06 on the 2-core AMD EPYC (avx512_bf16, no AMX; torch 2.13, transformers 5.25, timm
1.0.31), `benchmarks/speed.py --reps 5 --no-compile --no-memory`, 16 minutes; calibration: bf16
products 3.2x fp32, native kernels faster than fp32 units, explicit training attention faster up to
197 tokens -> "auto" = bf16:

| work | best peer | vitkit as it chooses (bf16) | vs best peer | MFU |
|---|---:|---:|---:|---:|
| Ti/16 inference, batch 32, img/s | 84.8 (hf bf16) | 83.6 | 0.99x | 64% |
| S/16 inference, batch 32, img/s | 28.9 (timm bf16) | 28.8 | 1.00x | 71% |
| B/16 inference, batch 16, img/s | 8.9 (timm bf16) | 8.8 | 1.00x | 88% |
| Ti/16 @224 training step, batch 32, img/s | 25.1 (timm bf16) | 31.2 | 1.24x | 70% |
| Ti/4 @32 (CIFAR) training step, batch 128, img/s | 66.9 (hf bf16) | 99.0 | 1.48x | 70% |

Inference in bf16 runs the same oneDNN kernels in every candidate; the B/16 matmuls alone
(the ceiling) run at 10.0 img/s, 1.13x the peers, so no implementation can lead them by more there.
Parallel blocks in bf16: ViT-S 18x2 fused has 1.10x the batch-1 speed of 36x1 (7.8 against 7.1
img/s), 1.02x at batch 16 and in training.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _torchvision_standin  # timm imports torchvision, whose wheels need CUDA: a stand-in, here only
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit import create_model
from vitkit.analysis.flops import count
from vitkit.fast import apply_fast_paths, calibration, choose_precision
from vitkit.models.config import ViTConfig
from vitkit.models.vit import VisionTransformer
from vitkit.runtime import keep_freed_memory
from vitkit.train.precision import machine_summary

_torchvision_standin.install()
INFERENCE_MODELS = {"Ti/16": 32, "S/16": 32, "B/16": 16}
# (work, candidate, precision, speed, MFU) of every timed row, for the peer table at the end.
ROWS: list[tuple[str, str, str, float, float]] = []
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = {dtype: name for name, dtype in DTYPES.items()}


# Peers, built offline with vitkit's weights ---------------------------------------------------------
class HFClassifier(nn.Module):
    """transformers' ViTForImageClassification returning logits, so every candidate is images -> logits."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        from transformers import ViTConfig as HFConfig
        from transformers import ViTForImageClassification

        c = model.config
        if c.parallel != 1 or c.stem != "patch" or c.pool != "token" or c.layer_scale_init:
            raise ValueError(f"HF ViT has no equivalent of this config: {c}")
        hf_config = HFConfig(
            hidden_size=c.embed_dim,
            num_hidden_layers=c.depth,
            num_attention_heads=c.num_heads,
            intermediate_size=c.mlp_dim,
            hidden_act="gelu" if c.gelu == "exact" else "gelu_pytorch_tanh",
            layer_norm_eps=c.norm_eps,
            image_size=c.img_size[0],
            patch_size=c.patch_size,
            num_channels=c.in_chans,
            qkv_bias=c.qkv_bias,
            num_labels=c.num_classes,
            attn_implementation="sdpa",
        )
        self.hf = ViTForImageClassification(hf_config)
        self.hf.load_state_dict(hf_state(model), strict=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).logits


def hf_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """vitkit (timm) names -> transformers 5 ViT names; the fused qkv splits into q, k, v."""
    s = model.state_dict()
    out = {
        "vit.embeddings.cls_token": s["cls_token"],
        "vit.embeddings.position_embeddings": s["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "vit.layernorm.weight": s["norm.weight"],
        "vit.layernorm.bias": s["norm.bias"],
        "classifier.weight": s["head.weight"],
        "classifier.bias": s["head.bias"],
    }
    for i in range(model.config.depth):
        ours, theirs = f"blocks.{i}.", f"vit.layers.{i}."
        for part in ("weight", "bias"):
            for name, tensor in zip(("q", "k", "v"), s[f"{ours}attn.qkv.{part}"].chunk(3), strict=True):
                out[f"{theirs}attention.{name}_proj.{part}"] = tensor
            for mine, hf in (
                ("attn.proj", "attention.o_proj"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{theirs}{hf}.{part}"] = s[f"{ours}{mine}.{part}"]
    return out


def timm_model(model: VisionTransformer) -> nn.Module:
    """timm's VisionTransformer loads vitkit's state dict unchanged (same names)."""
    import timm

    c = model.config
    peer = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=c.img_size,
        patch_size=c.patch_size,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_dim / c.embed_dim,
        num_classes=c.num_classes,
    )
    peer.load_state_dict(model.state_dict(), strict=True)
    return peer


def peers(model: VisionTransformer, notes: list[str]) -> dict[str, nn.Module]:
    """The peers that can be built here; the reason for each one that cannot goes into `notes`."""
    out: dict[str, nn.Module] = {}
    for name, build in (("hf", HFClassifier), ("timm", timm_model)):
        try:
            out[name] = build(model)
        except ImportError as error:
            note = f"{name}: not importable here ({error})"
            if note not in notes:
                notes.append(note)
    return out


# Timing ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_peak(run: Callable[[], object], device: torch.device) -> float:
    """Extra memory at the peak of one call: the CUDA allocator's peak, or on CPU the rise of the peak
    RSS, which is only the call's own in a process that has not yet freed memory to reuse (the
    allocator keeps freed pages): hence `peak_in_fresh_process`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = current_rss_mb()
    run()
    return peak_rss_mb() - base


def interleaved(
    candidates: dict[str, Callable[[], object]], reps: int, device: torch.device, warmup: int = 2
) -> dict[str, Result]:
    """Median wall time of each candidate, the repetitions of all candidates interleaved."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {name: Result() for name in candidates}
    for name, run in candidates.items():
        for _ in range(warmup):
            run()
        if device.type == "cuda":
            results[name].peak_mb = measure_peak(run, device)
    for _ in range(reps):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            results[name].times.append(time.perf_counter() - start)
    return results


def peak_in_fresh_process(kind: str, key: str, dtype_name: str, candidate: str) -> float:
    """Peak extra RSS of one first call (inference) or step (training) of an eager candidate, measured
    in a new process so that no earlier call's freed memory hides its allocations."""
    command = [sys.executable, __file__, "--peak-child", kind, key, dtype_name, candidate]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child {command[2:]} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def peak_child(kind: str, key: str, dtype_name: str, candidate: str) -> None:
    dtype, device = DTYPES[dtype_name], torch.device("cpu")
    torch.manual_seed(0)
    if kind == "inference":
        model = create_model(key, zero_head=False)
        module = candidates_for(model, dtype, device, False, [])[candidate]
        images = torch.randn(INFERENCE_MODELS[key], 3, *model.config.img_size, dtype=dtype)
        with torch.inference_mode():
            print(measure_peak(functools.partial(module, images), device))
        return
    config, batch = train_configs()[key]
    model = VisionTransformer(config.replace(zero_head=False))
    vitkit = apply_fast_paths(copy.deepcopy(model), device, dtype_name)
    module = {"vitkit": vitkit, **peers(model, [])}[candidate].train()
    images = torch.randn(batch, 3, *config.img_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    print(measure_peak(training_step(module, images, labels, dtype), device))


def add_fresh_peaks(
    args: argparse.Namespace,
    device: torch.device,
    results: dict[str, Result],
    kind: str,
    key: str,
    dtype: str,
) -> None:
    """On CPU, each eager candidate's peak memory from a fresh process (compiled ones are left blank)."""
    if device.type != "cpu" or not args.memory:
        return
    for name, result in results.items():
        if "+compile" not in name and not name.startswith("ceiling"):
            result.peak_mb = peak_in_fresh_process(kind, key, dtype, name)


def megabytes(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) else ""


# The ceiling: the model's matrix products alone --------------------------------------------------------
def matmul_ceiling(
    config: ViTConfig, batch: int, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[[], None], float]:
    """A function running every matrix product of one forward pass (and their FLOPs), nothing else."""
    tokens, dim, mlp, heads = config.num_tokens, config.embed_dim, config.mlp_dim, config.num_heads
    rows, head_dim = batch * tokens, config.head_dim
    patch_in = config.in_chans * config.patch_size**2

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device)

    # Dense layers as F.linear with (out, in) weights: the layout every candidate's nn.Linear uses,
    # which oneDNN's bf16 kernels run faster than a (in, out) right operand.
    # Every block repeats the same operands: the work is the shapes', the memory one block's.
    block = [(rand(rows, dim), rand(3 * dim, dim)), (rand(rows, dim), rand(dim, dim))]
    block += [(rand(rows, dim), rand(mlp, dim)), (rand(rows, mlp), rand(dim, mlp))]
    dense = [(rand(batch * config.num_patches, patch_in), rand(dim, patch_in))] + block * config.depth
    dense.append((rand(batch, dim), rand(config.num_classes, dim)))
    keys = rand(batch * heads, tokens, head_dim)
    attention = [
        (rand(batch * heads, tokens, head_dim), keys.transpose(1, 2)),  # q k^T
        (rand(batch * heads, tokens, tokens), rand(batch * heads, tokens, head_dim)),  # weights v
    ] * config.depth
    # 2 FLOPs per multiply-accumulate.
    flops = sum(2 * x.numel() * w.shape[0] for x, w in dense)
    flops += sum(2 * a.numel() * b.shape[-1] for a, b in attention)

    def run() -> None:
        for x, w in dense:
            F.linear(x, w)
        for a, b in attention:
            torch.bmm(a, b)

    return run, float(flops)


def ceilings(
    config: ViTConfig, batch: int, dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, Callable[[], None]], float]:
    """The matmul ceilings of a row group, named, and their FLOPs; the fastest one is the ceiling. For
    bf16 on a CPU, fp32 GEMMs of the bf16 values are a second way to compute the same products (how
    vitkit multiplies bf16 on CPUs without AMX; vitkit.fast.kernels)."""
    run, flops = matmul_ceiling(config, batch, dtype, device)
    runs = {"ceiling (matmuls)": run}
    if dtype == torch.bfloat16 and device.type == "cpu":
        runs["ceiling (matmuls in fp32)"] = matmul_ceiling(config, batch, torch.float32, device)[0]
    return runs, flops


# Benchmarks --------------------------------------------------------------------------------------------
def candidates_for(
    model: VisionTransformer, dtype: torch.dtype, device: torch.device, compile_: bool, notes: list[str]
) -> dict[str, nn.Module]:
    vitkit = apply_fast_paths(copy.deepcopy(model), device, PRECISIONS[dtype])
    modules = {"vitkit": vitkit, **peers(model, notes)}
    modules = {name: m.to(device=device, dtype=dtype).eval() for name, m in modules.items()}
    if compile_:
        modules.update(
            {f"{name}+compile": torch.compile(m, dynamic=False) for name, m in list(modules.items())}
        )
    return modules


def check_same_outputs(modules: dict[str, nn.Module], images: torch.Tensor, dtype: torch.dtype) -> None:
    """The comparison is only fair if every candidate computes the same function."""
    with torch.inference_mode():
        reference = modules["vitkit"](images[:2]).float()
        for name, module in modules.items():
            error = (module(images[:2]).float() - reference).abs().max().item()
            tolerance = 0.05 if dtype == torch.bfloat16 else 1e-3
            if error > tolerance * max(reference.abs().max().item(), 1.0):
                raise RuntimeError(f"{name} differs from vitkit by {error:.3g}: not the same weights")


def ratio_column(results: dict[str, Result], name: str, speed: Callable[[Result], float]) -> str:
    peer_speeds = [speed(r) for n, r in results.items() if not n.startswith(("vitkit", "ceiling"))]
    if not peer_speeds or name.startswith("ceiling"):
        return ""
    return f"{speed(results[name]) / max(peer_speeds):.2f}x"


def bench_inference(args: argparse.Namespace, device: torch.device, notes: list[str]) -> list[str]:
    rows = [
        "| model | batch | dtype | candidate | img/s | vs best peer | % ceiling | MFU | "
        "latency b=1 (ms) | vs best peer | peak MB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in args.models:
        batch = INFERENCE_MODELS[variant]
        torch.manual_seed(0)
        model = create_model(variant, zero_head=False)
        flops_per_image = count(model.config).flops
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            modules = candidates_for(model, dtype, device, args.compile, notes)
            images = torch.randn(batch, 3, *model.config.img_size, device=device, dtype=dtype)
            check_same_outputs(modules, images, dtype)
            ceiling, ceiling_flops = ceilings(model.config, batch, dtype, device)
            with torch.inference_mode():
                runs = {name: functools.partial(m, images) for name, m in modules.items()}
                throughput = interleaved({**runs, **ceiling}, args.reps, device)
                single = images[:1]
                latency = interleaved(
                    {name: functools.partial(m, single) for name, m in modules.items()}, args.reps, device
                )
            add_fresh_peaks(args, device, throughput, "inference", variant, dtype_name)
            ceiling_time = min(throughput[name].median for name in ceiling)
            matmul_rate = ceiling_flops / ceiling_time
            for name, result in throughput.items():
                is_ceiling = name.startswith("ceiling")
                images_per_s = batch / result.median
                cells = [
                    variant,
                    str(batch),
                    dtype_name,
                    name,
                    f"{images_per_s:.1f}",
                    ratio_column(throughput, name, lambda r: 1 / r.median),
                    f"{100 * ceiling_time / result.median:.0f}%",
                    ""
                    if is_ceiling
                    else f"{100 * flops_per_image * batch / result.median / matmul_rate:.0f}%",
                    "" if is_ceiling else f"{1000 * latency[name].median:.1f}",
                    "" if is_ceiling else ratio_column(latency, name, lambda r: 1 / r.median),
                    "" if is_ceiling else megabytes(result.peak_mb),
                ]
                rows.append("| " + " | ".join(cells) + " |")
                if not is_ceiling:
                    mfu = flops_per_image * batch / result.median / matmul_rate
                    ROWS.append(
                        (f"{variant} inference, batch {batch}, img/s", name, dtype_name, images_per_s, mfu)
                    )
            print("\n".join(rows[-len(throughput) :]), flush=True)
            del modules
            fresh_compiler()
        del model
    return rows


def train_configs() -> dict[str, tuple[ViTConfig, int]]:
    tiny = create_model("Ti/16").config
    cifar = tiny.replace(img_size=32, patch_size=4, num_classes=10)
    return {"Ti/16 @224": (tiny, 32), "Ti/4 @32 (CIFAR)": (cifar, 128)}


def training_step(
    module: nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
) -> Callable[[], None]:
    """One step as a training loop runs it: autocast forward (bf16) or fp32, backward, fused AdamW."""
    # Fused AdamW for every candidate (vitkit trains with it; a peer's user can ask for it too).
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6, fused=True)

    def step() -> None:
        with torch.autocast(images.device.type, dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(module(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(args: argparse.Namespace, device: torch.device, notes: list[str]) -> list[str]:
    rows = [
        "| model | batch | precision | candidate | img/s | vs best peer | MFU | peak MB |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for label, (config, batch) in train_configs().items():
        torch.manual_seed(0)
        model = VisionTransformer(config.replace(zero_head=False))
        flops_per_image = 3 * count(config).flops  # forward + backward (2x)
        images = torch.randn(batch, 3, *config.img_size, device=device)
        labels = torch.randint(0, config.num_classes, (batch,), device=device)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            vitkit = apply_fast_paths(copy.deepcopy(model), device, dtype_name)
            modules = {"vitkit": vitkit, **peers(model, notes)}
            modules = {name: m.to(device).train() for name, m in modules.items()}
            if args.compile:
                modules.update(
                    {f"{name}+compile": torch.compile(m, dynamic=False) for name, m in list(modules.items())}
                )
            # Each candidate has its own AdamW; the weights barely move (lr 1e-6), the work is the same.
            steps = {name: training_step(m, images, labels, dtype) for name, m in modules.items()}
            ceiling, ceiling_flops = ceilings(config, batch, dtype, device)
            results = interleaved({**steps, **ceiling}, args.reps, device)
            matmul_rate = ceiling_flops / min(results.pop(name).median for name in ceiling)
            add_fresh_peaks(args, device, results, "training", label, dtype_name)
            for name, result in results.items():
                cells = [
                    label,
                    str(batch),
                    "fp32" if dtype == torch.float32 else f"{dtype_name} autocast",
                    name,
                    f"{batch / result.median:.1f}",
                    ratio_column(results, name, lambda r: 1 / r.median),
                    f"{100 * flops_per_image * batch / result.median / matmul_rate:.0f}%",
                    megabytes(result.peak_mb),
                ]
                rows.append("| " + " | ".join(cells) + " |")
                mfu = flops_per_image * batch / result.median / matmul_rate
                ROWS.append(
                    (
                        f"{label} training step, batch {batch}, img/s",
                        name,
                        dtype_name,
                        batch / result.median,
                        mfu,
                    )
                )
            print("\n".join(rows[-len(results) :]), flush=True)
            fresh_compiler()
    return rows


def fresh_compiler() -> None:
    """Forget every compiled graph. The models of one run share their forward functions' code, so
    without this the compile cache fills across models and dynamo falls back to eager for later ones
    (its recompile limit), which would time eager code under a "+compile" label."""
    torch._dynamo.reset()


def parallel_candidates(
    parallel: VisionTransformer, sequential: VisionTransformer, device: torch.device, precision: str
) -> dict[str, nn.Module]:
    """The 18x2 model fused and branch by branch (the same kernels, `forward_branches`), the 36x1 one,
    each with the fast paths of `device` and `precision`."""
    fused = apply_fast_paths(copy.deepcopy(parallel), device, precision)
    branches = copy.deepcopy(fused)
    for block in branches.blocks:
        block.forward = block.forward_branches  # the reference path, for comparison only
    sequential = apply_fast_paths(copy.deepcopy(sequential), device, precision)
    return {"18x2 fused": fused, "18x2 branch by branch": branches, "36x1 sequential": sequential}


def bench_parallel(args: argparse.Namespace, device: torch.device) -> list[str]:
    """ "Three things" #1: ViT-S 18x2 computed fused, branch by branch, and as the sequential 36x1, at
    batch 16 (throughput) and batch 1 (latency, inference)."""
    rows = [
        "| model | batch | dtype | mode | candidate | img/s | vs sequential 36x1 |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    batch = 8 if args.quick else 16
    torch.manual_seed(0)
    parallel = create_model("vit_small_patch16_18x2_224", zero_head=False)
    sequential = create_model("vit_small_patch16_36x1_224", zero_head=False)
    assert parallel.num_params() == sequential.num_params()
    labels = torch.randint(0, 1000, (batch,), device=device)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = parallel_candidates(parallel, sequential, device, dtype_name)
        images = torch.randn(batch, 3, 224, 224, device=device)
        for mode, size in (("inference", batch), ("inference", 1), ("training", batch)):
            if mode == "inference":
                modules = {n: copy.deepcopy(m).to(device, dtype).eval() for n, m in models.items()}
                runs = {
                    n: functools.partial(torch.inference_mode()(m), images[:size].to(dtype))
                    for n, m in modules.items()
                }
            else:
                modules = {n: copy.deepcopy(m).to(device).train() for n, m in models.items()}
                runs = {n: training_step(m, images, labels, dtype) for n, m in modules.items()}
            results = interleaved(runs, args.reps, device)
            reference = results["36x1 sequential"].median
            for name, result in results.items():
                cells = [
                    "S/16 36 blocks' parameters",
                    str(size),
                    dtype_name,
                    mode,
                    name,
                    f"{size / result.median:.1f}",
                    f"{reference / result.median:.2f}x",
                ]
                rows.append("| " + " | ".join(cells) + " |")
            print("\n".join(rows[-len(results) :]), flush=True)
    return rows


def peer_table(device: torch.device) -> list[str]:
    """Per work: the best peer configuration (any precision, compiled or not), vitkit as it chooses
    (the measured precision, eager: what its commands run) and its best configuration."""
    chosen, _ = choose_precision("auto", device)
    rows = [
        f"| work | best peer | vitkit as it chooses ({chosen}) | vs best peer | MFU | vitkit best | vs best peer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for work in dict.fromkeys(row[0] for row in ROWS):
        entries = [row for row in ROWS if row[0] == work]
        peers_ = [row for row in entries if not row[1].startswith("vitkit")]
        ours = [row for row in entries if row[1].startswith("vitkit")]
        choice = [row for row in ours if row[1] == "vitkit" and row[2] == chosen]
        if not peers_ or not choice:
            continue
        best_peer = max(peers_, key=lambda row: row[3])
        best_ours = max(ours, key=lambda row: row[3])
        cells = [
            work,
            f"{best_peer[3]:.1f} ({best_peer[1]} {best_peer[2]})",
            f"{choice[0][3]:.1f}",
            f"{choice[0][3] / best_peer[3]:.2f}x",
            f"{100 * choice[0][4]:.0f}%",
            f"{best_ours[3]:.1f} ({best_ours[1]} {best_ours[2]})",
            f"{best_ours[3] / best_peer[3]:.2f}x",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Ti/16 and B/16, 3 repetitions")
    parser.add_argument("--models", nargs="+", choices=list(INFERENCE_MODELS), default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="inductor freezing for every compiled inference candidate (weights as constants, "
        "prepacked for oneDNN on CPU)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["inference", "training", "parallel"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="peak memory column (fresh processes)",
    )
    parser.add_argument("--peak-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(*args.peak_child)
        return
    args.models = args.models or (["Ti/16", "B/16"] if args.quick else list(INFERENCE_MODELS))
    args.reps = args.reps or (3 if args.quick else 4)
    args.compile = bool(args.compile) or args.freezing
    if args.freezing:
        import torch._inductor.config as inductor_config

        # Applies to every candidate alike; inductor freezes graphs compiled in inference only.
        inductor_config.freezing = True
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # the process's allocator: every candidate alike (VITKIT_MALLOC=system: off)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every candidate
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# vitkit speed: torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, "
        f"{args.reps} interleaved repetitions (medians), compile={args.compile}, freezing={args.freezing}, "
        f"malloc keeps freed memory={kept}\n# {machine_summary()}\n"
    )
    measured = calibration() if device.type == "cpu" else None
    if measured is not None:
        print(f"# calibration: {measured.describe()}")
    print(f"# vitkit's choice: {' '.join(choose_precision('auto', device))}\n")
    notes: list[str] = []
    tables = []
    if "inference" not in args.skip:
        print("## Inference (224 px)\n")
        tables.append(bench_inference(args, device, notes))
    if "training" not in args.skip:
        print("\n## Training step (forward, cross-entropy, backward, AdamW)\n")
        tables.append(bench_training(args, device, notes))
    if "parallel" not in args.skip:
        print('\n## Parallel blocks ("Three things" #1), same parameters\n')
        tables.append(bench_parallel(args, device))
    for table in tables:
        print("\n" + "\n".join(table))
    print("\n## vitkit against the best peer\n\n" + "\n".join(peer_table(device)))
    for note in notes:
        print(f"\nnote: {note}")
    print(
        "\nnote: peak MB is the extra memory of one call or step above the process before it "
        "(CUDA allocator peak on a GPU; on CPU the peak-RSS rise in a fresh process)"
    )


if __name__ == "__main__":
    main()
