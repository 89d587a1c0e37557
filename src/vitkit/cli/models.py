"""Commands about the registered models themselves, no weights needed: info, zoo, draw."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.conventions import CONVENTIONS, count_in, get_convention
from ..analysis.flops import count, human
from ..registry import get_config, list_models

CONVENTION_HELP = (
    "counting convention of the compute: "
    + "; ".join(f"{name}: {rule.published_as}" for name, rule in CONVENTIONS.items())
    + " (default: vitkit)"
)


def add_convention_arg(parser: argparse.ArgumentParser) -> None:
    # Checked by get_convention, not argparse choices, so a wrong name is one line listing the choices.
    parser.add_argument("--convention", default="vitkit", metavar="NAME", help=CONVENTION_HELP)


# vitkit info --------------------------------------------------------------------------------------
def add_info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_base_patch16_384 or B/16")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classes of the head (default: the model's)"
    )
    add_convention_arg(parser)


def run_info(args: argparse.Namespace) -> int:
    rule = get_convention(args.convention)
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    config = get_config(args.name, **overrides)
    convention = None if rule.name == "vitkit" else count_in(rule.name, config)
    counts = count(config)
    print(
        f"{args.name} at {counts.img_size[0]}x{counts.img_size[1]}: width {config.embed_dim}, depth "
        f"{config.depth}, heads {config.num_heads}, MLP {config.mlp_dim}, stem {config.stem}, patch "
        f"{config.patch_size}, {config.num_tokens} tokens, {config.num_classes} classes"
    )
    print(f"parameters  {counts.params:,}")
    if convention is not None:
        print(
            f"{rule.name:<11} {convention.total:,}  ({human(convention.total)}{rule.unit}; "
            f"{rule.published_as}: {rule.summary})"
        )
        print(f"vitkit MACs {counts.macs:,}  ({human(counts.macs)}MACs)")
        print(f"\n| component | parameters | {rule.name} {rule.unit} | vitkit MACs |\n|---|---:|---:|---:|")
    else:
        print(
            f"MACs        {counts.macs:,}  ({human(counts.macs)}MACs; --convention for other tables' counts)"
        )
        print(f"FLOPs       {counts.flops:,}  ({human(counts.flops)}FLOPs = 2 x MACs of matmuls + norm ops)")
        print("\n| component | parameters | MACs |\n|---|---:|---:|")
    for part in ("stem", "tokens", "attention", "mlp", "norms", "head"):
        params = counts.params_by_component.get(part, 0)
        macs = counts.macs_by_component.get(part, 0)
        other = "" if convention is None else f" {convention.by_component.get(part, 0):,} |"
        print(f"| {part} | {params:,} |{other} {macs:,} |")
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
    add_convention_arg(parser)


def zoo_table(pattern: str = "*", convention: str = "vitkit") -> str:
    from ..analysis.zoo import convention_figure

    rule = get_convention(convention)
    column = "MACs (G)" if rule.name == "vitkit" else f"{rule.name} {rule.unit} (G)"
    rows = [
        f"| model | resolution | params (M) | {column} | width | depth | heads | patch | classes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list_models(pattern):
        config = get_config(name)
        counts = count(config)
        figure = f"{counts.macs / 1e9:.2f}" if rule.name == "vitkit" else convention_figure(rule.name, name)
        rows.append(
            f"| {name} | {config.img_size[0]} | {counts.params / 1e6:.2f} | {figure} | "
            f"{config.embed_dim} | {config.depth}x{config.parallel} | {config.num_heads} | "
            f"{config.patch_size if config.stem != 'hybrid' else 'R' + str(config.stride)} | {config.num_classes} |"
        )
    return "\n".join(rows)


def run_zoo(args: argparse.Namespace) -> int:
    """List the registered models with parameters and MACs; --markdown, --metafile for the zoo files."""
    get_convention(args.convention)
    if not list_models(args.pattern):
        raise ValueError(f"no registered model matches {args.pattern!r} (`vitkit zoo` lists them all)")
    if args.metafile or args.markdown:
        from ..analysis.zoo import markdown_table, write_metafile

        if args.metafile:
            print(f"wrote {write_metafile(args.metafile, args.pattern)}")
        if args.markdown:
            print(markdown_table(args.pattern, convention=args.convention))
        return 0
    print(zoo_table(args.pattern, args.convention))
    return 0


# vitkit draw --------------------------------------------------------------------------------------
def add_draw_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_small_patch16_18x2_224 or B/16")
    parser.add_argument("--out", default=None, help="path without suffix (default: figures/<name>)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classes of the head (default: the model's)"
    )


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
