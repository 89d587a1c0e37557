"""Every fast path computes what the plain model computes, in fp32 and within bf16 rounding.

The fast paths are the modules of vitkit.fast, swapped into a built model by `apply_fast_paths`: the
fused ParallelBlock (one LayerNorm statistics pass, norms and LayerScale folded into the dense layers,
all branches in one matmul and one attention call), in-place GELU and residual in inference, q, k, v
as three products in training, and the kernel choices of fast/kernels.py (bf16 products on fp32
units on CPUs without AMX, explicit attention in low-precision CPU training). Each is held equal to
the plain model of vitkit.models (nn.Linear, SDPA), bitwise where it does the same arithmetic. The
CUDA paths (bf16 autocast, SDPA's flash kernel, torch.compile) are checked against the CPU fp32 model
when a GPU is present.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_config
from vitkit.fast import Kernels, apply_fast_paths, choose_kernels, kernels
from vitkit.fast.blocks import FastAttention, FastBlock, FastMlp, FusedParallelBlock
from vitkit.fast.kernels import FastConv2d, FastLinear, attention, linear, linear_chunks
from vitkit.fast.machine import use_calibration
from vitkit.models.vit import ParallelBlock, VisionTransformer

BF16 = dict(rtol=2e-2, atol=2e-2)
# Three products with slices of the qkv weight instead of one: the same sums, possibly other GEMM
# blocking, hence fp32 rounding rather than bitwise equality in training.
FP32 = dict(rtol=1e-5, atol=1e-5)
FP32_UNITS = Kernels(bf16_gemm_in_fp32=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def flag_rules():
    """The kernels as the flag rules choose them (the calibration's choices: test_calibration.py)."""
    with use_calibration(None):
        yield


def _fast(module: nn.Module, device: str = "cpu", precision: str = "fp32") -> nn.Module:
    """A fast copy of `module`; the original stays the plain reference."""
    return apply_fast_paths(copy.deepcopy(module), device, precision)


def _parallel_block(parallel: int, drop_path: float = 0.0, **overrides) -> ParallelBlock:
    torch.manual_seed(0)
    block = ParallelBlock(tiny_config(parallel=parallel, **overrides), drop_path)
    # Non-trivial norms and LayerScale, so folding them into the dense layers is really tested.
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith(("norm.weight", "ls.gamma")):
                param.uniform_(0.5, 1.5)
            elif name.endswith("norm.bias"):
                param.normal_(0, 0.5)
    return block


@pytest.mark.parametrize(
    "parallel,overrides",
    [(2, {"layer_scale_init": 0.1}), (3, {}), (2, {"qkv_bias": False, "gelu": "tanh"}), (1, {})],
)
def test_fused_parallel_block_equals_branches_in_value_and_gradient(parallel, overrides):
    reference = _parallel_block(parallel, **overrides)
    block = _fast(reference)
    assert isinstance(block, FusedParallelBlock)
    x = torch.randn(2, 17, 32)
    fused_out, reference_out = block(x), reference(x)
    torch.testing.assert_close(fused_out, reference_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(fused_out)
    fused_out.backward(grad)
    reference_out.backward(grad)
    for (name, ours), theirs in zip(block.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_parallel_block_in_bf16():
    plain = _parallel_block(2, layer_scale_init=0.1).eval()
    block = _fast(plain)
    x = torch.randn(2, 17, 32)
    reference = plain(x)
    with torch.no_grad():
        torch.testing.assert_close(block.to(torch.bfloat16)(x.bfloat16()).float(), reference, **BF16)
        block.float()
        with torch.autocast("cpu", torch.bfloat16):
            torch.testing.assert_close(block(x).float(), reference, **BF16)


def test_inference_keeps_the_fused_weights_until_a_parameter_changes(monkeypatch):
    block = _fast(_parallel_block(2, layer_scale_init=0.1)).eval()
    fused = []
    fuse = block._fuse
    monkeypatch.setattr(block, "_fuse", lambda: fused.append(1) or fuse())
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        first = block(x)
        torch.testing.assert_close(block(x), first)
        assert len(fused) == 1  # built once, then kept
        block.ffns[1].mlp.fc2.weight.mul_(2.0)  # an optimizer-style in-place update
        torch.testing.assert_close(block(x), block.forward_branches(x), rtol=1e-5, atol=1e-5)
        assert len(fused) == 2
        state = {k: v + 0.1 for k, v in block.state_dict().items()}
        block.load_state_dict(state)  # copy_ into the same storage
        torch.testing.assert_close(block(x), block.forward_branches(x), rtol=1e-5, atol=1e-5)
        assert len(fused) == 3
        with torch.autocast("cpu", torch.bfloat16):  # kept across autocast: the fold is in fp32
            torch.testing.assert_close(block(x).float(), block.forward_branches(x), **BF16)
        assert block(x).dtype == torch.float32 and len(fused) == 3
    block.train()  # gradients on: rebuilt per call, so they reach the branch parameters
    block(x).sum().backward()
    assert block._fused_cache is None and block.attns[0].norm.weight.grad is not None


@pytest.mark.parametrize("parallel", [1, 2])
def test_inference_in_place_ops_equal_the_gradient_path_and_spare_the_input(parallel):
    """In inference, blocks apply GELU and the MLP residual in place on their own fresh tensors: the
    values equal the autograd path's and the plain model's, and the caller's tensor is left as it was."""
    torch.manual_seed(0)
    plain = VisionTransformer(tiny_config(parallel=parallel, layer_scale_init=0.5)).eval()
    model = _fast(plain)
    images = torch.randn(2, 3, 32, 32)
    reference = model(images)  # gradients on: out of place
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(images), plain(images), rtol=1e-5, atol=1e-6)
        tokens = torch.randn(2, 17, 32)
        kept = tokens.clone()
        for block in model.blocks:
            block(tokens)
            torch.testing.assert_close(tokens, kept, rtol=0, atol=0)
        intermediates = model.forward_intermediates(images, attention=True)
    grad_intermediates = model.forward_intermediates(images, attention=True)
    for ours, theirs in zip(_tensors(intermediates), _tensors(grad_intermediates), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _tensors(item)] if isinstance(value, (list, tuple)) else []


@pytest.mark.parametrize("gemm", ["native", "fp32"])
@pytest.mark.parametrize("dtype,length", [(torch.bfloat16, 17), (torch.bfloat16, 65), (torch.bfloat16, 197)])
def test_cpu_training_attention_is_explicit_and_equals_sdpa(monkeypatch, gemm, dtype, length):
    """Short sequences in bf16 CPU training take softmax(q k^T) v with autograd (on bf16 or fp32
    units); values and gradients equal SDPA's. Inference, fp32 and longer sequences stay on SDPA."""
    monkeypatch.setenv("VITKIT_BF16_GEMM", gemm)
    chosen = choose_kernels("cpu", "bf16")
    assert chosen.explicit_training_attention and chosen.bf16_gemm_in_fp32 == (gemm == "fp32")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = attention(q, k, v, kernels=chosen)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert calls == []  # the explicit product
    torch.testing.assert_close(out, reference, **BF16)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **BF16)
    with torch.no_grad():
        attention(q, k, v, kernels=chosen)
    long = torch.randn(1, 1, 700, 16, dtype=dtype, requires_grad=True)
    attention(long, long, long, kernels=chosen)
    attention(q.float(), k.float(), v.float(), kernels=chosen)
    attention(q, k, v, kernels=choose_kernels("cuda", "bf16"))
    assert len(calls) == 4  # inference, a sequence past the bound, fp32, a GPU's choice


def test_parallel_block_draws_noise_per_branch_on_the_reference_path():
    plain = _parallel_block(2, drop_path=0.5).train()
    block = _fast(plain)
    assert block.noise_per_branch and not _fast(_parallel_block(2)).noise_per_branch
    x = torch.randn(8, 17, 32)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("parallel", [1, 2])
def test_cuda_bf16_flash_attention_matches_cpu_fp32(parallel):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=parallel)).eval()
    images = torch.randn(4, 3, 32, 32)
    reference = model(images)
    gpu = _fast(model, "cuda", "bf16").cuda()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        torch.testing.assert_close(gpu(images.cuda()).float().cpu(), reference, **BF16)
    gpu.train()
    with torch.autocast("cuda", torch.bfloat16):
        gpu(images.cuda()).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_model_matches_eager():
    torch.manual_seed(0)
    plain = VisionTransformer(tiny_config(parallel=2)).cuda().eval()
    model = _fast(plain, "cuda", "fp32")
    images = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(images), plain(images), rtol=1e-4, atol=1e-4)


def _linear_operands(x_dtype=torch.float32, requires_grad=True):
    torch.manual_seed(0)
    x = torch.randn(2, 17, 48, dtype=x_dtype, requires_grad=requires_grad)
    weight = torch.randn(40, 48, requires_grad=requires_grad)
    bias = torch.randn(40, requires_grad=requires_grad)
    return x, weight, bias


def _assert_within_bf16_scale(ours, theirs, relative=2e-2, name=""):
    """Largest difference within `relative` of the largest value: bf16 rounding of sums whose
    elements can cancel, where an elementwise tolerance would not hold."""
    error, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert error <= relative * scale + 1e-6, (name, error, scale)


def _widened(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).float()


@pytest.mark.parametrize("chunks", [1, 3])
def test_bf16_linear_on_fp32_units_is_the_product_of_the_bf16_operands(chunks):
    """Under bf16 autocast with the fp32-units kernel, each output (of `chunks` slices of the output
    features, as q, k and v) is exactly the fp32 product of the operands rounded to bf16, rounded to
    bf16; the gradients are the fp32 products of the bf16 operands and gradients, in the inputs'
    dtypes; and all of it is within bf16 rounding of the native bf16 kernel."""
    x, weight, bias = _linear_operands()
    with torch.autocast("cpu", torch.bfloat16):
        outs = linear_chunks(x, weight, bias, chunks, FP32_UNITS)
    expected = F.linear(_widened(x), _widened(weight), _widened(bias)).to(torch.bfloat16).chunk(chunks, -1)
    assert len(outs) == chunks
    for out, want in zip(outs, expected, strict=True):
        assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    grads = [torch.randn_like(out) for out in outs]
    torch.autograd.backward(outs, grads)
    g32 = torch.cat(grads, -1).float().flatten(0, 1)
    x32 = _widened(x).flatten(0, 1)
    torch.testing.assert_close(x.grad, (g32 @ _widened(weight)).view_as(x), rtol=1e-6, atol=1e-6)
    expected_grad_w = (g32.t() @ x32).to(torch.bfloat16).float()
    torch.testing.assert_close(weight.grad, expected_grad_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.grad, g32.sum(0).to(torch.bfloat16).float(), rtol=1e-6, atol=1e-6)
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) * 3

    native_operands = _linear_operands()
    with torch.autocast("cpu", torch.bfloat16):
        native = linear_chunks(*native_operands, chunks)
    torch.autograd.backward(native, grads)
    for ours, theirs in zip(outs, native, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **BF16)
    for ours, theirs in zip((x, weight, bias), native_operands, strict=True):
        # The native input gradient sums `chunks` bf16-rounded parts: compare at the tensor's scale.
        _assert_within_bf16_scale(ours.grad, theirs.grad.float())


def test_bf16_linear_on_fp32_units_with_bf16_tensors_and_without_autocast():
    """A model converted to bf16 (no autocast) takes the same kernel: bf16 in, bf16 out, bf16 grads."""
    x, weight, bias = (t.detach().to(torch.bfloat16).requires_grad_() for t in _linear_operands())
    out = linear(x, weight, bias, FP32_UNITS)
    assert torch.equal(out, F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16))
    out.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.bfloat16,) * 3
    torch.testing.assert_close(x.grad.float(), weight.float().sum(0).expand(2, 17, 48), **BF16)


def test_bf16_gemm_choice(monkeypatch):
    """auto: fp32 units on a CPU without AMX, the native kernel with AMX, on other devices, for fp16
    and for fp32; the variable overrides; a bad value or precision is refused by name. The fp32-units
    kernel runs only for bf16 products, whatever the chosen kernels."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("VITKIT_BF16_GEMM", raising=False)
    monkeypatch.setattr(kernels, "_cpu_has_amx", lambda: False)
    assert kernels.bf16_gemm_in_fp32(cpu)
    assert choose_kernels(cpu, "bf16") == Kernels(bf16_gemm_in_fp32=True, explicit_training_attention=True)
    assert choose_kernels(cpu, "fp16") == Kernels(explicit_training_attention=True)
    assert choose_kernels(cpu, "fp32") == Kernels()
    assert choose_kernels("cuda", "bf16") == Kernels()
    assert not kernels.bf16_gemm_in_fp32(torch.device("cuda"))
    monkeypatch.setattr(kernels, "_cpu_has_amx", lambda: True)
    assert not kernels.bf16_gemm_in_fp32(cpu)
    monkeypatch.setenv("VITKIT_BF16_GEMM", "fp32")
    assert kernels.bf16_gemm_in_fp32(cpu)
    monkeypatch.setenv("VITKIT_BF16_GEMM", "native")
    assert not kernels.bf16_gemm_in_fp32(cpu)
    monkeypatch.setenv("VITKIT_BF16_GEMM", "fast")
    with pytest.raises(ValueError, match="VITKIT_BF16_GEMM='fast'"):
        kernels.bf16_gemm_in_fp32(cpu)
    with pytest.raises(ValueError, match="precision 'auto'"):
        choose_kernels(cpu, "auto")

    calls = []
    monkeypatch.setattr(kernels._Bf16LinearInFp32, "apply", lambda *a: calls.append(1) or (F.linear(*a[:3]),))
    x, weight, bias = _linear_operands(requires_grad=False)
    linear(x, weight, bias, FP32_UNITS)  # fp32
    linear(x.half(), weight.half(), bias.half(), FP32_UNITS)
    with torch.autocast("cpu", torch.float16):
        linear(x, weight, bias, FP32_UNITS)
    with torch.autocast("cpu", torch.bfloat16):
        linear(x, weight, bias)  # the plain kernels
    assert calls == []
    with torch.autocast("cpu", torch.bfloat16):
        linear(x, weight, bias, FP32_UNITS)
    assert calls == [1]


@pytest.mark.parametrize("parallel", [1, 2])
def test_bf16_model_on_fp32_units_matches_the_native_kernels(monkeypatch, parallel):
    """The whole model, in bf16 inference and in bf16-autocast training, is within bf16 rounding of
    the native bf16 kernels, in features and in every parameter's gradient; the fp32 units engage."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=parallel, layer_scale_init=0.5, zero_head=False))
    images = torch.randn(4, 3, 32, 32)
    runs = {}
    for gemm in ("native", "fp32"):
        monkeypatch.setenv("VITKIT_BF16_GEMM", gemm)
        bf16 = _fast(model, "cpu", "bf16").to(torch.bfloat16).eval()
        assert isinstance(bf16.patch_embed.proj, FastConv2d) == (gemm == "fp32")
        with torch.inference_mode():
            features = bf16.forward_features(images.bfloat16()).float()
        trained = _fast(model, "cpu", "bf16").train()
        with torch.autocast("cpu", torch.bfloat16):
            trained(images).float().square().mean().backward()
        runs[gemm] = features, {n: p.grad for n, p in trained.named_parameters()}
    torch.testing.assert_close(runs["fp32"][0], runs["native"][0], rtol=5e-2, atol=5e-2)
    for name, grad in runs["fp32"][1].items():
        _assert_within_bf16_scale(grad, runs["native"][1][name], 5e-2, name)


@pytest.mark.parametrize(
    "backend",
    [
        # AOTAutograd traces forward and backward as inductor would, without generating C++ (seconds).
        "aot_eager",
        # Inductor's C++ code generation on top: about 40 s on two cores, hence `make test-slow`.
        pytest.param("inductor", marks=pytest.mark.slow),
    ],
)
def test_bf16_kernels_compile_to_what_eager_computes(monkeypatch, backend):
    """torch.compile traces the fp32-units linear (an autograd.Function) and attention as one graph
    (fullgraph: no break): same values and gradients as eager."""
    monkeypatch.setenv("VITKIT_BF16_GEMM", "fp32")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = apply_fast_paths(VisionTransformer(tiny_config(zero_head=False)).train(), "cpu", "bf16")
    assert isinstance(model.blocks[0].attn.qkv, FastLinear)
    compiled = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for module in (model, torch.compile(compiled, fullgraph=True, backend=backend)):
        with torch.autocast("cpu", torch.bfloat16):
            out = module(images)
        out.float().sum().backward()
        outputs.append(out.float())
    # Compiled code rounds at other places (fused elementwise kernels), hence the bf16 tolerance of a
    # model's output rather than of one operation.
    torch.testing.assert_close(outputs[1], outputs[0], rtol=5e-2, atol=5e-2)
    for (name, ours), theirs in zip(compiled.named_parameters(), model.parameters(), strict=True):
        _assert_within_bf16_scale(ours.grad, theirs.grad, 5e-2, name)
    torch._dynamo.reset()


def test_bf16_inference_attention_on_fp32_units_even_under_autocast(monkeypatch):
    """Inference attention of bf16 q, k, v runs SDPA on the widened operands, also inside a bf16
    autocast region (which would otherwise cast SDPA back to bf16), and returns bf16 within bf16
    rounding of the native kernel."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.bfloat16) for _ in range(3))
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(a[0].dtype) or sdpa(*a, **kw)
    )
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v, kernels=FP32_UNITS)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    expected = sdpa(q.float(), k.float(), v.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.float(), sdpa(q, k, v).float(), **BF16)


# The whole model: fast against plain -------------------------------------------------------------
MODELS = {
    "sequential": {},
    "parallel": {"parallel": 2, "layer_scale_init": 0.5},
    "hmlp stem, map pool": {"stem": "hmlp", "img_size": 32, "patch_size": 16, "pool": "map"},
    "conv stem, registers, rope": {"stem": "conv", "num_reg_tokens": 2, "pos_embed": "rope"},
}


@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_fast_model_equals_the_plain_model_in_train_and_eval(overrides):
    """fp32 on a CPU: inference is bitwise the plain model's (in-place ops do the same arithmetic)
    except the fused parallel block (folded weights: fp32 rounding); training (q, k, v as three
    products, fused branches) equals it in value and every gradient within fp32 rounding."""
    torch.manual_seed(0)
    plain = VisionTransformer(tiny_config(**overrides))
    model = _fast(plain)
    images = torch.randn(3, 3, 32, 32)
    plain.eval(), model.eval()
    with torch.no_grad():
        ours, theirs = model(images), plain(images)
    if overrides.get("parallel", 1) == 1:
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours, theirs, **FP32)
    plain.train(), model.train()
    ours, theirs = model(images), plain(images)
    torch.testing.assert_close(ours, theirs, **FP32)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    for (name, mine), other in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_apply_swaps_classes_in_place_and_keeps_the_state():
    """The same parameter objects, names and state dict; applying again for fp32 takes the dense
    layers back to torch's kernels; every block, attention and MLP takes its fast class."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=2, pool="map"))
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_fast_paths(model, "cpu", "bf16") is model
    assert dict(model.named_parameters()) == params
    assert (
        all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        and state.keys() == model.state_dict().keys()
    )
    classes = {type(m) for m in model.modules()}
    assert {FusedParallelBlock, FastAttention, FastMlp} <= classes and nn.Linear in classes  # the head
    assert isinstance(model.attn_pool.mlp, FastMlp)
    assert isinstance(model.blocks[0].attns[0].attn, FastAttention)
    expected_dense = kernels.bf16_gemm_in_fp32(torch.device("cpu"))
    assert isinstance(model.blocks[0].ffns[0].mlp.fc1, FastLinear) == expected_dense
    assert not isinstance(model.attn_pool.q, FastLinear) and not isinstance(model.head, FastLinear)
    apply_fast_paths(model, "cpu", "fp32")
    assert type(model.blocks[0].ffns[0].mlp.fc1) is nn.Linear and type(model.patch_embed.proj) is nn.Conv2d
    assert model.blocks[0].kernels == Kernels() and model.blocks[0].attns[0].attn.kernels == Kernels()
    assert isinstance(copy.deepcopy(model).blocks[0], FusedParallelBlock)
    assert not any(isinstance(m, FastBlock) for m in VisionTransformer(tiny_config()).modules())
    assert isinstance(_fast(ParallelBlock(tiny_config(parallel=2))), FusedParallelBlock)
