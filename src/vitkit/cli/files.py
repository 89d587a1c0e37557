"""Commands that write checkpoints in other formats: convert (layouts), export (ONNX)."""

from __future__ import annotations

import argparse

from .common import POSITIVE, int_in


# vitkit convert -----------------------------------------------------------------------------------
def add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file or folder in any layout (detected)")
    parser.add_argument(
        "dst", help="output: a file (.safetensors, .pth, .npz) or, for hf and siglip, a folder"
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=["vitkit", "timm", "hf", "npz", "mmpretrain", "siglip"],
        help="output layout",
    )
    parser.add_argument(
        "--from",
        dest="layout",
        default=None,
        choices=[
            "vitkit",
            "vit_jax",
            "big_vision",
            "timm",
            "hf",
            "dinov2",
            "dinov2_reg",
            "dinov3_vit",
            "siglip",
            "mmpretrain",
            "deit",
        ],
        help="force the source layout instead of detecting it",
    )
    parser.add_argument(
        "--num-heads", type=POSITIVE, default=None, help="heads, for widths not in the size table"
    )
    parser.add_argument(
        "--num-classes",
        type=int_in(0),
        default=None,
        help="classes of the head: a new zero-initialised head, or 0 for none (SigLIP's tower has none)",
    )
    parser.add_argument(
        "--img-size", type=int, default=None, help="resample position embeddings to this size"
    )
    parser.add_argument(
        "--keep-source-numerics",
        action="store_true",
        help="keep the source's GELU form, LayerNorm eps and position-embedding resampling",
    )
    parser.add_argument(
        "--drop-pre-logits", action="store_true", help="drop the ImageNet-21k pre-logits layer"
    )
    parser.add_argument("--non-strict", action="store_true", help="convert despite unused or missing keys")


def run_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between layouts: vitkit, timm, HF, vit_jax .npz, mmpretrain, SigLIP."""
    from ..convert import convert

    overrides = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    report = convert(
        args.src,
        args.dst,
        to=args.to,
        layout=args.layout,
        strict=not args.non_strict,
        keep_source_numerics=args.keep_source_numerics,
        pre_logits=not args.drop_pre_logits,
        progress=True,
        **overrides,
    )
    config = report.config
    print(
        f"read {args.src} as {report.source_layout}: width {config.embed_dim}, depth {config.depth}, heads "
        f"{config.num_heads}, stem {config.stem}, patch {config.patch_size}, {config.img_size[0]}x"
        f"{config.img_size[1]} px, {config.num_classes} classes"
    )
    print(
        f"wrote {report.path} ({report.target}, {report.num_tensors} tensors; converted back bitwise equal)"
    )
    return 0


# vitkit export ------------------------------------------------------------------------------------
def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="native vitkit checkpoint (.safetensors file or folder)")
    parser.add_argument("output", help="ONNX file to write, e.g. model.onnx")
    parser.add_argument(
        "--img-size", type=int, default=None, help="resolution of the graph (default: the checkpoint's)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--dynamic-size",
        dest="dynamic_size",
        action="store_true",
        default=True,
        help="height and width any multiple of the stride, where the model allows it (the default)",
    )
    size.add_argument(
        "--static-size",
        dest="dynamic_size",
        action="store_false",
        help="fix height and width to the checkpoint's (or --img-size)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX (dynamic batch and size, class names and preprocessing in its
    metadata), checked against PyTorch with onnxruntime."""
    from ..export import export_onnx
    from ..fast import apply_fast_paths
    from ..io import load, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint)
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model = apply_fast_paths(load(checkpoint, **overrides), "cpu", "fp32")
    export = export_onnx(
        model,
        args.output,
        check=not args.no_check,
        dynamic_size=args.dynamic_size,
        classes=checkpoint.classes,
    )
    metadata = export.metadata
    size = "x".join(map(str, model.config.img_size))
    channels, outputs = model.config.in_chans, metadata["output"]["shape"][1]
    if export.dynamic_size:
        shape = f"(batch, {channels}, height, width)"
        sizes = f"dynamic batch and size (multiples of {model.config.stride}; exported at {size})"
    else:
        shape = f"(batch, {channels}, {size})"
        sizes = f"dynamic batch, fixed size: {export.static_reason}"
    print(f"wrote {args.output}: images {shape} -> logits (batch, {outputs}), {sizes}")
    classes = f"{len(metadata['classes'])} class names" if "classes" in metadata else "no class names"
    preprocessing = "preprocessing" if "preprocessing" in metadata else "no preprocessing"
    print(f"metadata: {classes}, {preprocessing}, input layout NCHW, vitkit {metadata['version']}")
    if export.check is not None:
        print(export.check.describe())
    return 0
