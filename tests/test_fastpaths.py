"""Every fast path computes what its reference computes, in fp32 and within bf16 rounding.

Fast paths of models/vit.py: `attend` (explicit attention when training on CPU, SDPA otherwise) and the
fused ParallelBlock (one LayerNorm statistics pass, folded norms and LayerScale, all branches in one
matmul and one attention call) against `forward_branches`. CUDA paths (bf16 autocast, SDPA's flash
kernel, torch.compile) are checked against the CPU fp32 model when a GPU is present.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from vitkit.models.vit import ParallelBlock, VisionTransformer, attend

BF16 = dict(rtol=2e-2, atol=2e-2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(dtype: torch.dtype, requires_grad: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 3, 17, 8, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, {}), (torch.bfloat16, BF16)])
def test_training_attention_equals_sdpa_in_value_and_gradient(dtype, tolerance):
    q, k, v = _qkv(dtype, requires_grad=True)
    out = attend(q, k, v)  # inputs need grad on CPU: the explicit path
    reference_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*reference_inputs)
    torch.testing.assert_close(out, reference, **tolerance)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    for ours, theirs in zip((q, k, v), reference_inputs, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **tolerance)


def test_inference_attention_is_sdpa():
    q, k, v = _qkv(torch.float32, requires_grad=False)
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_training_attention_applies_dropout():
    q, k, v = _qkv(torch.float32, requires_grad=True)
    assert not torch.allclose(attend(q, k, v, dropout=0.5), attend(q, k, v))


def test_model_gives_the_same_logits_with_and_without_autograd():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inference = model(images)
    torch.testing.assert_close(model(images), inference)


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
