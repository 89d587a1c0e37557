"""optim.name="muon": torch's Muon (momentum, then Newton-Schulz orthogonalisation of each update) on
the Transformer blocks' weight matrices, AdamW on everything else (the stem, the tokens and position
embeddings, norms, biases, the head), as Muon's authors prescribe.

Muon runs with torch's "match_rms_adamw" lr adjustment (update RMS 0.2 x sqrt(max(A, B)) x lr, as
in Moonshot's "Muon is Scalable"), so both halves take the run's one lr, schedule and weight decay.
`MuonWithAdamW` looks like one optimiser to the loop: one list of param groups (Muon's first), one
step, and one state_dict in torch's form with the parameters numbered across both halves, so
checkpoints, resumption and their checks are the same as for AdamW.

With `filters` (`optim.muon_filters`), the convolution filters of the stem that do not read pixels
(a CNN trunk's later convs, an hMLP stem's 2x2 projections) take Muon too, each (O, I, kh, kw)
filter bank orthogonalised as the (O, I*kh*kw) matrix it multiplies by (as airbench's Muon does);
convs on the image's channels stay with AdamW, like the embeddings.

The Newton-Schulz orthogonalisation runs in bf16 where bf16 products measured fast on the machine
(torch's Muon's own arithmetic), in fp32 elsewhere (`newton_schulz_dtype`): torch.optim.Muon's step
always casts to bf16, which crawls on a CPU without bf16 units.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr

from ..fast.machine import choose_precision

log = logging.getLogger(__name__)


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a Transformer block (qkv, attention projection, MLP)."""
    return param.ndim == 2 and name.startswith("blocks.")


def is_muon_filter(name: str, param: torch.Tensor, in_chans: int) -> bool:
    """A conv filter bank of the stem whose input is not the image (its channels are not in_chans)."""
    return param.ndim == 4 and name.startswith("patch_embed.") and param.shape[1] != in_chans


NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype the orthogonalisation runs in on `device`: bf16 where bf16 products measured fast
    there (the precision "auto" would take), else fp32. torch's Muon always takes bf16, which on a
    CPU without bf16 units (an AVX2-only EPYC: 1 GFLOP/s against 93 in fp32) made the optimiser step
    of `cifar10_vit` cost most of its 7 s training step."""
    return torch.bfloat16 if choose_precision("auto", device)[0] == "bf16" else torch.float32


def orthogonalise(
    update: torch.Tensor, dtype: torch.dtype, coefficients=NS_COEFFICIENTS, steps=DEFAULT_NS_STEPS, eps=EPS
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration in `dtype`: `update` scaled to spectral norm <= 1, then
    X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation; singular values end near 1
    (between about 0.5 and 1.5). In bf16 it is torch.optim.Muon's own arithmetic."""
    a, b, c = coefficients
    tall = update.shape[0] > update.shape[1]
    x = update.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_update(matrix: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, group: dict, dtype) -> None:
    """One Muon step of a 2-D `matrix` (a view that writes through) with its momentum `buf`: Nesterov
    momentum, orthogonalisation in `dtype`, decoupled weight decay, the "match_rms_adamw" lr."""
    lr, momentum = group["lr"], group["momentum"]
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group.get("nesterov", True) else buf
    coefficients = group.get("ns_coefficients", NS_COEFFICIENTS)
    steps, eps = group.get("ns_steps", DEFAULT_NS_STEPS), group.get("eps", EPS)
    update = orthogonalise(update, dtype, coefficients, steps, eps)
    matrix.mul_(1 - lr * group["weight_decay"])
    matrix.add_(update, alpha=-_adjust_lr(lr, group.get("adjust_lr_fn", "match_rms_adamw"), matrix.shape))


def muon_steps(optimizer: torch.optim.Optimizer, closure=None) -> None:
    """`muon_update` of every parameter of `optimizer` with a gradient, each as its 2-D (rows, rest)
    view (a matrix is its own view, a filter bank its (O, I*kh*kw) matrix), in `optimizer.ns_dtype`;
    the momentum buffers keep the parameters' shapes."""
    if closure is not None:
        raise ValueError(f"{type(optimizer).__name__}.step takes no closure")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            grad = p.grad.reshape(p.shape[0], -1)
            buf = state["momentum_buffer"].view_as(grad)
            muon_update(p.view(p.shape[0], -1), grad, buf, group, optimizer.ns_dtype)


class MatrixMuon(torch.optim.Muon):
    """torch.optim.Muon (its groups, state and checkpoints) stepping with `muon_update`, so its
    orthogonalisation runs in `ns_dtype` (None: `newton_schulz_dtype` of the parameters' device)."""

    def __init__(self, groups: list[dict], lr: float, ns_dtype: torch.dtype | None = None):
        super().__init__(groups, lr=lr, adjust_lr_fn="match_rms_adamw")
        self.ns_dtype = ns_dtype or newton_schulz_dtype(self.param_groups[0]["params"][0].device)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        muon_steps(self, closure)


class FilterMuon(torch.optim.Optimizer):
    """The Muon step of `muon_update` on conv filter banks, each seen as its (O, I*kh*kw) matrix.
    torch.optim.Muon takes 2-D parameters only; the step works on 2-D views, which write through to
    the filters (the momentum buffers keep the filters' shape, as the checkpoint checks expect)."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, ns_dtype=None):
        super().__init__(groups, dict(lr=lr, weight_decay=0.1, momentum=momentum))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 4 or not p.is_contiguous():
                    raise ValueError(f"FilterMuon takes contiguous 4-D filters, got shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype or newton_schulz_dtype(self.param_groups[0]["params"][0].device)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        muon_steps(self, closure)


class MuonWithAdamW:
    """Muon over the blocks' matrices of `groups` (and, with `filters`, the stem's filters that do not
    read pixels: `in_chans` is the image's channels), AdamW (betas) over the rest; the groups keep
    their weight_decay and lr_scale."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        filters: bool = False,
        in_chans: int = 3,
    ):
        def kind(name: str, param: torch.Tensor) -> str:
            if is_muon_matrix(name, param):
                return "matrix"
            return "filter" if filters and is_muon_filter(name, param, in_chans) else "other"

        parts: dict[str, list[dict]] = {"matrix": [], "filter": [], "other": []}
        for group in groups:
            for part, chosen in parts.items():
                pairs = [
                    (n, p) for n, p in zip(group["names"], group["params"], strict=True) if kind(n, p) == part
                ]
                if pairs:
                    names, params = zip(*pairs, strict=True)
                    chosen.append({**group, "params": list(params), "names": list(names)})
        if not parts["matrix"]:
            raise ValueError("optim.name='muon': the model has no trainable Transformer weight matrix")
        if filters and not parts["filter"]:
            raise ValueError("optim.muon_filters: the model's stem has no trainable conv past the pixels")
        self.muon = MatrixMuon(parts["matrix"], lr=lr)
        self.filter_muon = (
            FilterMuon(parts["filter"], lr=lr, ns_dtype=self.muon.ns_dtype) if parts["filter"] else None
        )
        log.info("Muon orthogonalises in %s", self.muon.ns_dtype)
        self.adamw = torch.optim.AdamW(parts["other"], lr=lr, betas=betas) if parts["other"] else None
        self.optimizers = [o for o in (self.muon, self.filter_muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch's form: parameters numbered 0.. across Muon's groups, then FilterMuon's, then AdamW's."""
        merged: dict[str, Any] = {"state": {}, "param_groups": []}
        offset = 0
        for optimizer in self.optimizers:
            part = optimizer.state_dict()
            merged["state"].update({index + offset: entry for index, entry in part["state"].items()})
            merged["param_groups"] += [
                {**group, "params": [index + offset for index in group["params"]]}
                for group in part["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in part["param_groups"])
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the optimiser state has {len(groups)} parameter groups, this Muon + AdamW optimiser "
                f"{len(self.param_groups)} (a different model, freezing rule or optimiser?)"
            )
        start = offset = 0
        for optimizer in self.optimizers:
            part = groups[start : start + len(optimizer.param_groups)]
            count = sum(len(group["params"]) for group in part)
            optimizer.load_state_dict(
                {
                    "state": {
                        i - offset: e for i, e in state["state"].items() if offset <= int(i) < offset + count
                    },
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in part],
                }
            )
            start, offset = start + len(part), offset + count
