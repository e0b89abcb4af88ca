"""The world model's video diffusion transformer (DiT), in Wan2.1 / Wan2.2's block layout.

The layout follows Wan exactly, so weights from diffusers' `WanTransformer3DModel` or from an
original Wan checkpoint load by renaming keys only (see wan_compat.py):

    video (B, C, F, H, W) --Conv3d patches (pt, ph, pw)--> tokens (B, N, D), N = F' * H' * W'
    t --sinusoid--> MLP --> temb (D) --> 6 modulation vectors per block (adaLN shift/scale/gate)
    text (B, L, text_dim) --linear, gelu-tanh, linear--> (B, L, D)
    block: self-attention (RMSNorm on q and k across heads, 3D RoPE) -> cross-attention to the
           text -> GELU-tanh FFN, the first and last modulated by the timestep
    head:  LayerNorm + modulation -> linear -> unpatchify -> velocity (B, C, F, H, W)

Memory conditioning: the context frames are part of the video, clean, with timestep 0; only the
frames after them are noisy (Wan2.2 TI2V conditions on its first frame the same way). So the
timestep is per frame, t (B, F'), and every modulation is applied per frame: that equals Wan2.2's
per-token timesteps (diffusers' `expand_timesteps`) without materialising (B, N, 6, D).

Numerics: every LayerNorm / modulation is computed in fp32 and the residual stream is kept in
fp32, as in Wan's original code; the linears run in their weights' dtype (or under bf16 autocast),
so the same code serves fp32 CPU training, autocast GPU training and bf16 inference of a 5B
checkpoint. With `fp32_residual=False` the residual stream is stored in the weights' dtype (each
add still computed in fp32 and rounded once, as diffusers' Wan does): half its memory traffic
and activation memory in bf16, the same function to bf16 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from spiral_rl.models.attention import BACKENDS, attention, fold_device_checks


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 3  # RGB pixels for the built-in world; VAE latent channels for Wan
    out_channels: int = 3
    dim: int = 128  # model width D = num_heads * head_dim
    num_heads: int = 4
    num_layers: int = 4
    ffn_dim: int = 512
    text_dim: int = 128  # width of the incoming text embeddings
    freq_dim: int = 256  # sinusoidal timestep features
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (frames, height, width)
    cross_attn_norm: bool = True  # LayerNorm before cross-attention (Wan: yes)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # The model takes t in [0, 1] (flow-matching noise level, 0 = clean) and embeds t * 1000,
    # the scale of Wan's scheduler timesteps, so pretrained Wan weights see familiar values.
    timestep_scale: float = 1000.0
    attn_backend: str = "auto"  # see attention.py
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile every block (DiT.compile_blocks); needs a GPU or a C++ compiler
    fp32_residual: bool = True  # False: residual stream in the weights' dtype (see Numerics above)

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into num_heads={self.num_heads} "
                             "heads of even size")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (frames, height, width), "
                             f"got {self.patch_size}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is not one of {BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...) -> (..., dim): [cos, sin] of t * max_period^(-i / (dim/2)).

    Computed in fp32 with the same operation order as diffusers' `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`, so loaded Wan weights see bit-identical features.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0,
                     device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3D rotary embedding for a (F', H', W') token grid: (cos, sin), each (N, head_dim / 2).

    head_dim is split into a height part and a width part of 2 * (head_dim // 6) channels each
    and a frame part with the rest; each part is a 1D RoPE over its own axis. Angles are built
    in float64 (as Wan does) because positions times low frequencies lose digits in fp32.
    """
    hw_dim = 2 * (head_dim // 6)
    angles = []
    for axis_dim, n in zip((head_dim - 2 * hw_dim, hw_dim, hw_dim), grid):
        i = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device)
        positions = torch.arange(n, dtype=torch.float64, device=device)
        angles.append(torch.outer(positions, 1.0 / theta ** (i / axis_dim)))  # (n, axis_dim/2)
    nf, nh, nw = grid
    angles = torch.cat([
        angles[0][:, None, None].expand(nf, nh, nw, -1),  # (F', H', W', t_dim/2): frame index
        angles[1][None, :, None].expand(nf, nh, nw, -1),  # row index
        angles[2][None, None, :].expand(nf, nh, nw, -1),  # column index
    ], dim=-1).reshape(nf * nh * nw, head_dim // 2)  # (N, head_dim/2), tokens frame-major
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0, 1), (2, 3), ... of x (B, N, heads, head_dim) by the angles of each
    token; cos, sin: (N, head_dim / 2). Done in fp32 and cast back. Tokens-major like the linear
    that produced x, so the rotation (and its backward) reads and writes memory in order."""
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, head_dim/2): the same angles for every head
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, N, heads, head_dim/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, N, heads, head_dim/2, 2)
    return out.flatten(-2).type_as(x)  # (B, N, heads, head_dim)


# --------------------------------------------------------------------------- per-frame adaLN


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with one (shift, scale) per frame.

    x: (B, N, D), tokens frame-major; shift, scale: (B, T, 1, D) with T = 1 (one timestep for
    the whole clip) or T = F' (one per frame)."""
    x = x.unflatten(1, (shift.shape[1], -1))  # (B, T, N/T, D)
    return (x * (1 + scale) + shift).flatten(1, 2)  # (B, N, D)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x * g with one gate per frame; x: (B, N, D), g: (B, T, 1, D)."""
    return (x.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)  # (B, T, N/T, D) -> (B, N, D)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input or parameter dtype; returns fp32.
    Wan keeps its norms and modulation in fp32 (diffusers: `_keep_in_fp32_modules`), since
    their statistics over thousands of channels are what bf16 rounds worst."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32, returned in the input's dtype (Wan's q/k norm does the same;
    under autocast a bf16 input with fp32 weights would also miss torch's fused kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)


# --------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Multi-head attention with Wan's q/k RMSNorm over all heads together, and optional RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = FP32RMSNorm(dim, eps=eps)
        self.norm_k = FP32RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, N, D) queries; context: (B, L, D) keys and values (None: self-attention);
        mask: (B, L) bool, True = attend; rope: (cos, sin), each (N, head_dim / 2). -> (B, N, D)"""
        context = x if context is None else context
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)  # (B, N, heads, hd)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)  # (B, L, heads, hd)
        v = self.v(context).unflatten(-1, heads)  # (B, L, heads, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N or L, hd), views
        out = attention(q, k, v, mask, self.backend)  # (B, heads, N, hd)
        return self.o(out.transpose(1, 2).flatten(2))  # (B, N, D)


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, FFN; the first and last under adaLN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps, cfg.attn_backend)
        # The text conditions every timestep alike, so this norm is not modulated, only learned.
        self.norm2 = FP32LayerNorm(d, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps, cfg.attn_backend)
        self.norm3 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        # Learned per-block offset added to the shared timestep projection (Wan's scale_shift_table).
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, N, D) tokens, frame-major, in the residual dtype (fp32 unless fp32_residual=False);
        e: (B, T, 6, D) timestep projection, T = 1 or F'; text: (B, L, D); text_mask: (B, L) bool or
        None; rope: (cos, sin), each (N, head_dim / 2). Returns (B, N, D) in x's dtype; every
        residual add is computed in fp32 and rounded once to x's dtype (a no-op for fp32)."""
        mods = (self.modulation + e.float()).unsqueeze(2)  # (B, T, 1, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.unbind(3)  # each (B, T, 1, D)
        dtype = self.ffn[0].weight.dtype  # linears run in their own dtype

        h = modulate(self.norm1(x), shift1, scale1).to(dtype)
        x = (x.float() + gate(self.self_attn(h, rope=rope).float(), gate1)).type_as(x)
        x = (x.float() + self.cross_attn(self.norm2(x).to(dtype), text, text_mask).float()).type_as(x)
        h = modulate(self.norm3(x), shift2, scale2).to(dtype)
        return (x.float() + gate(self.ffn(h).float(), gate2)).type_as(x)


class Head(nn.Module):
    """Final adaLN (shift, scale from the timestep embedding) and projection to patch pixels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.proj = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); temb: (B, T, D) timestep embedding. -> (B, N, C_out * pt * ph * pw)"""
        mods = (self.modulation + temb.float().unsqueeze(2)).unsqueeze(2)  # (B, T, 1, 2, D)
        shift, scale = mods.unbind(3)  # each (B, T, 1, D)
        return self.proj(modulate(self.norm(x), shift, scale).to(self.proj.weight.dtype))


class DiT(nn.Module):
    """Video DiT: (noisy video with clean context frames, per-frame t, text) -> velocity."""

    def __init__(self, cfg: DiTConfig | None = None, **overrides):
        super().__init__()
        self.cfg = cfg = replace(cfg or DiTConfig(), **overrides)
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.fp32_residual = cfg.fp32_residual
        self.init_weights()
        if cfg.compile:
            self.compile_blocks()

    def compile_blocks(self, **options) -> None:
        """torch.compile each block in place (regional compilation; options go to torch.compile).

        Why: in eager mode every fp32 LayerNorm, modulation, gate, RoPE rotation and q/k RMSNorm is
        its own pass over (B, N, D) in fp32, a third of a bf16 step on a 5B model; inductor fuses
        each run of them into one kernel between the matmuls, so the fp32 numerics cost registers,
        not memory traffic. All blocks share one code object and, with parameters as graph
        inputs, one compiled graph: compile time does not grow with depth. Compilation is lazy (at
        the first call) and static in shape (dynamic=False): a new shape compiles again. The state
        dict keys do not change (Module.compile, not a wrapper module)."""
        fold_device_checks()
        for block in self.blocks:
            block.compile(**({"dynamic": False} | options))

    def init_weights(self):
        """Wan's initialisation: xavier linears with zero bias, small embeddings, zero output
        projection (so an untrained model predicts zero velocity, not noise)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.proj.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow-matching velocity of every frame.

        x: (B, C, F, H, W) video in [-1, 1] (pixels) or VAE latents; the first K frames are the
           clean context from memory, the rest noisy. F, H, W must divide by the patch size.
        t: (B, F') noise level of each frame after temporal patching (F' = F for patch 1 in time),
           0 for context frames; or (B,) / () one level for the whole clip. In [0, 1].
        text: (B, L, text_dim) text embeddings; text_mask: (B, L) bool, True = real token, or
           None to attend to every position (Wan's umT5 embeddings are zero-padded instead).
        Returns the velocity (B, C_out, F, H, W) in x's dtype.
        """
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"video (F, H, W)={(f, h, w)} must divide by "
                             f"patch_size={self.cfg.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        t = t.reshape(1, 1).expand(b, 1) if t.ndim == 0 else t.reshape(b, -1)  # (B, T)
        if t.shape[1] not in (1, grid[0]):
            raise ValueError(f"t must be (B,) or (B, {grid[0]}) for {f} frames, got {tuple(t.shape)}")
        dtype = self.patch_embedding.weight.dtype

        tokens = self.patch_embedding(x.to(dtype))  # (B, D, F', H', W')
        # (B, N, D), frame-major. Contiguous: a transposed residual stream would keep its strides
        # through every elementwise op of every block, and norms over D would read it strided.
        residual = torch.float32 if self.fp32_residual else dtype
        tokens = tokens.flatten(2).transpose(1, 2).to(residual).contiguous()
        rope = rope_frequencies(self.cfg.head_dim, grid, self.cfg.rope_theta, x.device)

        freqs = timestep_embedding(t * self.cfg.timestep_scale, self.cfg.freq_dim)  # (B, T, freq_dim)
        temb = self.time_embedding(freqs.to(dtype))  # (B, T, D)
        e = self.time_projection(temb).unflatten(-1, (6, -1))  # (B, T, 6, D)
        text = self.text_embedding(text.to(dtype))  # (B, L, D)

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e, text, text_mask, rope, use_reentrant=False)
            else:
                tokens = block(tokens, e, text, text_mask, rope)

        out = self.head(tokens, temb)  # (B, N, C_out * pt * ph * pw)
        out = out.reshape(b, *grid, pt, ph, pw, -1)  # (B, F', H', W', pt, ph, pw, C_out)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, F', pt, H', ph, W', pw)
        return out.reshape(b, -1, f, h, w).to(x.dtype)  # (B, C_out, F, H, W)


# --------------------------------------------------------------------------- helpers for callers


def frame_timesteps(t: torch.Tensor, num_context: int, num_frames: int) -> torch.Tensor:
    """Per-frame timesteps (B, num_frames): 0 for the first num_context (clean) frames, t (B,) for
    the rest."""
    out = t.float()[:, None].expand(-1, num_frames).clone()  # (B, F)
    out[:, :num_context] = 0.0
    return out


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 video (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1]: the built-in
    world's model input."""
    x = torch.as_tensor(frames).float() / 127.5 - 1.0  # (..., T, H, W, 3)
    return x.movedim(-1, -4)  # (..., 3, T, H, W)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float (..., 3, T, H, W) in [-1, 1] -> uint8 video (..., T, H, W, 3), clipped and rounded."""
    x = x.detach().float().movedim(-4, -1)  # (..., T, H, W, 3)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
