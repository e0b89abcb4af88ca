"""Named model sizes, as one-line constructors (DiT's `DiT_models` registry).

    tiny       CPU: the 32 px built-in world, ~2 steps/s on 2 cores (batch 8 x 640 tokens)
    small      one GPU: the built-in world at higher resolution / longer clips
    wan2.2-5b-pixel  Wan2.2-TI2V-5B's transformer blocks (dim 3072, 30 layers, 24 heads of 128, ffn
               14336) on the built-in world's pixels with a learned text encoder: the 5B shape
               driven end to end by launch/grpo.py (scaling runs, benchmarks/scaling.py)
    wan2.2-5b  Wan2.2-TI2V-5B's transformer (48-channel VAE latents, umT5-XXL text); loaded
               from a checkpoint (wan_compat.load_wan_pretrained), never trained from scratch

`model.preset` in the run config picks one; `model.patch_size` (pixels per patch side) is passed
as an override for the pixel presets.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch.nn as nn

from spiral_rl.models.dit import DiT, DiTConfig
from spiral_rl.models.text import TextEncoder, TextEncoderConfig


# Each preset's fields, then the caller's overrides (`|` lets an override replace a preset field).
def tiny(**overrides) -> DiTConfig:
    return DiTConfig(**dict(dim=96, num_heads=3, num_layers=4, ffn_dim=384, text_dim=96,
                            patch_size=(1, 4, 4)) | overrides)


def small(**overrides) -> DiTConfig:
    return DiTConfig(**dict(dim=1024, num_heads=16, num_layers=16, ffn_dim=4096, text_dim=512,
                            patch_size=(1, 4, 4)) | overrides)


def wan22_5b(**overrides) -> DiTConfig:
    return DiTConfig(**dict(in_channels=48, out_channels=48, dim=3072, num_heads=24, num_layers=30,
                            ffn_dim=14336, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2)) | overrides)


def wan22_5b_pixel(**overrides) -> DiTConfig:
    return wan22_5b(**dict(in_channels=3, out_channels=3, text_dim=512, patch_size=(1, 4, 4)) | overrides)


PRESETS: dict[str, Callable[..., DiTConfig]] = {"tiny": tiny, "small": small, "wan2.2-5b-pixel": wan22_5b_pixel,
                                                "wan2.2-5b": wan22_5b}

# The learned text encoder of each pixel preset (its width is the DiT's text_dim). None: the
# preset takes an external encoder's embeddings (umT5-XXL for Wan), see text.TextEncoderFn.
TEXT_PRESETS: dict[str, Callable[[], TextEncoderConfig] | None] = {
    "tiny": lambda: TextEncoderConfig(dim=96, num_layers=2, num_heads=3),
    "small": lambda: TextEncoderConfig(dim=512, num_layers=2, num_heads=8),
    "wan2.2-5b-pixel": lambda: TextEncoderConfig(dim=512, num_layers=2, num_heads=8),
    "wan2.2-5b": None,
}


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {list(PRESETS)}")


def preset_config(preset: str, patch_size: int | tuple[int, int, int] | None = None, **overrides) -> DiTConfig:
    """The DiTConfig of `preset` with DiTConfig field overrides. patch_size may be an int p,
    meaning (1, p, p): frames are never merged, so every frame keeps its own timestep."""
    _check(preset)
    if patch_size is not None:
        overrides["patch_size"] = (1, patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return PRESETS[preset](**overrides)


def build_model(preset: str, **overrides) -> DiT:
    """A randomly initialised DiT of `preset`, e.g. build_model("tiny", patch_size=4)."""
    return DiT(preset_config(preset, **overrides))


def build_text_encoder(preset: str, **overrides) -> TextEncoder:
    """The learned text encoder of a pixel preset, e.g. build_text_encoder("tiny", max_len=32)."""
    _check(preset)
    if TEXT_PRESETS[preset] is None:
        raise ValueError(f"preset {preset!r} has no built-in text encoder; pass embeddings from an "
                         f"external encoder (umT5-XXL for Wan), see spiral_rl.models.text.TextEncoderFn")
    return TextEncoder(replace(TEXT_PRESETS[preset](), **overrides))


def param_count(cfg: DiTConfig) -> int:
    """Parameters of DiT(cfg), computed analytically (no model is built)."""
    d, f, patch = cfg.dim, cfg.ffn_dim, math.prod(cfg.patch_size)
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731 - weight + bias
    attn = 4 * linear(d, d) + 2 * d  # q, k, v, o + RMSNorm weights of q and k
    block = (2 * attn + (2 * d if cfg.cross_attn_norm else 0)  # self-, cross-attention, its norm
             + linear(d, f) + linear(f, d) + 6 * d)  # FFN, modulation
    embed = (cfg.in_channels * patch * d + d  # patch embedding
             + linear(cfg.text_dim, d) + linear(d, d)  # text projection
             + linear(cfg.freq_dim, d) + linear(d, d) + linear(d, 6 * d))  # time MLP, projection
    head = linear(d, cfg.out_channels * patch) + 2 * d
    return embed + cfg.num_layers * block + head


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
