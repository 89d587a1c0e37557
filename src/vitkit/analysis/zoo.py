"""The zoo metafile, generated from code: every registered name with its counts, and known checkpoints.

For every name: parameters, MACs and FLOPs at its resolution (`analysis.flops.count`), and `hub`, the
Hugging Face Hub name of its published weights (`registry.HUB_SOURCES`; what
`create_model(name, pretrained=True)` loads), or null. For the published checkpoints of a name: the
accuracy, where it is published, and where the weights came from. Only numbers copied from a named source are listed; `KNOWN_CHECKPOINTS` is the one place to add
more. `markdown_table` gives the columns of MMClassification's ViT table (model, pretrain,
resolution, params, FLOPs, top-1, top-5), with FLOPs in a counting convention of
`analysis.conventions`; `mmcls_0x_page` reprints the MMClassification 0.x ViT page in its own.

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

from ..files import atomic_write
from ..registry import HUB_SOURCES, get_config, list_models
from .conventions import CONVENTIONS, count_in, get_convention, num_params, undefined_for
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
    unknown = sorted(set(HUB_SOURCES) - set(list_models()))
    if unknown:
        raise KeyError(f"HUB_SOURCES name unregistered models: {unknown}")
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
                "hub": HUB_SOURCES.get(name),
                "checkpoints": [
                    {key: value for key, value in asdict(c).items() if key != "model"}
                    for c in checkpoints_of(name)
                ],
            }
        )
    return {
        "generated_by": "vitkit zoo --metafile",
        "counting": "macs: multiply-accumulates of dense layers, convolutions and attention products, the "
        "head included, plus 5 ops per element of each affine norm (vitkit's convention: fvcore's, as in "
        "mmpretrain 1.x metafiles, leaves out the pre-logits and head layers); flops: 2 per "
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


def markdown_table(pattern: str = "*", progress: bool = True, convention: str = "vitkit") -> str:
    """MMClassification's ViT table columns for every matching name; one row per known checkpoint.

    Flops(G) are counted in `convention` (`analysis.conventions`); for any other than vitkit's, a
    last column gives vitkit's MACs beside. `mmcls-0.x` reprints that page instead (`mmcls_0x_page`).
    Names without a published checkpoint get one row with '-' for pretrain and accuracy.
    """
    rule = get_convention(convention)
    if convention == "mmcls-0.x":
        return mmcls_0x_page(pattern)
    beside = convention != "vitkit"
    rows = [
        "| Model | Pretrain | resolution | Params(M) | Flops(G) | Top-1 (%) | Top-5 (%) |"
        + (" MACs(G), vitkit |" if beside else ""),
        "| :-- | :-- | :-: | --: | --: | --: | --: |" + (" --: |" if beside else ""),
    ]
    for entry in metafile(pattern, progress)["models"]:
        height, width = entry["resolution"]
        figure = count_in(convention, get_config(entry["name"])).total if beside else entry["macs"]
        common = f"{height}x{width} | {entry['params'] / 1e6:.2f} | {figure / 1e9:.2f}"
        checkpoints = entry["checkpoints"] or [{"pretrain": "-", "top1": "-", "top5": "-"}]
        for checkpoint in checkpoints:
            rows.append(
                f"| {entry['name']} | {checkpoint['pretrain']} | {common} | {checkpoint['top1']} | {checkpoint['top5']} |"
                + (f" {entry['macs'] / 1e9:.2f} |" if beside else "")
            )
    rows.append("")
    if beside:
        counted = f"Flops(G): {convention} convention ({rule.published_as}; {rule.unit}): {rule.summary}."
    else:
        counted = (
            "Flops(G) are vitkit's multiply-accumulates (`vitkit info NAME` gives MACs and FLOPs apart; "
            "`--convention` the figures of other tables)."
        )
    rows.append(
        f"{counted} Accuracies: ImageNet-1k validation, as published at the source named in "
        "docs/model-index.json."
    )
    return "\n".join(rows)


# The MMClassification 0.x ViT page ------------------------------------------------------------------
MMCLS_0X_VIT_PAGE = (
    "https://github.com/open-mmlab/mmclassification/blob/v0.25.0/configs/vision_transformer/README.md"
)


@dataclass(frozen=True)
class PageRow:
    """A row of the MMClassification 0.x ViT page: what it states, and which models its figures are of."""

    label: str  # the page's model column
    table: str  # "ImageNet-21k" (pre-trained models) or "ImageNet-1k" (fine-tuned from ImageNet-21k)
    resolution: int  # what the page's resolution column states
    model: str  # the registered name of the row's model at that resolution
    counted: str  # the registered name whose counts the page prints for the row
    checkpoint: str | None = None  # a KNOWN_CHECKPOINTS name, for the accuracies
    top1: float | None = None  # accuracies the page publishes for a checkpoint not in KNOWN_CHECKPOINTS
    top5: float | None = None


# From v0.20 the pre-trained rows state 224x224 beside the figures of the 384-px fine-tuned models,
# and the IPU row (fine-tuned at 224) repeats them too.
MMCLS_0X_VIT_ROWS: tuple[PageRow, ...] = (
    PageRow("ViT-B16*", "ImageNet-21k", 224, "vit_base_patch16_224_in21k", "vit_base_patch16_384"),
    PageRow("ViT-B32*", "ImageNet-21k", 224, "vit_base_patch32_224_in21k", "vit_base_patch32_384"),
    PageRow("ViT-L16*", "ImageNet-21k", 224, "vit_large_patch16_224_in21k", "vit_large_patch16_384"),
    PageRow(
        "ViT-B16*",
        "ImageNet-1k",
        384,
        "vit_base_patch16_384",
        "vit_base_patch16_384",
        "vit-base-p16_in21k-pre_3rdparty_in1k-384px",
    ),
    PageRow(
        "ViT-B32*",
        "ImageNet-1k",
        384,
        "vit_base_patch32_384",
        "vit_base_patch32_384",
        "vit-base-p32_in21k-pre_3rdparty_in1k-384px",
    ),
    PageRow(
        "ViT-L16*",
        "ImageNet-1k",
        384,
        "vit_large_patch16_384",
        "vit_large_patch16_384",
        "vit-large-p16_in21k-pre_3rdparty_in1k-384px",
    ),
    PageRow(
        "ViT-B16 (IPU)",
        "ImageNet-1k",
        224,
        "vit_base_patch16_224",
        "vit_base_patch16_384",
        top1=81.22,
        top5=95.56,
    ),
)


def page_accuracy(row: PageRow) -> tuple[float, float] | None:
    if row.checkpoint is None:
        return None if row.top1 is None else (row.top1, row.top5)
    (checkpoint,) = [c for c in KNOWN_CHECKPOINTS if c.name == row.checkpoint]
    return checkpoint.top1, checkpoint.top5


def page_figures(row: PageRow) -> dict[str, Any]:
    """A row's printed figures recomputed in the page's convention, and its own model's counts."""
    printed, own = get_config(row.counted), get_config(row.model)
    return {
        "params": num_params(printed),
        "macs": count_in("mmcls-0.x", printed).total,
        "counted_at": printed.img_size,
        "own_params": num_params(own),
        "own_macs": count_in("mmcls-0.x", own).total,
        "own_vitkit_macs": count_in("vitkit", own).total,
        "own_at": own.img_size,
    }


def mmcls_0x_page(pattern: str = "*") -> str:
    """The page's two tables, recomputed: Params(M) and Flops(G) as printed (in its convention), the
    model and resolution they are of, and the row's own model at the stated resolution beside,
    counted in the page's convention and in vitkit MACs. `pattern` selects rows by `model`."""
    rule = CONVENTIONS["mmcls-0.x"]
    selected = [row for row in MMCLS_0X_VIT_ROWS if row.model in set(list_models(pattern))]
    own = "the row's model at the stated resolution | Params(M) | Flops(G), mmcls-0.x | MACs(G), vitkit |"
    tables = {
        "ImageNet-21k": (
            "ImageNet-21k: pre-trained models (no evaluation results on the page)",
            "| Model | resolution | Params(M) | Flops(G) | figures of | " + own,
            "| :-- | :-: | --: | --: | :-- | :-- | --: | --: | --: |",
        ),
        "ImageNet-1k": (
            "ImageNet-1k: fine-tuned from ImageNet-21k",
            "| Model | Pretrain | resolution | Params(M) | Flops(G) | Top-1 (%) | Top-5 (%) | figures of | "
            + own,
            "| :-- | :-- | :-: | --: | --: | --: | --: | :-- | :-- | --: | --: | --: |",
        ),
    }
    out = [
        f"MMClassification 0.x ViT page ({MMCLS_0X_VIT_PAGE}), recomputed. Params(M) and Flops(G) are "
        f"what the page prints, in its convention (mmcls-0.x, {rule.unit}: {rule.summary}); 'figures of' "
        "names the model and resolution they are of; the last columns count each row's own model at the "
        "resolution the page states.",
    ]
    for table, (title, header, rule_line) in tables.items():
        rows = [row for row in selected if row.table == table]
        if not rows:
            continue
        out += ["", f"{title}:", "", header, rule_line]
        for row in rows:
            figures = page_figures(row)
            res = f"{row.resolution}x{row.resolution}"
            printed = f"{figures['params'] / 1e6:.2f} | {figures['macs'] / 1e9:.2f}"
            accuracy = page_accuracy(row)
            if table == "ImageNet-1k":
                top1, top5 = accuracy if accuracy else ("-", "-")
                printed = f"{printed} | {top1} | {top5}"
                res = f"ImageNet-21k | {res}"
            counted_at = "x".join(map(str, figures["counted_at"]))
            own_at = "x".join(map(str, figures["own_at"]))
            out.append(
                f"| {row.label} | {res} | {printed} | {row.counted} at {counted_at} | {row.model} at "
                f"{own_at} | {figures['own_params'] / 1e6:.2f} | {figures['own_macs'] / 1e9:.2f} | "
                f"{figures['own_vitkit_macs'] / 1e9:.2f} |"
            )
    out += [
        "",
        "Flops(G) are multiply-accumulates. vitkit MACs count self-attention and the head as well "
        "(`vitkit info NAME --convention C` for any convention).",
    ]
    return "\n".join(out)


def convention_figure(convention: str, name: str) -> str:
    """A registered name's compute in `convention`, in G, or 'n/a' where the convention is undefined."""
    config = get_config(name)
    if undefined_for(convention, config):
        return "n/a"
    return f"{count_in(convention, config).total / 1e9:.2f}"
