"""optim.name="muon": Muon on the blocks' weight matrices, AdamW on the rest, one optimiser to the loop."""

import copy

import pytest
import torch

from test_train_loop import tiny_experiment, weights
from vitkit.fast.machine import Calibration, use_calibration
from vitkit.models import VisionTransformer, ViTConfig
from vitkit.train import OptimConfig, load_experiment, train
from vitkit.train.finetune_recipe import describe
from vitkit.train.muon import FilterMuon, MatrixMuon, MuonWithAdamW, newton_schulz_dtype, orthogonalise
from vitkit.train.optim import build_optimizer, param_groups, set_lr

# Figures where bf16 products run natively fast: Muon then orthogonalises in bf16, as torch's does.
BF16_FAST = Calibration("test", {"fp32": 190.0, "bf16": 408.0, "bf16_fp32_units": 170.0})


def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        ViTConfig(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    )


def loss_step(model: VisionTransformer, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_blocks_matrices_go_to_muon_and_everything_else_to_adamw():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.01, weight_decay=0.05))
    assert isinstance(optimizer, MuonWithAdamW)
    muon = {n for g in optimizer.muon.param_groups for n in g["names"]}
    adamw = {n for g in optimizer.adamw.param_groups for n in g["names"]}
    assert muon == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert adamw | muon == {n for n, _ in model.named_parameters()} and not adamw & muon
    assert {"head.weight", "patch_embed.proj.weight", "pos_embed"} <= adamw
    # Decay and lr scale stay per group: Muon's matrices are decayed, AdamW's norms and biases are not.
    assert {g["weight_decay"] for g in optimizer.muon.param_groups} == {0.05}
    set_lr(optimizer, 0.5)
    assert {g["lr"] for g in optimizer.param_groups} == {0.5}


def test_a_step_is_torchs_muon_and_adamw_side_by_side():
    model, twin = tiny_model(), tiny_model()
    with use_calibration(BF16_FAST):  # torch's Muon orthogonalises in bf16
        optimizer = build_optimizer(
            model, OptimConfig(name="muon", lr=0.01, weight_decay=0.05, betas=(0.9, 0.95))
        )
    groups = param_groups(twin, 0.05)
    matrices = [
        p
        for g in groups
        for n, p in zip(g["names"], g["params"], strict=True)
        if n.startswith("blocks.") and p.ndim == 2
    ]
    ids = {id(p) for p in matrices}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    reference = [
        torch.optim.Muon(
            [{"params": matrices, "weight_decay": 0.05}], lr=0.01, adjust_lr_fn="match_rms_adamw"
        ),
        torch.optim.AdamW([g for g in rest if g["params"]], lr=0.01, betas=(0.9, 0.95)),
    ]
    for seed in range(3):
        loss_step(model, optimizer, seed)
        torch.manual_seed(seed)
        images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
        torch.nn.functional.cross_entropy(twin(images), labels).backward()
        for opt in reference:
            opt.step()
            opt.zero_grad()
    for (name, param), other in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, other, rtol=0, atol=0, msg=name)


def test_state_dict_round_trip_continues_the_same_steps():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.01))
    for seed in range(2):
        loss_step(model, optimizer, seed)
    state = copy.deepcopy(optimizer.state_dict())  # torch's load keeps the tensors it is given
    assert sorted(state["state"]) == list(range(sum(len(g["params"]) for g in state["param_groups"])))
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    restored = build_optimizer(twin, OptimConfig(name="muon", lr=0.01))
    restored.load_state_dict(state)
    loss_step(model, optimizer, 7)
    loss_step(twin, restored, 7)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parameter groups"):
        restored.load_state_dict({**state, "param_groups": state["param_groups"][:1]})


@pytest.mark.parametrize("filters", [False, True])
def test_a_run_resumes_bitwise_and_states_its_optimiser(tmp_path, filters):
    options = dict(optim={"name": "muon", "weight_decay": 0.05}, epochs=2, checkpoint_every=1)
    if filters:  # the checkpoint checks see the filters' momentum in their own shape
        options.update(
            optim={**options["optim"], "muon_filters": True},
            model={"stem": "cnn", "patch_size": 4, "stem_channels": (8, 16, 32)},
        )
    train(tiny_experiment(tmp_path / "straight", **options))
    assert train(tiny_experiment(tmp_path / "resumed", max_steps=1, **options))["steps"] == 1
    train(tiny_experiment(tmp_path / "resumed", **options))
    straight, resumed = (
        weights(tmp_path / "straight" / "last.safetensors"),
        weights(tmp_path / "resumed" / "last.safetensors"),
    )
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    lines = describe(load_experiment(tiny_experiment(tmp_path, **options), []), 1, 1, "none", "zero")
    said = "optimizer: Muon on the blocks' matrices" + (
        " and the stem's filters past the pixels" if filters else ""
    )
    assert any(line.startswith(said + ", AdamW") for line in lines)


def test_fsdp_refuses_muon(tmp_path):
    experiment = tiny_experiment(tmp_path, optim={"name": "muon"}, strategy="fsdp")
    with pytest.raises(ValueError, match="does not support optim.name='muon'"):
        train(experiment)


# optim.muon_filters: the stem's conv filters past the pixels ------------------------------------------
def cnn_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        ViTConfig(img_size=16, patch_size=4, stem="cnn", stem_channels=(8, 12, 16), embed_dim=16, depth=1,
                  num_heads=2, num_classes=3)
    )  # fmt: skip


@pytest.mark.parametrize("kernel", [1, 3])
def test_filter_muon_is_torchs_muon_on_the_filters_matrix(kernel):
    """A (O, I, k, k) filter bank steps exactly as torch.optim.Muon steps the (O, I*k*k) matrix."""
    torch.manual_seed(0)
    filters = torch.nn.Parameter(torch.randn(6, 4, kernel, kernel))
    matrix = torch.nn.Parameter(filters.detach().reshape(6, -1).clone())
    ours = FilterMuon([{"params": [filters], "weight_decay": 0.05}], lr=0.02, ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(
        [{"params": [matrix], "weight_decay": 0.05}], lr=0.02, adjust_lr_fn="match_rms_adamw"
    )
    for step in range(3):
        grad = torch.randn(6, 4, kernel, kernel, generator=torch.Generator().manual_seed(step))
        filters.grad, matrix.grad = grad.clone(), grad.reshape(6, -1).clone()
        ours.step()
        reference.step()
    assert not torch.equal(matrix, torch.nn.Parameter(torch.zeros_like(matrix)))
    torch.testing.assert_close(filters.detach().reshape(6, -1), matrix.detach(), rtol=0, atol=0)
    assert ours.state[filters]["momentum_buffer"].shape == filters.shape
    with pytest.raises(ValueError, match="4-D filters"):
        FilterMuon([{"params": [matrix]}], lr=0.02)


def test_muon_filters_takes_the_stems_convs_past_the_pixels():
    model = cnn_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.01, muon_filters=True))
    filters = {n for g in optimizer.filter_muon.param_groups for n in g["names"]}
    convs = {n for n, p in model.named_parameters() if p.ndim == 4}
    first = {n for n, p in model.named_parameters() if p.ndim == 4 and p.shape[1] == 3}
    assert len(first) == 1 and filters == convs - first and len(filters) == 4
    adamw = {n for g in optimizer.adamw.param_groups for n in g["names"]}
    assert first <= adamw and not filters & adamw
    # Without the option the convs all stay with AdamW.
    plain = build_optimizer(cnn_model(), OptimConfig(name="muon", lr=0.01))
    assert plain.filter_muon is None and convs <= {n for g in plain.adamw.param_groups for n in g["names"]}
    # A linear stem has no such filter; AdamW has no such option.
    with pytest.raises(ValueError, match="no trainable conv past the pixels"):
        build_optimizer(tiny_model(), OptimConfig(name="muon", lr=0.01, muon_filters=True))
    with pytest.raises(ValueError, match="muon_filters needs name='muon'"):
        OptimConfig(name="adamw", muon_filters=True)


def test_muon_filters_state_round_trip_continues_the_same_steps():
    model = cnn_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.01, muon_filters=True))
    for seed in range(2):
        loss_step(model, optimizer, seed)
    state = copy.deepcopy(optimizer.state_dict())
    twin = cnn_model()
    twin.load_state_dict(model.state_dict())
    restored = build_optimizer(twin, OptimConfig(name="muon", lr=0.01, muon_filters=True))
    restored.load_state_dict(state)
    loss_step(model, optimizer, 7)
    loss_step(twin, restored, 7)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


# The orthogonalisation's dtype follows the machine ------------------------------------------------------
def test_matrix_muon_in_bf16_is_torchs_muon():
    """MatrixMuon with bf16 orthogonalisation steps exactly as torch.optim.Muon (its checkpoints alike)."""
    torch.manual_seed(0)
    ours_matrix = torch.nn.Parameter(torch.randn(8, 5))
    theirs_matrix = torch.nn.Parameter(ours_matrix.detach().clone())
    ours = MatrixMuon([{"params": [ours_matrix], "weight_decay": 0.05}], lr=0.02, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(
        [{"params": [theirs_matrix], "weight_decay": 0.05}], lr=0.02, adjust_lr_fn="match_rms_adamw"
    )
    for step in range(3):
        grad = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        ours_matrix.grad, theirs_matrix.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_matrix.detach(), theirs_matrix.detach(), rtol=0, atol=0)
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_orthogonalise_in_fp32_orthogonalises_as_bf16_does(shape):
    """Both dtypes take the update to singular values near 1 (the quintic's band, about 0.5 to 1.5)
    along the same directions; fp32 computes in fp32 throughout."""
    update = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = orthogonalise(update, torch.float32), orthogonalise(update, torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == shape
    singular = torch.linalg.svdvals(fp32)
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert (fp32 - bf16.float()).norm() <= 0.05 * fp32.norm()
    assert (fp32 * update).sum() > 0.5 * singular.min() * torch.linalg.svdvals(
        update
    ).sum()  # along the update


def test_the_orthogonalisation_dtype_follows_the_calibration():
    """bf16 where the native bf16 products measured fast, fp32 on a CPU without bf16 units (where
    torch's bf16 Newton-Schulz ran at 1 GFLOP/s)."""
    slow = Calibration("test", {"fp32": 93.3, "bf16": 1.27, "bf16_fp32_units": 128.3})
    for figures, expected in ((BF16_FAST, torch.bfloat16), (slow, torch.float32)):
        with use_calibration(figures):
            assert newton_schulz_dtype(torch.device("cpu")) == expected
            optimizer = build_optimizer(cnn_model(), OptimConfig(name="muon", lr=0.01, muon_filters=True))
        assert optimizer.muon.ns_dtype == optimizer.filter_muon.ns_dtype == expected
