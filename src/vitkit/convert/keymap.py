"""Key tables: a converter is a list of rules `native key <-> foreign key(s)` plus a few named transforms.

A rule's keys are templates with placeholders for the repeated parts of a ViT:

    {i} encoder block   {b} parallel branch   {s} ResNet stage   {u} ResNet unit

and a foreign template may write `{s+1}` where its layout counts from one (vit_jax's `block1/unit1`).
The same table converts in both directions: `to_native` matches each rule's first foreign template
against the checkpoint's keys, `from_native` matches the native template. Both return
`(state, unused, missing)`: keys of the input that no rule consumed, and keys a matched rule needed
but did not find. Nothing is guessed: a key that two rules claim is an error in the table.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..files import CheckpointError, atomic_write
from ..models.config import ViTConfig

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


# Transforms ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """A named tensor transform: foreign tensors -> one native tensor, and back.

    `to_native` needs no config (a checkpoint is converted before its config is inferred);
    `to_foreign` may read it, e.g. the number of heads to split a fused projection.
    """

    name: str
    to_native: Callable[[list[torch.Tensor]], torch.Tensor]
    to_foreign: Callable[[torch.Tensor, ViTConfig], list[torch.Tensor]]


IDENTITY = Transform("identity", lambda ts: ts[0], lambda t, config: [t])

# Flax Dense kernels are (in, out); torch Linear weights are (out, in).
DENSE = Transform("dense_kernel", lambda ts: ts[0].T, lambda t, config: [t.T])

# Flax/TF convolution kernels are HWIO (height, width, in, out); torch's are OIHW.
CONV = Transform(
    "conv_kernel_hwio", lambda ts: ts[0].permute(3, 2, 0, 1), lambda t, config: [t.permute(2, 3, 1, 0)]
)


def _heads_in(count: int) -> Transform:
    """Flax MultiHeadDotProductAttention input kernels, `count` of them (q, k, v or k, v), each
    (D, heads, head_dim) -> one fused torch Linear weight (count * D, D)."""

    def to_native(kernels: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([k.reshape(k.shape[0], -1).T for k in kernels])

    def to_foreign(weight: torch.Tensor, config: ViTConfig) -> list[torch.Tensor]:
        return [w.T.reshape(w.shape[1], config.num_heads, -1) for w in weight.chunk(count)]

    return Transform(f"split_heads_kernel_x{count}", to_native, to_foreign)


def _heads_in_bias(count: int) -> Transform:
    """Flax attention input biases (heads, head_dim) -> one fused torch bias (count * D,)."""

    def to_native(biases: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.reshape(-1) for b in biases])

    def to_foreign(bias: torch.Tensor, config: ViTConfig) -> list[torch.Tensor]:
        return [b.reshape(config.num_heads, -1) for b in bias.chunk(count)]

    return Transform(f"split_heads_bias_x{count}", to_native, to_foreign)


QKV_KERNEL, QKV_BIAS = _heads_in(3), _heads_in_bias(3)
KV_KERNEL, KV_BIAS = _heads_in(2), _heads_in_bias(2)
Q_KERNEL, Q_BIAS = _heads_in(1), _heads_in_bias(1)

# Flax attention output kernel (heads, head_dim, D) -> torch Linear weight (D, D).
HEADS_OUT = Transform(
    "merge_heads_out_kernel",
    lambda ts: ts[0].reshape(-1, ts[0].shape[-1]).T,
    lambda t, config: [t.T.reshape(config.num_heads, -1, t.shape[0])],
)


def _fuse(count: int) -> Transform:
    """Separate torch query/key/value Linear weights or biases -> the fused qkv of timm's Attention."""
    return Transform(
        f"fuse_linear_x{count}", lambda ts: torch.cat(ts), lambda t, config: list(t.chunk(count))
    )


FUSE_QKV = _fuse(3)


# Templates -------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{([ibsu])(\+1)?\}")


@dataclass(frozen=True)
class _Template:
    text: str
    pattern: re.Pattern[str]
    # Each placeholder's variable and the offset its layout adds (1 for `{s+1}`).
    fields: tuple[tuple[str, int], ...]
    # Literal text before the first and after the last placeholder: a cheap filter before the regex.
    head: str
    tail: str

    @classmethod
    def parse(cls, text: str) -> _Template:
        parts, fields, last = [], [], 0
        for match in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[last : match.start()]))
            name, offset = match[1], int(bool(match[2]))
            parts.append(rf"(?P<{name}>\d+)" if name not in dict(fields) else rf"(?P={name})")
            fields.append((name, offset))
            last = match.end()
        parts.append(re.escape(text[last:]))
        head = text.split("{", 1)[0]
        tail = text[last:] if fields else ""
        return cls(text, re.compile("".join(parts) + "$"), tuple(fields), head, tail)

    def match(self, key: str) -> dict[str, int] | None:
        if not (key.startswith(self.head) and key.endswith(self.tail)):
            return None
        found = self.pattern.match(key)
        if found is None:
            return None
        offsets = dict(self.fields)
        return {name: int(value) - offsets[name] for name, value in found.groupdict().items()}

    def format(self, bindings: Mapping[str, int]) -> str:
        return _PLACEHOLDER.sub(lambda m: str(bindings[m[1]] + int(bool(m[2]))), self.text)


@dataclass(frozen=True)
class Rule:
    """One native key <-> one or more foreign keys, and the transform between them."""

    native: str
    foreign: tuple[str, ...]
    transform: Transform = IDENTITY


def rule(native: str, *foreign: str, transform: Transform = IDENTITY) -> Rule:
    return Rule(native, foreign or (native,), transform)


def linear(native: str, foreign: str, kernel: Transform = DENSE, bias: Transform = IDENTITY) -> list[Rule]:
    """A weight/bias pair: native `{native}.weight|bias` <- foreign `{foreign}/kernel|bias` (Flax)."""
    return [
        rule(f"{native}.weight", f"{foreign}/kernel", transform=kernel),
        rule(f"{native}.bias", f"{foreign}/bias"),
    ]


def norm(native: str, foreign: str, scale: str = "scale", sep: str = "/") -> list[Rule]:
    """A LayerNorm/GroupNorm: native `.weight|bias` <- foreign `{scale}|bias`."""
    return [rule(f"{native}.weight", f"{foreign}{sep}{scale}"), rule(f"{native}.bias", f"{foreign}{sep}bias")]


def renamed(native: str, foreign: str, *suffixes: str) -> list[Rule]:
    """Module renames that keep tensors as they are: `{native}.{suffix}` <- `{foreign}.{suffix}`."""
    return [rule(f"{native}.{suffix}", f"{foreign}.{suffix}") for suffix in suffixes or ("weight", "bias")]


class KeyTable:
    """A list of rules, applied in either direction."""

    def __init__(self, name: str, rules: Iterable[Rule]):
        self.name = name
        self.rules = list(rules)
        self._native = [_Template.parse(r.native) for r in self.rules]
        self._foreign = [tuple(_Template.parse(f) for f in r.foreign) for r in self.rules]

    def to_native(
        self, state: Mapping[str, torch.Tensor], progress: bool = False
    ) -> tuple[State, list[str], list[str]]:
        """Foreign checkpoint -> native state dict, with (unused foreign keys, missing foreign keys)."""
        return self._apply(state, to_native=True, config=None, progress=progress)

    def from_native(
        self, state: Mapping[str, torch.Tensor], config: ViTConfig, progress: bool = False
    ) -> tuple[State, list[str], list[str]]:
        """Native state dict -> foreign checkpoint, with (unused native keys, missing native keys)."""
        return self._apply(state, to_native=False, config=config, progress=progress)

    def foreign_names(self, native_key: str) -> list[str]:
        """The foreign keys a native key is made from, for error messages ([] if no rule covers it)."""
        for native, foreign in zip(self._native, self._foreign, strict=True):
            bindings = native.match(native_key)
            if bindings is not None:
                return [template.format(bindings) for template in foreign]
        return []

    def _apply(
        self, state: Mapping[str, torch.Tensor], to_native: bool, config: ViTConfig | None, progress: bool
    ) -> tuple[State, list[str], list[str]]:
        out: State = {}
        claimed: dict[str, str] = {}
        missing: list[str] = []
        pairs = list(zip(self.rules, self._native, self._foreign, strict=True))
        for current, native, foreign in tqdm(pairs, desc=f"convert {self.name}", disable=not progress):
            sources, targets = (foreign, (native,)) if to_native else ((native,), foreign)
            for key in state:
                bindings = sources[0].match(key)
                if bindings is None:
                    continue
                inputs = [template.format(bindings) for template in sources]
                absent = [name for name in inputs if name not in state]
                if absent:
                    missing.extend(absent)
                    continue
                for name in inputs:
                    if name in claimed:
                        raise CheckpointError(
                            f"key table {self.name!r}: {name} is claimed by two rules "
                            f"({claimed[name]!r} and {current.native!r})"
                        )
                    claimed[name] = current.native
                tensors = [state[name] for name in inputs]
                try:
                    if to_native:
                        results = [current.transform.to_native(tensors)]
                    else:
                        results = current.transform.to_foreign(tensors[0], config)
                except RuntimeError as error:
                    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(inputs, tensors, strict=True))
                    raise CheckpointError(
                        f"{self.name}: cannot apply {current.transform.name} to {shapes}: {error}"
                    ) from error
                for template, tensor in zip(targets, results, strict=True):
                    out[template.format(bindings)] = tensor
        unused = [key for key in state if key not in claimed]
        return out, unused, sorted(set(missing))


# Layouts ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fix:
    """A named repair of an old or variant checkpoint, applied before the key table when `needed`.

    `why` says which checkpoints need it; the loader logs each fix it applies.
    """

    name: str
    why: str
    needed: Callable[[Mapping[str, torch.Tensor]], bool]
    apply: Callable[[State], State]


def rename_prefix(name: str, old: str, new: str, why: str) -> Fix:
    """A fix that replaces the key prefix `old` by `new` wherever it occurs."""
    return Fix(
        name,
        why,
        needed=lambda state: any(key.startswith(old) for key in state),
        apply=lambda state: {
            (new + key[len(old) :] if key.startswith(old) else key): value for key, value in state.items()
        },
    )


def drop_keys(name: str, keys: tuple[str, ...], why: str) -> Fix:
    """A fix that discards tensors a vitkit model has no use for (training-only parameters)."""
    return Fix(
        name,
        why,
        needed=lambda state: any(key in state for key in keys),
        apply=lambda state: {key: value for key, value in state.items() if key not in keys},
    )


@dataclass(frozen=True)
class Layout:
    """A foreign checkpoint layout: how to recognise it, its key table, its fixes and its numerics.

    - `detect(keys)` is true for checkpoints in this layout.
    - `limits(config)` lists what a config uses that the layout cannot hold (checked before writing).
    - `numerics` are the config fields that reproduce the source toolkit's arithmetic (GELU form,
      LayerNorm eps, position-embedding resampling), applied on request.
    - `save(foreign_state, path, config)` writes the layout's files; None for read-only layouts.
    - `parallel_table`/`parallel_marker`: layouts whose parallel blocks reuse the sequential
      block's names (DeiT's paralx2) pick this table when a key contains the marker.
    - `choose_table(keys, config)`: layouts with variants that name the same native tensors
      differently (mmpretrain's two classification heads) pick their table from a checkpoint's
      keys (reading) or from the config (writing).
    - `needs_class_slot`: the layout's position embedding always has the class token's row.
    - `model_types`: the `model_type` values of a folder's config.json in this layout (HF), and
      `folder_config(config_json)` turns that file into (structural config fields, numerics).
    """

    name: str
    description: str
    table: KeyTable
    detect: Callable[[Iterable[str]], bool]
    fixes: tuple[Fix, ...] = ()
    limits: Callable[[ViTConfig], list[str]] = lambda config: []
    numerics: Mapping[str, object] = dataclasses.field(default_factory=dict)
    save: Callable[[State, Path, ViTConfig], Path] | None = None
    parallel_table: KeyTable | None = None
    parallel_marker: str | None = None
    choose_table: Callable[[list[str], ViTConfig | None], KeyTable] | None = None
    needs_class_slot: bool = False
    model_types: tuple[str, ...] = ()
    folder_config: Callable[[dict], tuple[dict[str, object], dict[str, object]]] | None = None

    def table_for(self, keys: Iterable[str] = (), config: ViTConfig | None = None) -> KeyTable:
        if self.choose_table is not None:
            return self.choose_table(list(keys), config)
        if self.parallel_table is None:
            return self.table
        if config is not None:
            return self.parallel_table if config.parallel > 1 else self.table
        marker = self.parallel_marker or ""
        return self.parallel_table if any(marker in key for key in keys) else self.table

    def apply_fixes(self, state: State, origin: str) -> State:
        for fix in self.fixes:
            if fix.needed(state):
                state = fix.apply(state)
                log.info("%s: applied fix %s (%s)", origin, fix.name, fix.why)
        return state

    def read(
        self, state: State, origin: str = "checkpoint", progress: bool = False
    ) -> tuple[State, list[str], list[str]]:
        """Foreign state -> (native state, unused foreign keys, missing foreign keys), after the fixes."""
        state = self.apply_fixes(dict(state), origin)
        return self.table_for(state).to_native(state, progress=progress)

    def prepare(self, state: Mapping[str, torch.Tensor], config: ViTConfig) -> tuple[State, ViTConfig]:
        """The model as this layout will hold it: layouts that always give the class token a position
        embedding (vit_jax, HF, mmpretrain) get a zero row for it when the model has none (DeiT III,
        big_vision). cls + 0 computes the same, so the function is unchanged."""
        state = dict(state)
        if (
            self.needs_class_slot
            and config.class_token
            and not config.pos_embed_class_slot
            and "pos_embed" in state
        ):
            pos_embed = state["pos_embed"]
            state["pos_embed"] = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[-1]), pos_embed], dim=1)
            config = config.replace(pos_embed_class_slot=True)
            log.info("%s: inserted a zero position embedding for the class token's slot", self.name)
        return state, config

    def write(self, state: Mapping[str, torch.Tensor], config: ViTConfig, progress: bool = False) -> State:
        """Native state -> this layout's state. Refuses configs the layout cannot hold and any key
        the table leaves over, so a written file always reads back to the same model. Call
        `prepare` first for layouts that need the class slot."""
        if self.save is None:
            raise CheckpointError(f"the {self.name} layout is read-only")
        problems = self.limits(config)
        if problems:
            raise CheckpointError(f"the {self.name} layout cannot hold this model: " + "; ".join(problems))
        foreign, unused, missing = self.table_for(config=config).from_native(state, config, progress=progress)
        if unused or missing:
            raise CheckpointError(
                f"{self.name}: the key table does not cover the model; unmapped: {unused or 'none'}; "
                f"missing: {missing or 'none'}"
            )
        return foreign


# Writers ---------------------------------------------------------------------------------------------
def _contiguous(state: Mapping[str, torch.Tensor]) -> State:
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    tensors = _contiguous(state)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
    return path


def save_torch(obj: object, path: Path) -> Path:
    """torch.save through a temporary file: the result reads back with weights_only=True."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


def save_npz(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    arrays = {key: value.numpy() for key, value in _contiguous(state).items()}

    def write(tmp: str) -> None:
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)
    return path
