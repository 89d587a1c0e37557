"""Every fast path computes what its reference computes, in fp32 and within bf16 rounding.

The fast path of models/vit.py is the fused ParallelBlock (one LayerNorm statistics pass, norms and
LayerScale folded into the dense layers, all branches in one matmul and one attention call), held
equal to `forward_branches`. The CUDA paths (bf16 autocast, SDPA's flash kernel, torch.compile) are
checked against the CPU fp32 model when a GPU is present.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from vitkit.models.vit import ParallelBlock, VisionTransformer, attention

BF16 = dict(rtol=2e-2, atol=2e-2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    block = _parallel_block(parallel, **overrides)
    reference = copy.deepcopy(block)
    x = torch.randn(2, 17, 32)
    fused_out, reference_out = block(x), reference.forward_branches(x)
    torch.testing.assert_close(fused_out, reference_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(fused_out)
    fused_out.backward(grad)
    reference_out.backward(grad)
    for (name, ours), theirs in zip(block.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_parallel_block_in_bf16():
    block = _parallel_block(2, layer_scale_init=0.1).eval()
    x = torch.randn(2, 17, 32)
    reference = block.forward_branches(x)
    with torch.no_grad():
        torch.testing.assert_close(block.to(torch.bfloat16)(x.bfloat16()).float(), reference, **BF16)
        block.float()
        with torch.autocast("cpu", torch.bfloat16):
            torch.testing.assert_close(block(x).float(), reference, **BF16)


def test_inference_keeps_the_fused_weights_until_a_parameter_changes(monkeypatch):
    block = _parallel_block(2, layer_scale_init=0.1).eval()
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
    values equal the autograd path's, and the caller's tensor is left as it was."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=parallel, layer_scale_init=0.5)).eval()
    images = torch.randn(2, 3, 32, 32)
    reference = model(images)  # gradients on: out of place
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference, rtol=1e-5, atol=1e-6)
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


@pytest.mark.parametrize("dtype,length", [(torch.bfloat16, 17), (torch.bfloat16, 65), (torch.bfloat16, 197)])
def test_cpu_training_attention_is_explicit_and_equals_sdpa(monkeypatch, dtype, length):
    """Short sequences in bf16 CPU training take softmax(q k^T) v with autograd; values and gradients
    equal SDPA's. Inference, fp32 and longer sequences stay on SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = attention(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert calls == []  # the explicit product
    torch.testing.assert_close(out, reference, **BF16)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **BF16)
    with torch.no_grad():
        attention(q, k, v)
    long = torch.randn(1, 1, 700, 16, dtype=dtype, requires_grad=True)
    attention(long, long, long)
    attention(q.float(), k.float(), v.float())
    assert len(calls) == 3  # inference, a sequence past the bound, fp32


def test_parallel_block_draws_noise_per_branch_on_the_reference_path():
    block = _parallel_block(2, drop_path=0.5).train()
    x = torch.randn(8, 17, 32)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, block.forward_branches(x))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("parallel", [1, 2])
def test_cuda_bf16_flash_attention_matches_cpu_fp32(parallel):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=parallel)).eval()
    images = torch.randn(4, 3, 32, 32)
    reference = model(images)
    gpu = copy.deepcopy(model).cuda()
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
    model = VisionTransformer(tiny_config()).cuda().eval()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-4)
