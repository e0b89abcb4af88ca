"""The world model: a video DiT and its text encoder behind one small interface.

    wm = WorldModel.from_config(cfg)                      # random init, or cfg.model.pretrained_path
    loss, stats = wm.loss(context, frames, texts)         # flow matching; uint8 (B, K|T, H, W, 3)
    frames = wm.generate(context, texts, seed=0)          # ODE sampling -> (B, T, H, W, 3) uint8
    wm.save("runs/sft/world_model.pt"); wm = WorldModel.load("runs/sft")

Everything outside this file speaks uint8 frames (B, T, H, W, 3), the world's and the critic's
format; inside, videos are float (B, 3, T, H, W) in [-1, 1] and the context frames are clean
frames prepended to the noisy target (timestep 0), as flow.py expects. `velocity(x, t, cond)` is
the flow.py VelocityFn, so the ODE sampler, the SDE sampler and the GRPO log-probs all call the
same network the same way; `prepare` builds their shared inputs (context, text, noise).

A checkpoint is one torch.save'd dict, loaded with weights_only=True (no pickled code):
{"format", "model": ModelConfig fields, "num_frames", "context_frames", "state_dict"}.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from spiral_rl.config import ModelConfig
from spiral_rl.flow import flow_matching_loss, ode_sample
from spiral_rl.models import build_model, build_text_encoder, frames_to_tensor, tensor_to_frames
from spiral_rl.models.presets import TEXT_PRESETS

CHECKPOINT_FORMAT = "spiral_rl.world_model/1"
CHECKPOINT_NAME = "world_model.pt"  # what launch/sft.py writes into run.output_dir
# Fields that fix the architecture: a checkpoint only loads into a model that agrees on them.
ARCH_FIELDS = ("preset", "patch_size", "max_text_len", "concat_context")
HOW_TO_MAKE = ("make one with `python launch/sft.py configs/sft_ci.yaml run.output_dir=DIR` "
               f"(it writes DIR/{CHECKPOINT_NAME})")


class CheckpointError(RuntimeError):
    """A world-model checkpoint is missing, unreadable or does not fit the model."""


@dataclass
class SampleInputs:
    """What every sampler needs for one batch: context (B, 3, K, H, W) in [-1, 1], the text
    condition (emb, mask), the unconditional one for guidance (or None), noise (B, 3, T, H, W)."""
    context: torch.Tensor
    cond: tuple[torch.Tensor, torch.Tensor]
    uncond: tuple[torch.Tensor, torch.Tensor] | None
    noise: torch.Tensor


def _seeded_noise(shape: tuple[int, ...], seed: int | Sequence[int] | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """(B, ...) float32 standard normal noise, drawn on the CPU so a seed gives the same noise on
    every device. seed: one int for the batch, or one per sample (then sample i's noise does
    not depend on what else is in the batch)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != shape[0]:
            raise ValueError(f"got {len(seed)} seeds for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s)))
                            for s in seed])
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=generator)


class WorldModel(nn.Module):
    """DiT (velocity of the target frames) + learned text encoder, for the pixel presets."""

    def __init__(self, cfg: ModelConfig, num_frames: int, context_frames: int = 2):
        """cfg: the run's `model` section; num_frames: frames T generated per segment;
        context_frames: frames K of memory it is conditioned on (world.context_frames)."""
        super().__init__()
        if TEXT_PRESETS.get(cfg.preset) is None:
            raise NotImplementedError(f"model.preset={cfg.preset!r} takes external text embeddings and "
                                      "VAE latents; WorldModel wraps the pixel presets (tiny, small) so far")
        self.cfg, self.num_frames, self.context_frames = cfg, int(num_frames), int(context_frames)
        self.dit = build_model(cfg.preset, patch_size=cfg.patch_size, attn_backend=cfg.attn_backend,
                               gradient_checkpointing=cfg.gradient_checkpointing, compile=cfg.compile,
                               fp32_residual=cfg.fp32_residual,
                               in_channels=6 if cfg.concat_context else 3)  # RGB (+ reference RGB)
        self.text = build_text_encoder(cfg.preset, max_len=cfg.max_text_len)

    @classmethod
    def from_config(cls, cfg) -> "WorldModel":
        """A model for the run config `cfg`: random init, or the weights at model.pretrained_path."""
        if cfg.model.tf32:  # process-wide; every process that runs the model builds it here
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = cls(cfg.model, cfg.world.segment_frames, cfg.world.context_frames)
        if cfg.model.pretrained_path:
            model.load_weights(cfg.model.pretrained_path)
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ network calls

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> the velocity's cond: (emb (B, L, text_dim), mask (B, L) bool)."""
        return self.text(list(texts))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """flow.py's VelocityFn. x: (B, 3, K + T, H, W), the K clean context frames first (flow.py
        always prepends them); t: (B, K + T); cond: (emb, mask). -> velocity (B, 3, K + T, H, W).
        With model.concat_context the last context frame joins every frame's channels."""
        emb, mask = cond
        k = self.context_frames
        if self.cfg.concat_context:
            if x.shape[2] <= k:
                raise ValueError(f"x has {x.shape[2]} frames; expected {k} context frames and at least one more")
            ref = x[:, :, k - 1:k].expand(-1, -1, x.shape[2], -1, -1)  # (B, 3, F, H, W)
            x = torch.cat([x, ref], dim=1)  # (B, 6, F, H, W)
        return self.dit(x, t, emb, mask)

    def _video(self, frames: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1] on the model's device."""
        frames = torch.as_tensor(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"{name} must be (B, T, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        if name == "context" and frames.shape[1] != self.context_frames:
            raise ValueError(f"context has {frames.shape[1]} frames; this model takes {self.context_frames} "
                             "(world.context_frames when it was built)")
        return frames_to_tensor(frames.to(self.device))

    def loss(self, context: np.ndarray | torch.Tensor, frames: np.ndarray | torch.Tensor,
             texts: Sequence[str], generator: torch.Generator | None = None,
             t_sampling: str = "logit_normal") -> tuple[torch.Tensor, dict]:
        """Flow-matching loss of the target frames given the clean context and the text.

        context: (B, K, H, W, 3) uint8; frames: (B, T, H, W, 3) uint8; texts: B sub-action texts;
        generator: for the noise and noise levels (on the model's device). -> (loss, stats)."""
        x0, ctx = self._video(frames, "frames"), self._video(context, "context")
        if len(texts) != x0.shape[0]:
            raise ValueError(f"got {len(texts)} texts for a batch of {x0.shape[0]}")
        return flow_matching_loss(self.velocity, x0, ctx, self.encode_text(texts), generator,
                                  t_sampling=t_sampling, shift=self.cfg.shift)

    def forward(self, context, frames, texts, generator=None, t_sampling="logit_normal"):
        """The training call (what a DeepSpeed engine runs): `loss`."""
        return self.loss(context, frames, texts, generator, t_sampling)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def prepare(self, context: np.ndarray | torch.Tensor, texts: Sequence[str],
                seed: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                guidance: float | None = None) -> SampleInputs:
        """Inputs shared by the ODE and SDE samplers. context: (B, K, H, W, 3) uint8."""
        ctx = self._video(context, "context")  # (B, 3, K, H, W)
        b, _, _, h, w = ctx.shape
        if len(texts) != b:
            raise ValueError(f"got {len(texts)} texts for a batch of {b}")
        guidance = self.cfg.guidance if guidance is None else guidance
        uncond = self.encode_text([""] * b) if guidance != 1.0 else None  # <bos> only = no text
        noise = _seeded_noise((b, 3, self.num_frames, h, w), seed, generator).to(self.device)
        return SampleInputs(ctx, self.encode_text(texts), uncond, noise)

    @torch.no_grad()
    def generate(self, context: np.ndarray | torch.Tensor, texts: Sequence[str],
                 seed: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 num_steps: int | None = None, guidance: float | None = None) -> np.ndarray:
        """Deterministic ODE sampling of the next segment.

        context: (B, K, H, W, 3) uint8, the frames from memory; texts: B sub-action texts;
        seed: int or one per sample (or a CPU generator) for the initial noise; num_steps /
        guidance default to model.sample_steps / model.guidance. -> (B, T, H, W, 3) uint8."""
        guidance = self.cfg.guidance if guidance is None else guidance
        inp = self.prepare(context, texts, seed, generator, guidance)
        x0 = ode_sample(self.velocity, inp.context, inp.cond, inp.noise,
                        num_steps or self.cfg.sample_steps, self.cfg.shift, guidance, inp.uncond)
        return tensor_to_frames(x0)  # (B, T, H, W, 3)

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> Path:
        """Write weights (fp32, CPU) and model config to `path` atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, "model": asdict(self.cfg), "num_frames": self.num_frames,
                    "context_frames": self.context_frames, "state_dict": state}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **model_overrides: Any) -> "WorldModel":
        """The model saved at `path` (a file, or a dir holding world_model.pt). model_overrides
        change non-architecture ModelConfig fields, e.g. sample_steps=10."""
        ckpt = read_checkpoint(path)
        bad = set(model_overrides) & set(ARCH_FIELDS)
        if bad:
            raise ValueError(f"cannot override architecture fields {sorted(bad)} when loading a checkpoint")
        cfg = ModelConfig(**(ckpt["model"] | model_overrides | {"pretrained_path": str(path)}))
        model = cls(cfg, ckpt["num_frames"], ckpt["context_frames"])
        model._load_state(ckpt, path)
        return model.to(device)

    def load_weights(self, path: str | Path) -> None:
        """Load the weights saved at `path` into this model (its architecture must match)."""
        ckpt = read_checkpoint(path)
        mismatch = {k: (ckpt["model"].get(k), getattr(self.cfg, k)) for k in ARCH_FIELDS
                    if ckpt["model"].get(k) != getattr(self.cfg, k)}
        if mismatch:
            detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatch.items())
            raise CheckpointError(f"checkpoint {path} does not fit this model ({detail}); "
                                  "set those keys to the checkpoint's values")
        self._load_state(ckpt, path)

    def _load_state(self, ckpt: dict, path) -> None:
        try:
            self.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not match the {self.cfg.preset!r} model: "
                                  f"{str(e).splitlines()[0]} ...") from e


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file of `path`: itself, or <path>/world_model.pt for a directory."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at `path`, checked; CheckpointError says what is wrong and how to fix it."""
    file = checkpoint_file(path)
    if not file.is_file():
        where = f"{path} is a directory without {CHECKPOINT_NAME}" if Path(path).is_dir() else f"{file} does not exist"
        raise CheckpointError(f"no world-model checkpoint: {where}; {HOW_TO_MAKE}")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code, ...
        raise CheckpointError(f"{file} is not a readable world-model checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no details'}); it may be truncated or "
                              f"corrupt: re-export it, or {HOW_TO_MAKE}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{file} is not a world-model checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}); {HOW_TO_MAKE}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(ckpt["model"]) - known
    if unknown:
        raise CheckpointError(f"{file} has model config keys this version does not know: {sorted(unknown)}")
    return ckpt
