"""Commands about the registered models themselves, no weights needed: info, zoo, draw."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.flops import count, human
from ..registry import get_config, list_models


# vitkit info --------------------------------------------------------------------------------------
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


# vitkit zoo ---------------------------------------------------------------------------------------
def add_zoo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_base_*'")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="MMClassification's columns: model, pretrain, resolution, params, FLOPs, top-1, top-5",
    )
    parser.add_argument(
        "--metafile", default=None, help="write the zoo metafile (JSON) here, e.g. docs/model-index.json"
    )


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
    """List the registered models with parameters and MACs; --markdown, --metafile for the zoo files."""
    if args.metafile or args.markdown:
        from ..analysis.zoo import markdown_table, write_metafile

        if args.metafile:
            print(f"wrote {write_metafile(args.metafile, args.pattern)}")
        if args.markdown:
            print(markdown_table(args.pattern))
        return 0
    print(zoo_table(args.pattern))
    return 0


# vitkit draw --------------------------------------------------------------------------------------
def add_draw_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_small_patch16_18x2_224 or B/16")
    parser.add_argument("--out", default=None, help="path without suffix (default: figures/<name>)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None)


def run_draw(args: argparse.Namespace) -> int:
    """Draw a variant's architecture with its sizes (PNG and SVG) and print its stages and parameters."""
    from ..analysis.draw import draw_architecture, summary

    overrides = {"img_size": args.img_size, "num_classes": args.num_classes}
    config = get_config(args.name, **{key: value for key, value in overrides.items() if value is not None})
    out = Path(args.out) if args.out else Path("figures") / args.name.replace("/", "_").replace("+", "_")
    print(summary(config, args.name))
    for path in draw_architecture(config, out, args.name):
        print(f"wrote {path}")
    return 0
