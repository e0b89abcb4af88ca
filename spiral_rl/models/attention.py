"""The one attention function every model in spiral_rl calls.

`attention(q, k, v, mask)` dispatches to the fastest kernel that can run the call:

- "auto": on a Hopper (or newer) GPU in fp16/bf16, torch SDPA with cuDNN's kernel first (then
  flash, memory-efficient, math: whichever first takes the call); elsewhere flash-attn when
  usable, else "sdpa". cuDNN first because on an H100 it measured fastest at the DiT's shapes
  (benchmarks/attention.py, RESULTS.md), while torch's own order tries its flash kernel first;
- "flash_attn": FlashAttention-2's `flash_attn_func`, when the package is importable, the
  tensors are on CUDA in fp16/bf16 and there is no mask (it takes no arbitrary masks);
- "sdpa": torch's `scaled_dot_product_attention` in torch's own kernel order (flash / memory-
  efficient / cuDNN / math on GPU, a fused or math kernel on CPU);
- "cudnn": the same torch call pinned to cuDNN's kernel (CUDA only; an error if it cannot run);
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

BACKENDS = ("auto", "flash_attn", "sdpa", "cudnn", "math")
# "auto" on Hopper: the first of these that can run the call (set_priority keeps the order).
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def fold_device_checks() -> None:
    """Let torch.compile fold `_hopper_or_newer` (a device's capability never changes) instead of
    tracing into torch.cuda. Called by DiT.compile_blocks rather than applied as a decorator:
    torch.compiler.assume_constant_result imports torch._dynamo, ~2 s of CPU at the start of every
    process that imports this module, and rollout workers and critic servers neither compile nor
    build an optimizer (torch.optim imports it too)."""
    torch.compiler.assume_constant_result(_hopper_or_newer)  # marks the function in place


def cudnn_first(q: torch.Tensor) -> bool:
    """Whether "auto" runs SDPA with cuDNN's kernel first: fp16/bf16 CUDA tensors on sm90+."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and _hopper_or_newer(q.device.index or 0))  # a CUDA tensor always names its index


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head scaled dot-product attention (no dropout, not causal).

    q: (B, heads, Lq, head_dim); k, v: (B, heads, Lk, head_dim);
    mask: None, a (B, Lk) bool key-padding mask or a bool mask broadcastable to
    (B, heads, Lq, Lk); True means "attend". Every query must be able to attend to at least
    one key, or its row is NaN (as in torch).
    backend: "auto" (fastest available), "flash_attn", "sdpa", "cudnn" or "math".
    Returns (B, heads, Lq, head_dim).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "flash_attn" and not flash_attn_usable(q, mask):
        raise RuntimeError("backend='flash_attn' needs the flash-attn package, CUDA fp16/bf16 "
                           "tensors and no mask")
    if backend == "cudnn" and not q.is_cuda:
        raise RuntimeError("backend='cudnn' needs CUDA tensors")
    auto_cudnn = backend == "auto" and cudnn_first(q)
    if backend == "flash_attn" or (backend == "auto" and not auto_cudnn and flash_attn_usable(q, mask)):
        # flash-attn wants (B, L, heads, head_dim)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # (B, heads, Lq, head_dim)
    mask = _expand_mask(mask)
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "cudnn":
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if auto_cudnn:
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
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
    return (["auto", "sdpa", "math"] + (["cudnn"] if probe.is_cuda else [])
            + (["flash_attn"] if flash_attn_usable(probe) else []))
