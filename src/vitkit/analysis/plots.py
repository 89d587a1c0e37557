"""The PNG figures of the ViT paper, drawn from any model: Figures 6 and 7.

    plot_pos_embed            Figure 7 centre: position-embedding similarity, one tile per patch
    plot_attention_distance   Figure 7 right: mean attention distance per head against depth
    plot_filters              Figure 7 left: principal components of the patch-embedding filters
    plot_attention            Figure 6: attention rollout over the image, and one layer's raw heads

Each takes a model, computes the numbers with `analysis.attention` / `analysis.embeddings`, writes the
figure atomically and returns the numbers, so a caller (or a test) can check what was drawn.
Figures are built on `matplotlib.figure.Figure` directly: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..files import atomic_write
from ..models.vit import VisionTransformer
from .attention import attention_rollout, attention_weights, model_attention_distance, pooled_patch_map
from .embeddings import (
    FilterComponents,
    filter_components,
    patch_filters,
    patch_position_embeddings,
    position_similarity,
)

try:
    import matplotlib
    from matplotlib.figure import Figure
except ImportError as error:  # matplotlib is the optional `viz` extra
    raise ImportError("vitkit's figures need matplotlib: pip install 'vitkit[viz]'") from error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)  # the official ViT code maps pixels to [-1, 1]


# Files in, files out -----------------------------------------------------------------------------------
def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write a figure atomically; the format (png, svg, pdf) follows the file's suffix."""
    path = Path(path)
    file_format = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=file_format, dpi=dpi, bbox_inches="tight"))
    return path


def image_files(sources: list[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the folders named."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.exists():
            files.append(source)  # read_image names what is not a regular file
        else:
            raise FileNotFoundError(f"{source}: no such image file or folder")
    if not files:
        raise FileNotFoundError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(s) for s in sources]}"
        )
    return files


def read_image(
    path: str | os.PathLike, size: tuple[int, int], geometry: Callable | None = None
) -> torch.Tensor:
    """An RGB image as uint8 (3, H, W): through `geometry` (a checkpoint's resize and crop, see
    `vitkit.data.model_transform.geometry_of`) if given, else shorter side resized (bicubic) to fit and
    centre-cropped."""
    from ..data.datasets import open_regular  # only regular files: a FIFO would block the read

    try:
        with open_regular(path) as stream, Image.open(stream) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    if geometry is not None:
        return geometry(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous())
    scale = max(size[0] / image.height, size[1] / image.width)
    resized = (max(size[1], round(image.width * scale)), max(size[0], round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (image.width - size[1]) // 2, (image.height - size[0]) // 2
    image = image.crop((left, top, left + size[1], top + size[0]))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def read_images(
    sources: list[str | os.PathLike],
    size: tuple[int, int],
    limit: int | None = None,
    geometry: Callable | None = None,
) -> torch.Tensor:
    """Images of files and folders as uint8 (B, 3, H, W); at most `limit`, evenly spaced in sorted order.

    Even spacing rather than the first few keeps every class of an ImageFolder tree in the sample.
    """
    files = image_files(sources)
    if limit is not None and len(files) > limit:
        files = [files[i * len(files) // limit] for i in range(limit)]
    return torch.stack([read_image(path, size, geometry) for path in files])


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] = VIT_MEAN,
    std: tuple[float, ...] = VIT_STD,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float model input: (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


# Figure 7, centre: position-embedding similarity ---------------------------------------------------------
def similarity_figure(similarity: torch.Tensor) -> Figure:
    """(h, w, h, w) cosine similarities -> one tile per patch, tiles arranged by row and column."""
    rows, cols = similarity.shape[:2]
    gap = 1  # one blank pixel between tiles, as in the paper
    mosaic = np.full((rows * (rows + gap) - gap, cols * (cols + gap) - gap), np.nan)
    for r in range(rows):
        for c in range(cols):
            top, left = r * (rows + gap), c * (cols + gap)
            mosaic[top : top + rows, left : left + cols] = similarity[r, c].numpy()
    figure = Figure(figsize=(6, 6 * rows / cols + 0.5))
    axes = figure.add_subplot()
    image = axes.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    axes.set_xticks(
        [c * (cols + gap) + (cols - 1) / 2 for c in range(cols)], [str(c + 1) for c in range(cols)]
    )
    axes.set_yticks(
        [r * (rows + gap) + (rows - 1) / 2 for r in range(rows)], [str(r + 1) for r in range(rows)]
    )
    axes.tick_params(length=0, labelsize=7)
    axes.set_xlabel("Input patch column")
    axes.set_ylabel("Input patch row")
    axes.set_title("Position embedding similarity")
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="Cosine similarity")
    return figure


def plot_pos_embed(model: VisionTransformer, path: str | os.PathLike) -> torch.Tensor:
    """Figure 7 (centre) of a model into `path`; returns the similarities (h, w, h, w)."""
    similarity = position_similarity(patch_position_embeddings(model))
    save_figure(similarity_figure(similarity), path)
    return similarity


# Figure 7, right: mean attention distance ---------------------------------------------------------------
def attention_distance_figure(distances: torch.Tensor, img_size: tuple[int, int]) -> Figure:
    """(depth, heads) distances in pixels -> one dot per head at each depth, a colour per head."""
    depth, num_heads = distances.shape
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    for head in range(num_heads):
        axes.scatter(
            np.arange(1, depth + 1),
            distances[:, head].numpy(),
            s=14,
            color=cmap(head % 20),
            label=f"Head {head + 1}",
        )
    axes.set_xlabel("Network depth (layer)")
    axes.set_ylabel("Mean attention distance (pixels)")
    axes.set_title(f"Mean attention distance ({img_size[0]}x{img_size[1]} input)")
    axes.set_xlim(0.5, depth + 0.5)
    axes.set_ylim(bottom=0)
    axes.set_xticks(range(1, depth + 1))
    if num_heads <= 16:
        axes.legend(fontsize=6, ncol=2, loc="lower right", markerscale=0.8)
    axes.grid(alpha=0.3)
    return figure


def plot_attention_distance(
    model: VisionTransformer, images: torch.Tensor, path: str | os.PathLike, batch_size: int = 32
) -> torch.Tensor:
    """Figure 7 (right) over normalised images (B, C, H, W) into `path`; returns (depth, heads)."""
    distances = model_attention_distance(model, images, batch_size=batch_size)
    save_figure(attention_distance_figure(distances, tuple(images.shape[-2:])), path)
    return distances


# Figure 7, left: patch-embedding filters -------------------------------------------------------------------
def filters_figure(result: FilterComponents, num_columns: int = 7) -> Figure:
    """Principal components (K, C, P, P) as small images, each scaled by its largest |weight|.

    Three channels are shown as RGB, any other number as the mean over channels in grey.
    """
    components = result.components
    num_components = components.shape[0]
    num_columns = min(num_columns, num_components)
    num_rows = -(-num_components // num_columns)
    figure = Figure(figsize=(1.1 * num_columns, 1.25 * num_rows + 0.4))
    figure.suptitle("Principal components of the patch-embedding filters")
    for index in range(num_components):
        component = components[index]
        # Zero maps to mid-grey, so the sign of each pixel weight reads off the picture.
        scaled = (0.5 + component / (2 * component.abs().max().clamp_min(1e-12))).numpy()
        axes = figure.add_subplot(num_rows, num_columns, index + 1)
        if component.shape[0] == 3:
            axes.imshow(scaled.transpose(1, 2, 0), interpolation="nearest")
        else:
            axes.imshow(scaled.mean(axis=0), cmap="gray", interpolation="nearest")
        axes.set_title(f"{100 * result.explained[index]:.1f}%", fontsize=7)
        axes.set_axis_off()
    return figure


def plot_filters(
    model: VisionTransformer, path: str | os.PathLike, num_components: int = 28
) -> FilterComponents:
    """Figure 7 (left) of a model into `path`; returns the components and their explained variance."""
    result = filter_components(patch_filters(model), num_components)
    save_figure(filters_figure(result), path)
    return result


# Figure 6: attention rollout and raw attention maps ---------------------------------------------------------
def upsample(patch_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W), bilinear, scaled to [0, 1] for display."""
    image = F.interpolate(patch_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[
        0, 0
    ]
    image = image - image.min()
    return (image / image.max().clamp_min(1e-12)).numpy()


def attention_figure(
    image: torch.Tensor, rollout: torch.Tensor, head_maps: torch.Tensor, layer: int, num_columns: int = 4
) -> Figure:
    """Input, rollout, input x rollout (Figure 6's style), then one panel per head of one layer.

    image: uint8 (3, H, W); rollout: (h, w); head_maps: (heads, h, w).
    """
    size = tuple(image.shape[-2:])
    pixels = image.permute(1, 2, 0).float().numpy() / 255
    mask = upsample(rollout, size)
    num_heads = head_maps.shape[0]
    num_columns = max(3, min(num_columns, num_heads))
    num_rows = 1 + -(-num_heads // num_columns)
    figure = Figure(figsize=(2.2 * num_columns, 2.3 * num_rows))
    panels = [
        ("Input", pixels, None),
        ("Attention rollout", mask, "inferno"),
        ("Input x rollout", pixels * mask[..., None], None),
    ]
    for index, (title, picture, cmap) in enumerate(panels):
        axes = figure.add_subplot(num_rows, num_columns, index + 1)
        axes.imshow(picture, cmap=cmap)
        axes.set_title(title, fontsize=9)
        axes.set_axis_off()
    for head in range(num_heads):
        axes = figure.add_subplot(num_rows, num_columns, num_columns + head + 1)
        axes.imshow(pixels)
        axes.imshow(upsample(head_maps[head], size), cmap="inferno", alpha=0.6)
        axes.set_title(f"Layer {layer + 1}, head {head + 1}", fontsize=8)
        axes.set_axis_off()
    return figure


def plot_attention(
    model: VisionTransformer,
    image: torch.Tensor,
    path: str | os.PathLike,
    layer: int = -1,
    mean: tuple[float, ...] = VIT_MEAN,
    std: tuple[float, ...] = VIT_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Figure 6 for one uint8 image (3, H, W) into `path`; returns rollout (h, w) and heads (heads, h, w).

    The head maps show where the pooled representation's query looks in block `layer` (the class
    token's attention row, or the mean of the patch rows for models without one).
    """
    config = model.config
    weights = attention_weights(model, normalize(image[None], mean, std))
    if not -len(weights) <= layer < len(weights):
        raise ValueError(
            f"layer {layer} does not exist: the model has {len(weights)} blocks (0..{len(weights) - 1})"
        )
    layer = layer % len(weights)
    grid = (image.shape[-2] // config.stride, image.shape[-1] // config.stride)
    prefix, pool = config.num_prefix_tokens, config.pool
    rollout = pooled_patch_map(attention_rollout(weights), grid, prefix, pool)[0]
    head_maps = pooled_patch_map(weights[layer][0], grid, prefix, pool)
    save_figure(attention_figure(image, rollout, head_maps, layer), path)
    return rollout, head_maps


# One call per figure from a checkpoint file: what `vitkit plot` runs ------------------------------------------
FIGURES = ("pos-embed", "attention-distance", "filters", "attention")


def figure_path(figure: str, out: str | os.PathLike | None) -> Path:
    """Where a figure goes: `out`, or `<figure>.png` inside it when it is a folder (default: figures/)."""
    if out is None:
        return Path("figures") / f"{figure}.png"
    path = Path(out)
    return path / f"{figure}.png" if path.is_dir() or str(out).endswith(("/", os.sep)) else path


def _check_figure_request(figure: str, inputs: list[str], **counts: int) -> None:
    """The figure is known, every count positive, and images given exactly to the figures that take them."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name}={value}: expected a positive number")
    needs = {"attention-distance": "image files or folders", "attention": "one image file"}
    if figure in needs and not inputs:
        raise ValueError(f"figure {figure!r} needs {needs[figure]}")
    if figure not in needs and inputs:
        raise ValueError(f"figure {figure!r} takes no images, got {inputs}")


def figure_from_checkpoint(
    figure: str,
    checkpoint: str | os.PathLike,
    inputs: list[str] | None = None,
    out: str | os.PathLike | None = None,
    img_size: int | None = None,
    max_images: int = 64,
    batch_size: int = 32,
    layer: int = -1,
    num_components: int = 28,
    preprocessing: dict | None = None,
) -> tuple[Path, str]:
    """Load any checkpoint `vitkit.load` reads and draw one of FIGURES; returns (path, a summary line).

    `inputs` are image files or folders: several for "attention-distance" (`max_images` of them, spread over the folders),
    exactly one image for "attention", none for the others. Images are resized and centre-cropped to
    the model's resolution (or `img_size`, which also resamples the position embeddings) and
    normalised as the checkpoint's preprocessing says, any field overridden by `preprocessing`.
    """
    from ..data.model_transform import geometry_of, resolve_preprocessing
    from ..io import load

    inputs = list(inputs or [])
    _check_figure_request(
        figure, inputs, max_images=max_images, batch_size=batch_size, num_components=num_components
    )
    model = load(checkpoint, **({} if img_size is None else {"img_size": img_size})).eval()
    size = model.config.img_size
    steps = resolve_preprocessing(model, **(preprocessing or {}))
    geometry, mean, std = geometry_of(steps), steps.mean, steps.std
    path = figure_path(figure, out)
    if figure == "pos-embed":
        similarity = plot_pos_embed(model, path)
        rows, cols = similarity.shape[:2]
        return path, f"position-embedding similarity of {rows}x{cols} patches"
    if figure == "filters":
        result = plot_filters(model, path, num_components)
        top = ", ".join(f"{100 * share:.1f}%" for share in result.explained[:3].tolist())
        return path, f"{len(result.components)} filter components; the first explain {top} of the variance"
    if figure == "attention-distance":
        images = normalize(read_images(inputs, size, limit=max_images, geometry=geometry), mean, std)
        distances = plot_attention_distance(model, images, path, batch_size)
        per_layer = ", ".join(f"{d:.1f}" for d in distances.mean(dim=1).tolist())
        return path, f"mean attention distance (px) per layer over {len(images)} images: {per_layer}"
    files = image_files(inputs)
    if len(files) != 1:
        raise ValueError(
            f"figure 'attention' takes one image, got {len(files)}: {[str(f) for f in files][:5]}"
        )
    rollout, _ = plot_attention(model, read_image(files[0], size, geometry), path, layer, mean, std)
    peak = divmod(int(rollout.argmax()), rollout.shape[1])
    return path, f"attention rollout of {files[0]}: peak at patch row {peak[0] + 1}, column {peak[1] + 1}"
