"""The zoo metafile, generated from code: every registered name with its counts, and known checkpoints.

For every name: parameters, MACs and FLOPs at its resolution (`analysis.flops.count`). For the
published checkpoints of a name: the accuracy, where it is published, and where the weights came
from. Only numbers copied from a named source are listed; `KNOWN_CHECKPOINTS` is the one place to add
more. `markdown_table` gives the columns of MMClassification's ViT table (model, pretrain,
resolution, params, FLOPs, top-1, top-5), whose "FLOPs" are multiply-accumulates.

The committed `docs/model-index.json` is the output of `vitkit zoo --metafile docs/model-index.json`;
a test regenerates it and fails when the two differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..io import atomic_write
from ..registry import get_config, list_models
from .flops import count

METAFILE_PATH = Path("docs") / "model-index.json"
MMPRETRAIN_METAFILE = (
    "https://github.com/open-mmlab/mmpretrain/blob/main/configs/vision_transformer/metafile.yml"
)
VIT_JAX_MODELS = "https://github.com/google-research/vision_transformer/blob/88a52f8892c80c10de99194990a517b4d80485fd/vit_jax/models.py#L208"


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint of a registered name, with its accuracy and provenance."""

    model: str  # the registered name whose config the checkpoint fits
    name: str  # the checkpoint's name where it is published
    pretrain: str
    dataset: str
    top1: float
    top5: float
    source: str  # where the accuracies are published
    weights: str
    converted_from: str  # the original weights the published ones were converted from
    code: str  # the original code those weights were trained with


def _mmpretrain(model: str, name: str, top1: float, top5: float, weights: str, original: str) -> Checkpoint:
    return Checkpoint(
        model=model,
        name=name,
        pretrain="ImageNet-21k",
        dataset="ImageNet-1k",
        top1=top1,
        top5=top5,
        source=MMPRETRAIN_METAFILE,
        weights=f"https://download.openmmlab.com/mmclassification/v0/vit/finetune/{weights}",
        converted_from=f"https://console.cloud.google.com/storage/browser/_details/vit_models/augreg/{original}",
        code=VIT_JAX_MODELS,
    )


# ImageNet-1k validation accuracy of the ViT paper's models fine-tuned at 384 from ImageNet-21k, as
# converted by MMClassification from the official release (their ViT table and metafile).
KNOWN_CHECKPOINTS: tuple[Checkpoint, ...] = (
    _mmpretrain(
        "vit_base_patch16_384",
        "vit-base-p16_in21k-pre_3rdparty_in1k-384px",
        85.43,
        97.77,
        "vit-base-p16_in21k-pre-3rdparty_ft-64xb64_in1k-384_20210928-98e8652b.pth",
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    ),
    _mmpretrain(
        "vit_base_patch32_384",
        "vit-base-p32_in21k-pre_3rdparty_in1k-384px",
        84.01,
        97.08,
        "vit-base-p32_in21k-pre-3rdparty_ft-64xb64_in1k-384_20210928-9cea8599.pth",
        "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    ),
    _mmpretrain(
        "vit_large_patch16_384",
        "vit-large-p16_in21k-pre_3rdparty_in1k-384px",
        85.63,
        97.63,
        "vit-large-p16_in21k-pre-3rdparty_ft-64xb64_in1k-384_20210928-b20ba619.pth",
        "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    ),
)


def checkpoints_of(model: str) -> list[Checkpoint]:
    return [checkpoint for checkpoint in KNOWN_CHECKPOINTS if checkpoint.model == model]


def metafile(pattern: str = "*", progress: bool = True) -> dict[str, Any]:
    """The metafile as plain data: {"models": [{name, config summary, counts, checkpoints}, ...]}.

    `macs` follow fvcore / MMClassification (their "FLOPs" column); `flops` count 2 per
    multiply-accumulate (see `analysis.flops`).
    """
    unknown = sorted({c.model for c in KNOWN_CHECKPOINTS} - set(list_models()))
    if unknown:
        raise KeyError(f"KNOWN_CHECKPOINTS name unregistered models: {unknown}")
    models = []
    for name in tqdm(list_models(pattern), desc="counting", disable=not progress):
        config = get_config(name)
        counts = count(config)
        models.append(
            {
                "name": name,
                "resolution": list(config.img_size),
                "patch_size": config.patch_size,
                "stem": config.stem,
                "embed_dim": config.embed_dim,
                "depth": config.depth,
                "parallel": config.parallel,
                "num_heads": config.num_heads,
                "num_classes": config.num_classes,
                "params": counts.params,
                "macs": counts.macs,
                "flops": counts.flops,
                "checkpoints": [
                    {key: value for key, value in asdict(c).items() if key != "model"}
                    for c in checkpoints_of(name)
                ],
            }
        )
    return {
        "generated_by": "vitkit zoo --metafile",
        "counting": "macs: multiply-accumulates of dense layers, convolutions and attention products, plus "
        "5 ops per element of each affine norm (fvcore / MMClassification 'FLOPs'); flops: 2 per "
        "multiply-accumulate plus the same norm ops",
        "models": models,
    }


def metafile_text(pattern: str = "*", progress: bool = True) -> str:
    return json.dumps(metafile(pattern, progress), indent=2) + "\n"


def write_metafile(path: str | os.PathLike = METAFILE_PATH, pattern: str = "*") -> Path:
    """Write the metafile as JSON, atomically."""
    text = metafile_text(pattern)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def markdown_table(pattern: str = "*", progress: bool = True) -> str:
    """MMClassification's ViT table columns for every matching name; one row per known checkpoint.

    Names without a published checkpoint get one row with '-' for pretrain and accuracy.
    """
    rows = [
        "| Model | Pretrain | resolution | Params(M) | Flops(G) | Top-1 (%) | Top-5 (%) |",
        "| :-- | :-- | :-: | --: | --: | --: | --: |",
    ]
    for entry in metafile(pattern, progress)["models"]:
        height, width = entry["resolution"]
        common = f"{height}x{width} | {entry['params'] / 1e6:.2f} | {entry['macs'] / 1e9:.2f}"
        checkpoints = entry["checkpoints"] or [{"pretrain": "-", "top1": "-", "top5": "-"}]
        for checkpoint in checkpoints:
            rows.append(
                f"| {entry['name']} | {checkpoint['pretrain']} | {common} | {checkpoint['top1']} | {checkpoint['top5']} |"
            )
    rows.append("")
    rows.append(
        "Flops(G) are multiply-accumulates, the MMClassification convention (`vitkit info NAME` gives "
        "MACs and FLOPs apart). Accuracies: ImageNet-1k validation, as published at the source named "
        "in docs/model-index.json."
    )
    return "\n".join(rows)
