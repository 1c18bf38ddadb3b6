"""The towers' CPU attention path (model/attention.py) gives open_clip's results, and under bf16 autocast its
matrix products really run in bf16 (SDPA's CPU math kernel would run them in fp32); fp32 keeps SDPA."""
from open_clip.transformer import Attention
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import TowerAttention
from model.backbone import ARCHITECTURES, build_clip, residual_blocks

N, L, WIDTH, HEADS = 3, 7, 32, 4


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    reference = Attention(WIDTH, HEADS)
    with torch.no_grad():
        reference.in_proj_bias.normal_()
    ours = Attention(WIDTH, HEADS)
    ours.load_state_dict(reference.state_dict())
    ours.__class__ = TowerAttention
    return reference, ours


def _masks():
    causal = torch.full((L, L), float("-inf")).triu(1)
    blocked = torch.zeros(N * HEADS, L, L, dtype=torch.bool)
    blocked[:, :, -2:] = True  # the last two positions are padding for every query
    return {"none": None, "causal float": causal, "bool per head": blocked}


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_matmul_path_matches_open_clip_forward_and_backward(mask_name):
    mask = _masks()[mask_name]
    reference, ours = _pair()
    x = torch.randn(N, L, WIDTH)
    outputs, grads = [], []
    for forward in (reference.forward, ours.matmul_attention):
        xi = x.clone().requires_grad_()
        out = forward(xi, attn_mask=mask)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([xi.grad] + [p.grad for p in forward.__self__.parameters()])
    for got, expected in zip([outputs[1]] + grads[1], [outputs[0]] + grads[0]):
        # equal up to float rounding, relative to the tensor's largest entry (the kernels sum in other orders)
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.addmm):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_keeps_the_attention_products_in_bf16():
    reference, ours = _pair()
    x = torch.randn(N, L, WIDTH)
    mask = _masks()["causal float"]
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as seen:
        out = ours(x, attn_mask=mask)
    # in-projection, the two attention products, out-projection: all bf16
    assert len(seen.dtypes) >= 4 and set(seen.dtypes) == {torch.bfloat16}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x, attn_mask=mask), atol=0.05, rtol=0.05)


def test_bf16_path_errors_stay_near_open_clips_bf16_errors_at_vit_length():
    # 193 tokens, as ViT-B/16 at 384x128. Under bf16 autocast open_clip's SDPA (math kernel) upcasts to fp32
    # inside; ours keeps the products and the softmax in bf16. Against the fp32 result, our output and gradients
    # may be off by bf16 rounding, but not by much more than SDPA's (measured ratio ~1.3).
    reference, ours = _pair(1)
    x = torch.randn(2, 193, WIDTH) * 2

    def run(module, dtype):
        xi = x.clone().requires_grad_()
        module.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = module(xi)
        out.float().square().sum().backward()
        return [out.float(), xi.grad] + [p.grad.clone() for p in module.parameters()]

    exact = run(reference, torch.float32)
    sdpa_bf16, ours_bf16 = run(reference, torch.bfloat16), run(ours, torch.bfloat16)
    for want, theirs, got in zip(exact, sdpa_bf16, ours_bf16):
        assert (got - want).norm() <= 1.6 * (theirs - want).norm() + 1e-6 * want.norm()


def test_fp32_keeps_sdpa():
    _, ours = _pair()
    with _MatmulDtypes() as seen:
        ours(torch.randn(N, L, WIDTH))
    assert len(seen.dtypes) == 2  # the two projections; the attention itself is one SDPA call


def test_both_towers_use_the_cpu_path():
    clip = build_clip(ARCHITECTURES["ViT-Tiny"], (32, 16), 8)
    blocks = residual_blocks(clip)
    assert len(blocks) == 4 and all(type(b.attn) is TowerAttention for b in blocks)
