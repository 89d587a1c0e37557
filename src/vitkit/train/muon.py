"""optim.name="muon": torch's Muon (momentum, then Newton-Schulz orthogonalisation of each update) on
the Transformer blocks' weight matrices, AdamW on everything else (the stem, the tokens and position
embeddings, norms, biases, the head), as Muon's authors prescribe.

Muon runs with torch's "match_rms_adamw" lr adjustment (update RMS 0.2 x sqrt(max(A, B)) x lr, as
in Moonshot's "Muon is Scalable"), so both halves take the run's one lr, schedule and weight decay.
`MuonWithAdamW` looks like one optimiser to the loop: one list of param groups (Muon's first), one
step, and one state_dict in torch's form with the parameters numbered across both halves, so
checkpoints, resumption and their checks are the same as for AdamW.
"""

from __future__ import annotations

from typing import Any

import torch


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a Transformer block (qkv, attention projection, MLP)."""
    return param.ndim == 2 and name.startswith("blocks.")


class MuonWithAdamW:
    """Muon over the blocks' matrices of `groups`, AdamW (betas) over the rest; the groups keep their
    weight_decay and lr_scale."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float]):
        matrices, others = [], []
        for group in groups:
            for half, keep in ((matrices, True), (others, False)):
                pairs = [
                    (n, p)
                    for n, p in zip(group["names"], group["params"], strict=True)
                    if is_muon_matrix(n, p) == keep
                ]
                if pairs:
                    names, params = zip(*pairs, strict=True)
                    half.append({**group, "params": list(params), "names": list(names)})
        if not matrices:
            raise ValueError("optim.name='muon': the model has no trainable Transformer weight matrix")
        self.muon = torch.optim.Muon(matrices, lr=lr, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas) if others else None
        self.optimizers = [self.muon] + ([self.adamw] if self.adamw else [])

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
        """torch's form: parameters numbered 0.. across Muon's groups, then AdamW's."""
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
