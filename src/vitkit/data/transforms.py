"""Train and eval transforms on tensors, without torchvision.

Images are uint8 RGB tensors (3, H, W) until `Normalize` turns them into float; only
`RandomErasing` runs after it, as in timm. Every transform is called as `t(image, generator)`:
random ones draw from `generator` (torch's global RNG when it is None), so a seeded generator
reproduces an augmentation exactly. `build_transforms(cfg, train)` assembles the pipelines of the
ViT paper (inception crop + flip; "squash" or resize + centre-crop eval), DeiT (RandAugment
rand-m9-mstd0.5-inc1, random erasing) and DeiT III (3-Augment + colour jitter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The ViT normalisation is DataConfig's default, so it lives with it; re-exported here beside ImageNet's.
from vitkit.data.config import VIT_MEAN, VIT_STD, DataConfig, Interpolation

Generator = torch.Generator | None


def _uniform(low: float, high: float, generator: Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: Generator) -> int:
    """Uniform in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator).item())


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.round().clamp_(0, 255).to(torch.uint8)


PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


# Geometry -----------------------------------------------------------------------------------------


def resize(
    image: torch.Tensor, size: tuple[int, int], interpolation: Interpolation = "bicubic"
) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, *size), computed by PIL as timm (through torchvision) and HF's image
    processors compute it, so a checkpoint sees the pixels its reference pipeline gives."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    height, width = size
    pixels = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    resized = pixels.resize((width, height), resample=PIL_RESAMPLE[interpolation], reducing_gap=None)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def resize_shorter(image: torch.Tensor, size: int, interpolation: Interpolation = "bicubic") -> torch.Tensor:
    """Shorter side to `size`, aspect ratio kept (the longer side rounds down, as torchvision)."""
    height, width = image.shape[-2:]
    if height <= width:
        return resize(image, (size, int(size * width / height)), interpolation)
    return resize(image, (int(size * height / width), size), interpolation)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window (offsets rounded as torchvision); zero-padded if too small."""
    height, width = image.shape[-2:]
    if height < size or width < size:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        image = F.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    return image[:, top : top + size, left : left + size]


def affine(
    image: torch.Tensor,
    matrix: Sequence[float],
    fill: Sequence[int],
    interpolation: Interpolation = "bicubic",
) -> torch.Tensor:
    """PIL's `Image.transform(AFFINE, matrix)`: output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f); outside the input the colour is `fill`."""
    a, b, c, d, e, f = matrix
    height, width = image.shape[-2:]
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    source_x, source_y = a * x + b * y + c, d * x + e * y + f
    # grid_sample's coordinates run from -1 (left edge of the first pixel) to 1 (right edge of the last).
    grid = torch.stack((2 * source_x / width - 1, 2 * source_y / height - 1), dim=-1)[None]
    # A channel of ones tells how much of each output pixel came from inside the input.
    with_mask = torch.cat((image.float(), torch.ones((1, height, width))))[None]
    sampled = F.grid_sample(
        with_mask, grid.float(), mode=interpolation, padding_mode="zeros", align_corners=False
    )[0]
    rgb, inside = sampled[:3], sampled[3:]
    return _to_uint8(rgb + (1 - inside) * torch.tensor(fill, dtype=torch.float32)[:, None, None])


def rotate(
    image: torch.Tensor, degrees: float, fill: Sequence[int], interpolation: Interpolation
) -> torch.Tensor:
    """Counter-clockwise about the centre, as PIL's `Image.rotate`."""
    height, width = image.shape[-2:]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    center_x, center_y = width / 2, height / 2
    # Inverse map: rotate each output position clockwise (y points down) about the centre.
    matrix = (
        cos,
        -sin,
        center_x - cos * center_x + sin * center_y,
        sin,
        cos,
        center_y - sin * center_x - cos * center_y,
    )
    return affine(image, matrix, fill, interpolation)


# Colour -----------------------------------------------------------------------------------------


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's "L"), uint8 (1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    return _to_uint8((image.float() * weights).sum(0, keepdim=True))


def blend(image: torch.Tensor, degenerate: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ImageEnhance: factor 1 gives `image`, 0 gives `degenerate`, beyond 1 extrapolates."""
    return _to_uint8(degenerate.float() + factor * (image.float() - degenerate.float()))


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(image, torch.zeros_like(image), factor)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(image, grayscale(image).float().mean(), factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(image, grayscale(image), factor)


def adjust_sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5); border pixels stay as they are."""
    kernel = torch.ones((3, 1, 3, 3))
    kernel[:, :, 1, 1] = 5
    smooth = image.float().clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(image.float()[None], kernel / kernel[0].sum(), groups=3)[0]
    return blend(image, _to_uint8(smooth), factor)


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255 (channels with a single value stay), PIL's lookup table."""
    channels = []
    for channel in image:
        low, high = channel.min().item(), channel.max().item()
        if high <= low:
            channels.append(channel)
            continue
        scale = 255.0 / (high - low)
        lut = (torch.arange(256, dtype=torch.float64) * scale - low * scale).trunc().clamp(0, 255)
        channels.append(lut.to(torch.uint8)[channel.long()])
    return torch.stack(channels)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel, PIL's `ImageOps.equalize` algorithm."""
    channels = []
    for channel in image:
        histogram = torch.bincount(channel.flatten().long(), minlength=256)
        nonzero = histogram[histogram != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            channels.append(channel)
            continue
        lut = (torch.cumsum(histogram, 0) + step // 2) // step
        lut = torch.cat((torch.zeros(1, dtype=lut.dtype), lut[:-1])).clamp(0, 255)
        channels.append(lut[channel.long()].to(torch.uint8))
    return torch.stack(channels)


def invert(image: torch.Tensor) -> torch.Tensor:
    return 255 - image


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the `bits` most significant bits of each value."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return image & mask


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the values >= threshold (256 inverts none)."""
    # Compare as int: a uint8 comparison would wrap threshold 256 to 0 and invert everything.
    return torch.where(image.int() >= threshold, 255 - image, image)


def solarize_add(image: torch.Tensor, add: int, threshold: int = 128) -> torch.Tensor:
    """Add `add` to the values < threshold (saturating)."""
    return torch.where(image.int() < threshold, (image.int() + add).clamp(max=255).to(torch.uint8), image)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian, 3 sigma each side, edges replicated (as PIL's GaussianBlur(radius=sigma))."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).expand(3, 1, -1)
    blurred = F.pad(image.float()[None], (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(blurred, kernel[:, :, None, :], groups=3)
    blurred = F.conv2d(blurred, kernel[:, :, :, None], groups=3)
    return _to_uint8(blurred[0])


# Transforms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomResizedCrop:
    """Inception crop: a random area fraction in `scale` and log-uniform aspect ratio in `ratio`,
    resized to size x size (torchvision's sampler: 10 tries, then a centre crop with clamped ratio)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bicubic"

    def box(self, height: int, width: int, generator: Generator = None) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            crop_width = int(round(math.sqrt(target_area * aspect)))
            crop_height = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = _randint(0, height - crop_height + 1, generator)
                left = _randint(0, width - crop_width + 1, generator)
                return top, left, crop_height, crop_width
        aspect = width / height
        if aspect < min(self.ratio):
            crop_width, crop_height = width, int(round(width / min(self.ratio)))
        elif aspect > max(self.ratio):
            crop_height, crop_width = height, int(round(height * max(self.ratio)))
        else:
            crop_height, crop_width = height, width
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        top, left, crop_height, crop_width = self.box(*image.shape[-2:], generator)
        crop = image[:, top : top + crop_height, left : left + crop_width]
        return resize(crop, (self.size, self.size), self.interpolation)


@dataclass(frozen=True)
class RandomPadCrop:
    """The classic CIFAR crop: zero-pad each side by `padding` pixels, then a random size x size window
    (shifts of up to `padding` pixels, no rescaling)."""

    size: int
    padding: int = 4

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        padded = F.pad(image, (self.padding,) * 4)
        top = _randint(0, padded.shape[-2] - self.size + 1, generator)
        left = _randint(0, padded.shape[-1] - self.size + 1, generator)
        return padded[:, top : top + self.size, left : left + self.size]


def crop_batch(
    images: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, flips: torch.Tensor, size: int
) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): image i's window at (tops[i], lefts[i]), mirrored where
    flips[i]; one gather for the whole batch instead of B Python-level crops."""
    batch, channels, _, width = images.shape
    offsets = torch.arange(size)
    rows = tops[:, None] + offsets  # (B, size)
    columns = lefts[:, None] + offsets
    columns = torch.where(flips[:, None], columns.flip(1), columns)
    # Flat pixel index of each output pixel, the same for every channel: (B, C, size * size).
    pixels = (rows[:, :, None] * width + columns[:, None, :]).reshape(batch, 1, -1)
    gathered = images.flatten(2).gather(2, pixels.expand(-1, channels, -1))
    return gathered.reshape(batch, channels, size, size)


def pad_crop_flip_batch(
    images: torch.Tensor, size: int, padding: int, hflip: float, generator: Generator = None
) -> torch.Tensor:
    """`RandomPadCrop` then `RandomHorizontalFlip` on a whole uint8 batch (B, 3, H, W) -> (B, 3, size, size)."""
    padded = F.pad(images, (padding,) * 4)
    batch, _, height, width = padded.shape
    if height < size or width < size:
        raise ValueError(f"pad_crop_flip_batch: images {tuple(images.shape)} padded by {padding} < {size}")
    tops = torch.randint(0, height - size + 1, (batch,), generator=generator)
    lefts = torch.randint(0, width - size + 1, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < hflip
    return crop_batch(padded, tops, lefts, flips, size)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    prob: float = 0.5

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        return image.flip(-1) if torch.rand((), generator=generator) < self.prob else image


@dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast and saturation factors uniform in [1 - s, 1 + s], applied in random
    order (torchvision's ColorJitter without hue)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        adjustments = (
            (adjust_brightness, self.brightness),
            (adjust_contrast, self.contrast),
            (adjust_saturation, self.saturation),
        )
        for op in torch.randperm(3, generator=generator).tolist():
            adjust, strength = adjustments[op]
            if strength > 0:
                image = adjust(image, _uniform(max(0.0, 1 - strength), 1 + strength, generator))
        return image


# timm's "increasing" RandAugment ops (rand-...-inc1, as DeiT uses): a higher magnitude always
# means a stronger change. Cutout is left to RandomErasing, as in timm.
RAND_AUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclass(frozen=True)
class RandAugment:
    """RandAugment as timm's `rand-m9-mstd0.5-inc1`: `num_ops` ops drawn with replacement, each
    applied with probability `prob` at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5
    # timm fills uncovered pixels with the normalisation mean in 0..255.
    fill: tuple[int, int, int] = (128, 128, 128)
    interpolation: Interpolation = "bicubic"
    ops: tuple[str, ...] = field(default=RAND_AUGMENT_OPS)

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        for _ in range(self.num_ops):
            name = self.ops[_randint(0, len(self.ops), generator)]
            if torch.rand((), generator=generator) >= self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude += self.magnitude_std * torch.randn((), generator=generator).item()
            image = self.apply(name, image, min(max(magnitude, 0.0), 10.0) / 10, generator)
        return image

    def apply(
        self, name: str, image: torch.Tensor, level: float, generator: Generator = None
    ) -> torch.Tensor:
        """One op at `level` in [0, 1] (magnitude / 10), with timm's argument ranges."""

        def signed(value: float) -> float:
            return -value if torch.rand((), generator=generator) < 0.5 else value

        height, width = image.shape[-2:]
        match name:
            case "AutoContrast":
                return auto_contrast(image)
            case "Equalize":
                return equalize(image)
            case "Invert":
                return invert(image)
            case "Rotate":
                return rotate(image, signed(30 * level), self.fill, self.interpolation)
            case "PosterizeIncreasing":
                return posterize(image, 4 - int(4 * level))
            case "SolarizeIncreasing":
                return solarize(image, 256 - int(256 * level))
            case "SolarizeAdd":
                return solarize_add(image, int(110 * level))
            case "ColorIncreasing":
                return adjust_saturation(image, max(0.1, 1 + signed(0.9 * level)))
            case "ContrastIncreasing":
                return adjust_contrast(image, max(0.1, 1 + signed(0.9 * level)))
            case "BrightnessIncreasing":
                return adjust_brightness(image, max(0.1, 1 + signed(0.9 * level)))
            case "SharpnessIncreasing":
                return adjust_sharpness(image, max(0.1, 1 + signed(0.9 * level)))
            case "ShearX":
                return affine(image, (1, signed(0.3 * level), 0, 0, 1, 0), self.fill, self.interpolation)
            case "ShearY":
                return affine(image, (1, 0, 0, signed(0.3 * level), 1, 0), self.fill, self.interpolation)
            case "TranslateXRel":
                shift = signed(0.45 * level) * width
                return affine(image, (1, 0, shift, 0, 1, 0), self.fill, self.interpolation)
            case "TranslateYRel":
                shift = signed(0.45 * level) * height
                return affine(image, (1, 0, 0, 0, 1, shift), self.fill, self.interpolation)
        raise ValueError(f"unknown RandAugment op {name!r}; known: {RAND_AUGMENT_OPS}")


@dataclass(frozen=True)
class ThreeAugment:
    """DeiT III's 3-Augment: one of grayscale, solarize (threshold 128) or Gaussian blur
    (sigma uniform in [0.1, 2]), chosen uniformly for each image."""

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        choice = _randint(0, 3, generator)
        if choice == 0:
            return grayscale(image).expand(3, -1, -1).contiguous()
        if choice == 1:
            return solarize(image, 128)
        return gaussian_blur(image, _uniform(0.1, 2.0, generator))


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Eval: shorter side to floor(size / crop_pct), then the central size x size (timm, DeiT)."""

    size: int
    crop_pct: float = 0.875
    interpolation: Interpolation = "bicubic"

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        return center_crop(
            resize_shorter(image, math.floor(self.size / self.crop_pct), self.interpolation), self.size
        )


@dataclass(frozen=True)
class SquashResize:
    """Eval of the official ViT code: both sides to `size`, aspect ratio not kept, nothing cropped."""

    size: int | tuple[int, int]
    interpolation: Interpolation = "bicubic"

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        return resize(image, size, self.interpolation)


@dataclass(frozen=True)
class Normalize:
    """uint8 (3, H, W) -> float32 (pixel / 255 - mean) / std."""

    mean: tuple[float, float, float] = VIT_MEAN
    std: tuple[float, float, float] = VIT_STD

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (image.float() / 255 - mean) / std


@dataclass(frozen=True)
class RandomErasing:
    """timm's random erasing on the normalised float image: with probability `prob`, one box of
    area fraction in [min_area, max_area] and log-uniform aspect in [min_aspect, 1 / min_aspect]
    gets per-pixel standard normal values."""

    prob: float = 0.25
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        if torch.rand((), generator=generator) >= self.prob:
            return image
        channels, height, width = image.shape
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(10):
            area = height * width * _uniform(self.min_area, self.max_area, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            box_height = int(round(math.sqrt(area * aspect)))
            box_width = int(round(math.sqrt(area / aspect)))
            if box_width < width and box_height < height:
                top = _randint(0, height - box_height + 1, generator)
                left = _randint(0, width - box_width + 1, generator)
                image = image.clone()
                noise = torch.randn((channels, box_height, box_width), generator=generator)
                image[:, top : top + box_height, left : left + box_width] = noise
                return image
        return image


@dataclass(frozen=True)
class Compose:
    """Apply `steps` in order, passing each the same generator."""

    steps: tuple

    def __call__(self, image: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        for step in self.steps:
            image = step(image, generator)
        return image


def build_transforms(cfg: DataConfig, train: bool) -> Compose:
    """uint8 (3, H, W) -> float (3, img_size, img_size): the train or eval pipeline of `cfg`."""
    normalize = Normalize(tuple(cfg.mean), tuple(cfg.std))
    if not train:
        if cfg.eval_resize == "squash":
            return Compose((SquashResize(cfg.img_size, cfg.interpolation), normalize))
        return Compose((ResizeCenterCrop(cfg.img_size, cfg.crop_pct, cfg.interpolation), normalize))
    if cfg.train_crop == "pad":
        steps: list = [RandomPadCrop(cfg.img_size, cfg.crop_padding)]
    else:
        steps = [RandomResizedCrop(cfg.img_size, tuple(cfg.scale), tuple(cfg.ratio), cfg.interpolation)]
    if cfg.hflip > 0:
        steps.append(RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment == "randaugment":
        fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
        steps.append(
            RandAugment(
                cfg.randaugment_num_ops,
                cfg.randaugment_magnitude,
                cfg.randaugment_magnitude_std,
                fill=fill,
                interpolation=cfg.interpolation,
            )
        )
    elif cfg.auto_augment == "3aug":
        steps.append(ThreeAugment())
    if cfg.color_jitter > 0:
        steps.append(ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    steps.append(normalize)
    if cfg.random_erasing > 0:
        steps.append(RandomErasing(cfg.random_erasing))
    return Compose(tuple(steps))
