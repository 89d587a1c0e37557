"""`vitkit <command>`: each command is a thin call into the modules that own the work.

Commands register themselves in COMMANDS with a function that adds its arguments and a function that
runs it, so `vitkit --help` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .analysis.flops import count, human
from .registry import get_config, list_models

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


# vitkit info ------------------------------------------------------------------------------------------
def add_info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_base_patch16_384 or B/16")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None)


def run_info(args: argparse.Namespace) -> int:
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    config = get_config(args.name, **overrides)
    counts = count(config)
    print(
        f"{args.name} at {counts.img_size[0]}x{counts.img_size[1]}: width {config.embed_dim}, depth "
        f"{config.depth}, heads {config.num_heads}, MLP {config.mlp_dim}, stem {config.stem}, patch "
        f"{config.patch_size}, {config.num_tokens} tokens, {config.num_classes} classes"
    )
    print(f"parameters  {counts.params:,}")
    print(
        f"MACs        {counts.macs:,}  ({human(counts.macs)}MACs; the 'FLOPs' of timm/MMClassification tables)"
    )
    print(f"FLOPs       {counts.flops:,}  ({human(counts.flops)}FLOPs = 2 x MACs of matmuls + norm ops)")
    print("\n| component | parameters | MACs |\n|---|---:|---:|")
    for part in ("stem", "tokens", "attention", "mlp", "norms", "head"):
        params = counts.params_by_component.get(part, 0)
        macs = counts.macs_by_component.get(part, 0)
        print(f"| {part} | {params:,} | {macs:,} |")
    return 0


# vitkit zoo -------------------------------------------------------------------------------------------
def add_zoo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_base_*'")


def zoo_table(pattern: str = "*") -> str:
    rows = [
        "| model | resolution | params (M) | MACs (G) | width | depth | heads | patch | classes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list_models(pattern):
        config = get_config(name)
        counts = count(config)
        rows.append(
            f"| {name} | {config.img_size[0]} | {counts.params / 1e6:.2f} | {counts.macs / 1e9:.2f} | "
            f"{config.embed_dim} | {config.depth}x{config.parallel} | {config.num_heads} | "
            f"{config.patch_size if config.stem != 'hybrid' else 'R' + str(config.stride)} | {config.num_classes} |"
        )
    return "\n".join(rows)


def run_zoo(args: argparse.Namespace) -> int:
    print(zoo_table(args.pattern))
    return 0


# vitkit demo ------------------------------------------------------------------------------------------
def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_small_patch16_224", help="model to run on the demo image")
    parser.add_argument("--out", default="runs/demo", help="folder for the demo's files")


def run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .io import load, save
    from .registry import create_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(zoo_table("vit_*_patch16_*"))
    # A test card: a colour gradient with a bright square, so the demo needs no file.
    y, x = np.mgrid[0:224, 0:224]
    card = np.stack([x * 255 / 223, y * 255 / 223, np.full_like(x, 128.0)], axis=-1).astype(np.uint8)
    card[80:144, 80:144] = 255
    image_path = out / "test_card.png"
    Image.fromarray(card).save(image_path)

    torch.manual_seed(0)
    model = create_model(args.model, zero_head=False).eval()
    pixels = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float()
    pixels = (pixels / 255 - 0.5) / 0.5
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(pixels[None])
    elapsed = time.perf_counter() - start
    top = logits.softmax(-1)[0].topk(3)
    checkpoint = save(model, out / f"{args.model}.safetensors")
    same = torch.equal(load(checkpoint)(pixels[None]), logits)
    print(
        f"\n{args.model} (random init) on {image_path}: {elapsed * 1000:.0f} ms, top-3 classes "
        f"{top.indices.tolist()} with p={[round(p, 4) for p in top.values.tolist()]}"
    )
    print(f"saved {checkpoint}; reloaded model gives identical logits: {same}")
    return 0


COMMANDS: list[Command] = [
    ("info", add_info_args, run_info),
    ("zoo", add_zoo_args, run_zoo),
    ("demo", add_demo_args, run_demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision Transformers: train, convert, analyse."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and training do")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add_args, run in COMMANDS:
        command_parser = sub.add_parser(name, help=(run.__doc__ or "").strip().split("\n")[0] or None)
        add_args(command_parser)
        command_parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.run(args)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"vitkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
