"""The one attention function every model in spiral_rl calls.

`attention(q, k, v, mask)` dispatches to the fastest kernel that can run the call:

- "flash_attn": FlashAttention-2's `flash_attn_func`, when the package is importable, the
  tensors are on CUDA in fp16/bf16 and there is no mask (it takes no arbitrary masks);
- "sdpa": torch's `scaled_dot_product_attention`, which itself picks flash / cuDNN /
  memory-efficient kernels on GPU and a fused or math kernel on CPU;
- "math": the same torch call pinned to its math kernel (slow, for debugging and benchmarks).

`attention_reference` is the plain softmax(q k^T / sqrt(d)) v that all of them must match.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: only GPU boxes with flash-attn installed have it
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None

BACKENDS = ("auto", "flash_attn", "sdpa", "math")


def _expand_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, Lk) key-padding mask (True = attend) becomes (B, 1, 1, Lk); a mask that already
    has 4 dims, broadcastable to (B, heads, Lq, Lk), is passed through."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be bool (True = attend), got {mask.dtype}")
    if mask.ndim == 2:
        return mask[:, None, None, :]  # (B, 1, 1, Lk)
    if mask.ndim != 4:
        raise ValueError(f"attention mask must be (B, Lk) or (B, heads, Lq, Lk), got {tuple(mask.shape)}")
    return mask


def flash_attn_usable(q: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    return (flash_attn_func is not None and q.is_cuda and mask is None
            and q.dtype in (torch.float16, torch.bfloat16))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head scaled dot-product attention (no dropout, not causal).

    q: (B, heads, Lq, head_dim); k, v: (B, heads, Lk, head_dim);
    mask: None, a (B, Lk) bool key-padding mask or a bool mask broadcastable to
    (B, heads, Lq, Lk); True means "attend". Every query must be able to attend to at least
    one key, or its row is NaN (as in torch).
    backend: "auto" (fastest available), "flash_attn", "sdpa" or "math".
    Returns (B, heads, Lq, head_dim).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "flash_attn" and not flash_attn_usable(q, mask):
        raise RuntimeError("backend='flash_attn' needs the flash-attn package, CUDA fp16/bf16 "
                           "tensors and no mask")
    if backend == "flash_attn" or (backend == "auto" and flash_attn_usable(q, mask)):
        # flash-attn wants (B, L, heads, head_dim)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # (B, heads, Lq, head_dim)
    mask = _expand_mask(mask)
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v in plain torch ops, computed in fp32. Shapes as `attention`."""
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, Lq, Lk)
    mask = _expand_mask(mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run an unmasked call on `device` in `dtype` (for tests and benchmarks)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return ["auto", "sdpa", "math"] + (["flash_attn"] if flash_attn_usable(probe) else [])
