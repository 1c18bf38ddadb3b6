"""Self-attention of the CLIP towers: open_clip's batch-first attention, with its own path on the CPU.

The blocks call `scaled_dot_product_attention`, as open_clip's 'custom' blocks do, except in bf16 / fp16 on the
CPU: there SDPA's math kernel upcasts its inputs to fp32, so its two matrix products run at fp32 speed, and the
CPU flash kernel's low-precision backward is slower still at these short sequences. In that case the attention
is two matrix products around a softmax, all in the compute dtype: the CPU softmax kernels accumulate bf16/fp16
in fp32 internally, so the probabilities match an fp32 softmax rounded to bf16 (all but a few in a million
equal) while skipping two casts of the [N, heads, L, L] scores each way (3.6x faster softmax fwd+bwd at ViT-B/16
size). In fp32 on the CPU, SDPA's flash kernel is the fastest and stays.
`python -m benchmarks.attention_cpu` measures the choice; its figures are in benchmarks/README.md.

A block can keep its attention probabilities (`keep_weights`, set by the model on each tower's last block when a
head asks for them, as RDE's TSE does): it then computes them explicitly, on any device, and leaves them, averaged
over heads, in `weights` [N, L, L] (float32) after each forward. Otherwise nothing changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.transformer import Attention


class TowerAttention(Attention):
    """open_clip's `Attention` (same parameters, same results up to rounding) with the CPU path above."""

    keep_weights = False
    weights: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        low_precision = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
        if self.keep_weights or (x.device.type == "cpu" and low_precision and self.logit_scale is None):
            return self.matmul_attention(x, attn_mask)
        return super().forward(x, attn_mask)

    def matmul_attention(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention as matmul, softmax, matmul in the input's dtype (any device); with `keep_weights` the
        probabilities, averaged over heads, stay in `weights`."""
        n, length, width = x.shape
        qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.ln_q(q), self.ln_k(k)
        scores = (q * self.scale) @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + additive_mask(attn_mask, n, self.num_heads, length, scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        if self.keep_weights:
            self.weights = probs.detach().float().mean(dim=1)
        out = self.attn_drop(probs) @ v
        if self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(n, length, width)
        return self.out_drop(self.out_proj(self.ln_inner(out)))


def additive_mask(mask: torch.Tensor, n: int, heads: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as open_clip's blocks accept it ([L, L], [N*heads, L, L] or [N, heads, L, L]; bool
    True = blocked, or additive floats) as additive scores that broadcast against [N, heads, L, L]."""
    if mask.ndim == 3:
        mask = mask.reshape(n, heads, length, length)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def tower_attentions(clip) -> list:
    """The attention modules of the last block of the image tower and of the text tower, in that order."""
    return [clip.visual.transformer.resblocks[-1].attn, clip.transformer.resblocks[-1].attn]


def use_tower_attention(blocks) -> None:
    """Give each of open_clip's custom residual blocks the CPU path; the module keeps its parameters."""
    for block in blocks:
        if type(block.attn) is not Attention:
            raise TypeError(f"expected open_clip's Attention in {type(block).__name__}, got {type(block.attn)}")
        # open_clip builds the module inside the block; re-classing it keeps its parameters and state-dict names.
        block.attn.__class__ = TowerAttention
