"""Loading a checkpoint of any layout: vitkit's own is read directly, any other is converted.

This is the layer that chooses the layout; below it, `vitkit.convert` holds the layouts (vitkit's
own in `vitkit.convert.native`) and `vitkit.files` reads the files. Task deltas sit above it
(`vitkit.delta`), and `vitkit.load` (`vitkit.io.load`) adds `delta=` on top.
"""

from __future__ import annotations

import os
from typing import Any

from .convert import checkpoint_folder, load_converted
from .convert.native import is_native, load_native
from .models.vit import VisionTransformer


def load(
    path: str | os.PathLike, strict: bool = True, layout: str | None = None, **overrides: Any
) -> VisionTransformer:
    """Rebuild a saved model. Overrides change the config: e.g. img_size=384 (position embeddings are
    resampled in 2D), num_classes=10 (a new, zero-initialised head).

    Checkpoints of other toolkits (vit_jax/big_vision .npz, timm, HF folders, mmpretrain, DeiT) are
    detected and converted by `vitkit.convert.load_converted`; `layout=` forces a layout, and its
    options (num_heads=, keep_source_numerics=, pre_logits=) pass through."""
    path = checkpoint_folder(path)
    if layout not in (None, "vitkit") or (layout is None and not is_native(path)):
        return load_converted(path, layout=layout, strict=strict, **overrides)
    return load_native(path, strict=strict, **overrides)
