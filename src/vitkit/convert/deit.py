"""DeiT / DeiT III layout (facebookresearch/deit `models_v2.py`), read only.

DeiT III names LayerScale `gamma_1`/`gamma_2`, adds position embeddings to the patches only (no
class slot), and its "Three things" parallel blocks (`Layer_scale_init_Block_paralx2`) keep two
branches under the sequential names with a `1` suffix: `norm1`/`norm11`, `attn`/`attn1`,
`gamma_1`/`gamma_1_1`, `norm2`/`norm21`, `mlp`/`mlp1`, `gamma_2`/`gamma_2_1`. The original DeiT
checkpoints use timm's names and load through the timm layout.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keymap import KeyTable, Layout, Rule, renamed, rule
from .timm import same

STEM = [*same("patch_embed.proj"), rule("cls_token"), rule("pos_embed")]
HEAD = same("norm", "head")


def _sequential() -> list[Rule]:
    block = "blocks.{i}."
    return [
        *same(*(f"{block}{m}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"))),
        rule(f"{block}ls1.gamma", f"{block}gamma_1"),
        rule(f"{block}ls2.gamma", f"{block}gamma_2"),
    ]


def _parallel_x2() -> list[Rule]:
    block = "blocks.{i}."
    rules: list[Rule] = []
    for branch, suffix in ((0, ""), (1, "1")):
        attn, ffn = f"{block}attns.{branch}.", f"{block}ffns.{branch}."
        rules += renamed(f"{attn}norm", f"{block}norm1{suffix}")
        rules += renamed(f"{attn}attn.qkv", f"{block}attn{suffix}.qkv")
        rules += renamed(f"{attn}attn.proj", f"{block}attn{suffix}.proj")
        rules += [rule(f"{attn}ls.gamma", f"{block}gamma_1" + ("_1" if branch else ""))]
        rules += renamed(f"{ffn}norm", f"{block}norm2{suffix}")
        rules += renamed(f"{ffn}mlp.fc1", f"{block}mlp{suffix}.fc1")
        rules += renamed(f"{ffn}mlp.fc2", f"{block}mlp{suffix}.fc2")
        rules += [rule(f"{ffn}ls.gamma", f"{block}gamma_2" + ("_1" if branch else ""))]
    return rules


def _deit_keys(keys: Iterable[str]) -> bool:
    return any(key.endswith((".gamma_1", ".norm11.weight")) for key in keys)


DEIT = Layout(
    name="deit",
    description="DeiT III (facebookresearch/deit models_v2): gamma_1/2, paralx2 blocks",
    table=KeyTable("deit", [*STEM, *_sequential(), *HEAD]),
    parallel_table=KeyTable("deit_paralx2", [*STEM, *_parallel_x2(), *HEAD]),
    parallel_marker=".norm11.",
    detect=_deit_keys,
)
