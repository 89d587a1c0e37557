"""How a checkpoint expects its images, as timm's `pretrained_cfg` and HuggingFace's image
processors record it: input size, resize mode, interpolation, mean and std.

A loaded model carries one (`model.preprocessing`), with `source` saying where it came from: the
training run's data config, the checkpoint's own record (an HF folder's `preprocessor_config.json`,
vitkit's metadata), or the documented default of the checkpoint's layout. `vitkit.data.eval_transform`
turns it into the eval transform that `predict`, `eval`, `fewshot`, `finetune` and `plot` use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

EvalResize = Literal["crop", "squash"]
Interpolation = Literal["bicubic", "bilinear"]

VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)  # the official ViT code maps pixels to [-1, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# HuggingFace's `resample` codes (PIL's): what vitkit computes for each, None where it has no match.
HF_RESAMPLE: dict[int, Interpolation | None] = {
    0: None,
    1: None,
    2: "bilinear",
    3: "bicubic",
    4: None,
    5: None,
}
HF_RESAMPLE_CODE: dict[str, int] = {"bilinear": 2, "bicubic": 3}
# The fields a user may override (`--set preprocessing.mean=...`, `--mean`, ...).
FIELDS = ("img_size", "eval_resize", "crop_pct", "interpolation", "mean", "std")


@dataclass(frozen=True)
class Preprocessing:
    """uint8 image -> model input at evaluation. "squash" resizes both sides to img_size (the
    official ViT code, HF's ViTImageProcessor); "crop" resizes the shorter side to
    floor(img_size / crop_pct) and takes the central img_size window (timm, DeiT, DINOv2)."""

    img_size: tuple[int, int] = (224, 224)
    eval_resize: EvalResize = "squash"
    crop_pct: float = 0.875
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = VIT_MEAN
    std: tuple[float, float, float] = VIT_STD
    # Where these values came from, for the log ("preprocessor_config.json", "the vit_jax default").
    source: str = field(default="vitkit's default", compare=False)

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 1 << 14 for s in size)
        ):
            raise ValueError(
                f"preprocessing img_size={self.img_size!r}: expected one or two integers in [1, 16384]"
            )
        object.__setattr__(self, "img_size", tuple(size))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (
                isinstance(values, (tuple, list))
                and len(values) == 3
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values
                )
            ):
                raise ValueError(f"preprocessing {name}={values!r}: expected three finite numbers")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(v <= 0 for v in self.std):
            raise ValueError(f"preprocessing std={self.std}: every value must be positive")
        if self.eval_resize not in get_args(EvalResize):
            raise ValueError(
                f"preprocessing eval_resize={self.eval_resize!r}: expected one of {get_args(EvalResize)}"
            )
        if self.interpolation not in get_args(Interpolation):
            raise ValueError(
                f"preprocessing interpolation={self.interpolation!r}: expected one of {get_args(Interpolation)}"
            )
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.05 <= crop <= 1.0:
            raise ValueError(f"preprocessing crop_pct={crop!r}: expected a number in [0.05, 1]")
        object.__setattr__(self, "crop_pct", float(crop))
        if self.eval_resize == "crop" and self.img_size[0] != self.img_size[1]:
            raise ValueError(f"preprocessing img_size={self.img_size}: a centre crop needs a square size")

    def replace(self, **changes: Any) -> Preprocessing:
        unknown = sorted(set(changes) - set(FIELDS) - {"source"})
        if unknown:
            raise ValueError(f"preprocessing has no field {unknown[0]!r}; fields: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields, JSON-ready (what vitkit's checkpoints record under `vitkit.preprocessing`)."""
        values = {name: getattr(self, name) for name in FIELDS}
        values["img_size"] = list(self.img_size)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    @property
    def resize_to(self) -> int:
        """The shorter side before the centre crop ("crop" mode), as timm computes it."""
        return math.floor(self.img_size[0] / self.crop_pct)

    def describe(self) -> str:
        size = "x".join(map(str, self.img_size))
        resize = (
            f"squash to {size}"
            if self.eval_resize == "squash"
            else f"shorter side {self.resize_to}, crop {size}"
        )
        numbers = lambda values: "(" + ", ".join(f"{v:g}" for v in values) + ")"
        return f"{resize}, {self.interpolation}, mean {numbers(self.mean)}, std {numbers(self.std)} [{self.source}]"


def from_record(record: Any, source: str) -> Preprocessing:
    """A recorded preprocessing or data config (a dict of DataConfig or Preprocessing fields;
    other keys are ignored) -> Preprocessing. Raises ValueError naming the bad field."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    values = {name: record[name] for name in FIELDS if name in record}
    return Preprocessing(**values, source=source)


def from_timm_config(pretrained_cfg: Any, source: str = "config.json: pretrained_cfg") -> Preprocessing:
    """timm's `pretrained_cfg` (the config.json timm publishes beside its weights on the Hub) ->
    Preprocessing: input_size, crop_mode ("center" crops, "squash" resizes both sides), crop_pct,
    interpolation, mean, std. What vitkit cannot compute the same way is refused, naming the key."""
    if not isinstance(pretrained_cfg, dict):
        raise ValueError(f"{source}: expected a JSON object, found {type(pretrained_cfg).__name__}")
    input_size = pretrained_cfg.get("input_size", [3, 224, 224])
    if not (isinstance(input_size, list) and len(input_size) == 3):
        raise ValueError(f"{source}: input_size={input_size!r}: expected [channels, height, width]")
    crop_mode = pretrained_cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"{source}: crop_mode={crop_mode!r}: vitkit crops the centre or squashes only")
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    if interpolation not in get_args(Interpolation):
        raise ValueError(
            f"{source}: interpolation={interpolation!r}: vitkit resizes bilinear or bicubic only"
        )
    crop_pct = _hf_number(pretrained_cfg.get("crop_pct", 0.875), "crop_pct", source)
    return Preprocessing(
        tuple(input_size[1:]),
        "crop" if crop_mode == "center" else "squash",
        min(crop_pct, 1.0),
        interpolation,
        _hf_triple(pretrained_cfg.get("mean", IMAGENET_MEAN), "mean", source),
        _hf_triple(pretrained_cfg.get("std", IMAGENET_STD), "std", source),
        source=source,
    )


def from_hf_processor(processor: Any, source: str = "preprocessor_config.json") -> Preprocessing:
    """An HF image processor config (ViTImageProcessor, BitImageProcessor, CLIPImageProcessor,
    SiglipImageProcessor, DeiTImageProcessor, ...) -> Preprocessing. What vitkit cannot compute the
    same way (another rescale factor, a lanczos resize, a fixed-size resize before the crop) is
    refused, naming the key."""
    if not isinstance(processor, dict):
        raise ValueError(f"{source}: expected a JSON object, found {type(processor).__name__}")
    mean, std = _hf_normalization(processor, source)
    code = processor.get("resample", 2)
    interpolation = HF_RESAMPLE.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if interpolation is None:
        raise ValueError(f"{source}: resample={code!r}: vitkit resizes bilinear (2) or bicubic (3) only")
    size = _hf_size(processor.get("size", {"height": 224, "width": 224}), "size", source)
    if processor.get("do_center_crop", False):
        side, crop_pct = _hf_center_crop(processor, size, source)
        preprocessing = Preprocessing(
            (side, side), "crop", min(crop_pct, 1.0), interpolation, mean, std, source=source
        )
        if "shortest_edge" in size and preprocessing.resize_to != size["shortest_edge"]:
            raise ValueError(
                f"{source}: shortest_edge {size['shortest_edge']} with crop {side} is not floor(crop / "
                "crop_pct) for any crop_pct vitkit can express"
            )
        return preprocessing
    if "shortest_edge" in size:
        side = size["shortest_edge"]
        return Preprocessing((side, side), "crop", 1.0, interpolation, mean, std, source=source)
    if set(size) != {"height", "width"}:
        raise ValueError(f"{source}: size={size}: expected height and width, or shortest_edge")
    img_size = (size["height"], size["width"])
    return Preprocessing(img_size, "squash", 0.875, interpolation, mean, std, source=source)


def _hf_number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {key}={value!r}: expected a number")
    return float(value)


def _hf_size(value: Any, key: str, source: str) -> dict[str, int]:
    """An HF size: an int, or a dict such as {'height': 224, 'width': 224} or {'shortest_edge': 256}."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value}
    integers = isinstance(value, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value.values()
    )
    if not value or not integers:
        raise ValueError(
            f"{source}: {key}={value!r}: expected a size such as {{'height': 224, 'width': 224}}"
        )
    return value


def _hf_triple(values: Any, key: str, source: str) -> tuple[float, float, float]:
    """`image_mean` / `image_std`: one number for all channels, or three."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * 3
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{source}: {key}={values!r}: expected three numbers")
    return tuple(_hf_number(v, key, source) for v in values)


def _hf_normalization(processor: dict, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on pixels scaled to 0..1, from the rescale and normalize keys."""
    rescale = processor.get("rescale_factor", 1 / 255)
    do_rescale = processor.get("do_rescale", True)
    if do_rescale and not math.isclose(_hf_number(rescale, "rescale_factor", source), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"{source}: rescale_factor={rescale}: vitkit rescales pixels by 1/255 only")
    if processor.get("do_normalize", True):
        mean = _hf_triple(processor.get("image_mean", list(VIT_MEAN)), "image_mean", source)
        std = _hf_triple(processor.get("image_std", list(VIT_STD)), "image_std", source)
    else:
        mean, std = (0.0,) * 3, (1.0,) * 3
    if not do_rescale:
        # Pixels stay in 0..255: the same as rescaling and dividing the std by 255.
        mean, std = tuple(m * 255 for m in mean), tuple(s * 255 for s in std)
    return mean, std


def _hf_center_crop(processor: dict, size: dict[str, int], source: str) -> tuple[int, float]:
    """(crop side, crop_pct) of a processor that resizes the shorter side and then crops the centre."""
    crop = _hf_size(processor.get("crop_size", {"height": 224, "width": 224}), "crop_size", source)
    if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
        raise ValueError(f"{source}: crop_size={crop}: vitkit crops square windows only")
    side = crop["height"]
    if "shortest_edge" in size and processor.get("do_resize", True):
        return side, side / size["shortest_edge"]
    if processor.get("crop_pct") is not None:
        return side, _hf_number(processor["crop_pct"], "crop_pct", source)
    kind = processor.get("image_processor_type", "an image processor")
    raise ValueError(
        f"{source}: {kind} resizes to {size} before its centre crop; vitkit resizes the "
        "shorter side (size={'shortest_edge': N}) only"
    )


def to_hf_processor(preprocessing: Preprocessing) -> dict[str, Any]:
    """Preprocessing -> an HF `preprocessor_config.json` that transformers reads back to the same
    values: ViTImageProcessor for "squash", BitImageProcessor (shorter side, then crop) for "crop"."""
    common = {
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(preprocessing.mean),
        "image_std": list(preprocessing.std),
        "resample": HF_RESAMPLE_CODE[preprocessing.interpolation],
        "do_resize": True,
    }
    height, width = preprocessing.img_size
    if preprocessing.eval_resize == "squash":
        return {
            "image_processor_type": "ViTImageProcessor",
            **common,
            "size": {"height": height, "width": width},
        }
    return {
        "image_processor_type": "BitImageProcessor",
        **common,
        "size": {"shortest_edge": preprocessing.resize_to},
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_convert_rgb": True,
    }


# Documented defaults of each layout, used when a checkpoint records nothing.
_CROP = {"eval_resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic"}
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    # vit_jax and big_vision map pixels to [-1, 1] and resize the whole image.
    "vit_jax": {"eval_resize": "squash", "interpolation": "bilinear", "mean": VIT_MEAN, "std": VIT_STD},
    "big_vision": {"eval_resize": "squash", "interpolation": "bilinear", "mean": VIT_MEAN, "std": VIT_STD},
    # HF's ViTImageProcessor defaults.
    "hf": {"eval_resize": "squash", "interpolation": "bilinear", "mean": VIT_MEAN, "std": VIT_STD},
    # timm's ImageNet models and DeiT: shorter side 256, crop 224, ImageNet statistics.
    "timm": {**_CROP, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "deit": {**_CROP, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "dinov2": {**_CROP, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "dinov2_reg": {**_CROP, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    # SiglipImageProcessor: both sides to the size, bicubic, [-1, 1].
    "siglip": {"eval_resize": "squash", "interpolation": "bicubic", "mean": VIT_MEAN, "std": VIT_STD},
    # DINOv3's processor: both sides to the size, bilinear, ImageNet statistics.
    "dinov3_vit": {
        "eval_resize": "squash",
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    # mmpretrain's ViTs converted from the official code keep its [-1, 1] mapping.
    "mmpretrain": {**_CROP, "mean": VIT_MEAN, "std": VIT_STD},
}


def layout_default(layout: str, img_size: tuple[int, int]) -> Preprocessing:
    """The documented default preprocessing of a layout at the model's size."""
    values = LAYOUT_DEFAULTS.get(layout)
    if values is None:
        return Preprocessing(img_size, source="vitkit's default")
    return Preprocessing(img_size, **values, source=f"the {layout} layout's default")


def preprocessing_of(model: Any) -> Preprocessing:
    """What a loaded model's checkpoint says about its input (`model.preprocessing`); vitkit's
    default (squash to the model's size, mean = std = 0.5) for a model built in code."""
    preprocessing = getattr(model, "preprocessing", None)
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    return Preprocessing(tuple(model.config.img_size))
