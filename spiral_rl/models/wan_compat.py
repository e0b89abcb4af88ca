"""Load Wan transformer weights into spiral_rl's DiT by renaming keys only.

Two source formats are understood:

- "diffusers": `WanTransformer3DModel.save_pretrained` (a directory with config.json and
  diffusion_pytorch_model[-0000k-of-0000n].safetensors), a pipeline directory with a
  transformer/ subfolder, or the model's state dict;
- "original": the Wan-AI release format (wan/modules/model.py names; possibly prefixed with
  "model.diffusion_model." as in ComfyUI files).

Loading is strict by default: every parameter of our model must be filled, every source tensor
must be used, shapes must agree; otherwise the error names the offending keys. Wan's I2V
variants (CLIP image cross-attention) and VACE/Animate add-ons are not supported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from spiral_rl.models.dit import DiT, DiTConfig

FORMATS = ("diffusers", "original")


class WanLoadError(ValueError):
    """The weights or config cannot be mapped onto spiral_rl's DiT; the message says why."""


# Our module name -> (diffusers name, original Wan name). Parameter suffixes (.weight, .bias)
# carry over unchanged; the rope tables are recomputed, not stored, in all three.
_TOP = {
    "patch_embedding": ("patch_embedding", "patch_embedding"),
    "text_embedding.0": ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    "text_embedding.2": ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    "time_embedding.0": ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    "time_embedding.2": ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    "time_projection.1": ("condition_embedder.time_proj", "time_projection.1"),
    "head.proj": ("proj_out", "head.head"),
    "head.modulation": ("scale_shift_table", "head.modulation"),
}
_BLOCK = {  # inside blocks.{i}.
    **{f"{ours}.{p}": (f"{theirs}.{dp}", f"{ours}.{p}")
       for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for p, dp in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                     ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "norm2": ("norm2", "norm3"),  # the cross-attention norm; original Wan calls it norm3
    "ffn.0": ("ffn.net.0.proj", "ffn.0"),
    "ffn.2": ("ffn.net.2", "ffn.2"),
    "modulation": ("scale_shift_table", "modulation"),
}
# Keys diffusers itself ignores when loading a Wan transformer.
_IGNORED = ("norm_added_q",)


def wan_key(our_key: str, fmt: str = "diffusers") -> str:
    """The name of our state-dict key `our_key` in a Wan checkpoint of format `fmt`."""
    prefix, rest, table = "", our_key, _TOP
    if our_key.startswith("blocks."):
        _, i, rest = our_key.split(".", 2)
        prefix, table = f"blocks.{i}.", _BLOCK
    for ours, names in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return prefix + names[FORMATS.index(fmt)] + rest[len(ours):]
    raise KeyError(f"no Wan name known for {our_key!r}")


def detect_format(state_dict: Mapping[str, Any]) -> str:
    if any(k.startswith("condition_embedder.") for k in state_dict):
        return "diffusers"
    if any(k.startswith("time_embedding.") for k in state_dict):
        return "original"
    sample = ", ".join(list(state_dict)[:5]) or "(empty)"
    raise WanLoadError(f"not a Wan transformer state dict: no condition_embedder.* (diffusers) or "
                       f"time_embedding.* (original) keys; first keys: {sample}")


# --------------------------------------------------------------------------- reading from disk


def _model_dir(path: Path) -> Path:
    """The directory holding the transformer: `path` itself or a pipeline's transformer/."""
    if not path.exists():
        raise FileNotFoundError(f"Wan weights not found: {path} does not exist")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:  # sharded checkpoint: the index names every shard
        try:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise WanLoadError(f"corrupt shard index {index[0]}: {e}") from e
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors")) or sorted(
        p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if not files:
        raise WanLoadError(f"no weights in {path}: expected diffusion_pytorch_model.safetensors "
                           f"(diffusers save_pretrained), a sharded *.safetensors.index.json, or *.pt/*.bin")
    return files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Wan checkpoint file or directory (shards merged), on CPU."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(_model_dir(Path(path))):
        if not f.is_file():
            raise WanLoadError(f"missing weight shard {f}")
        try:
            sd.update(load_file(str(f)) if f.suffix == ".safetensors"
                      else torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated / corrupt files raise assorted errors
            raise WanLoadError(f"could not read weights from {f}: {type(e).__name__}: {e}") from e
    return sd


def read_config(path: str | Path) -> dict:
    f = _model_dir(Path(path))
    f = f / "config.json" if f.is_dir() else f
    try:
        return json.loads(f.read_text())
    except FileNotFoundError as e:
        raise WanLoadError(f"no config.json in {f.parent}") from e
    except ValueError as e:
        raise WanLoadError(f"corrupt config {f}: {e}") from e


# --------------------------------------------------------------------------- config and weights


def config_from_diffusers(config: Mapping[str, Any] | str | Path, **overrides) -> DiTConfig:
    """DiTConfig for a Wan transformer config: diffusers' WanTransformer3DModel config (a dict,
    its FrozenDict, or a directory with config.json), or the original release's WanModel config."""
    c = dict(read_config(config) if isinstance(config, (str, Path)) else config)
    cls = c.get("_class_name", "WanTransformer3DModel")
    if cls == "WanModel" or "num_heads" in c:  # original Wan release
        if c.get("model_type", "t2v") not in ("t2v", "ti2v"):
            raise WanLoadError(f"Wan model_type={c['model_type']!r} is not supported (only t2v / ti2v)")
        c = {"patch_size": c.get("patch_size", (1, 2, 2)), "num_attention_heads": c["num_heads"],
             "attention_head_dim": c["dim"] // c["num_heads"], "in_channels": c["in_dim"],
             "out_channels": c["out_dim"], "text_dim": c.get("text_dim", 4096),
             "freq_dim": c["freq_dim"], "ffn_dim": c["ffn_dim"], "num_layers": c["num_layers"],
             "cross_attn_norm": c.get("cross_attn_norm", True), "eps": c.get("eps", 1e-6)}
    elif cls != "WanTransformer3DModel":
        raise WanLoadError(f"config is for {cls}, not WanTransformer3DModel")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if c.get(key) is not None:
            raise WanLoadError(f"{key}={c[key]}: Wan I2V image cross-attention is not supported")
    heads, head_dim = c.get("num_attention_heads", 40), c.get("attention_head_dim", 128)
    in_channels = c.get("in_channels", 16)
    return DiTConfig(
        in_channels=in_channels, out_channels=c.get("out_channels") or in_channels,
        dim=heads * head_dim, num_heads=heads, num_layers=c.get("num_layers", 40),
        ffn_dim=c.get("ffn_dim", 13824), text_dim=c.get("text_dim", 4096), freq_dim=c.get("freq_dim", 256),
        patch_size=tuple(c.get("patch_size", (1, 2, 2))), cross_attn_norm=c.get("cross_attn_norm", True),
        eps=c.get("eps", 1e-6), **overrides)


@dataclass
class LoadReport:
    format: str
    missing: list[str] = field(default_factory=list)  # ours, unfilled: "our_key (expected source_key)"
    unexpected: list[str] = field(default_factory=list)  # source keys nothing of ours uses
    mismatched: list[str] = field(default_factory=list)  # "our_key: ours (shape) vs source (shape)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def listing(name, items):
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {len(items)} {name}: " + ", ".join(items[:20]) + more if items else ""
        return (f"Wan ({self.format}) -> DiT:" + listing("missing", self.missing)
                + listing("unexpected", self.unexpected) + listing("shape mismatches", self.mismatched))


def load_wan_state_dict(model: DiT, state_dict_or_dir: Mapping[str, torch.Tensor] | str | Path,
                        strict: bool = True, fmt: str = "auto") -> LoadReport:
    """Copy Wan weights (a state dict, a checkpoint file or a directory) into `model`.

    fmt: "auto" (detect), "diffusers" or "original". strict: raise WanLoadError naming every
    missing, unexpected or mis-shaped key; otherwise load what matches and return the report.
    A model built on the meta device gets the source tensors assigned (no copy, their dtype).
    """
    src = state_dict_or_dir
    sd = read_state_dict(src) if isinstance(src, (str, Path)) else dict(src)
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
          if not any(s in k for s in _IGNORED)}
    fmt = detect_format(sd) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not 'auto' or one of {FORMATS}")

    ours = model.state_dict()
    source_of = {k: wan_key(k, fmt) for k in ours}
    report = LoadReport(fmt)
    report.missing = [f"{k} (expected {s})" for k, s in source_of.items() if s not in sd]
    used = set(source_of.values())
    report.unexpected = sorted(k for k in sd if k not in used)
    report.mismatched = [f"{k}: ours {tuple(ours[k].shape)} vs {s} {tuple(sd[s].shape)}"
                         for k, s in source_of.items() if s in sd and sd[s].shape != ours[k].shape]
    if strict and not report.ok:
        raise WanLoadError(f"cannot load strictly; {report}")

    matched = {k: sd[s] for k, s in source_of.items() if s in sd and sd[s].shape == ours[k].shape}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(matched, strict=False, assign=on_meta)
    return report


def load_wan_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **overrides) -> DiT:
    """Build a DiT from a Wan checkpoint directory (config.json + weights) and load it strictly.
    The model is built on the meta device, so a 5B checkpoint is never initialised randomly.
    overrides: DiTConfig fields that do not change shapes (attn_backend, gradient_checkpointing)."""
    with torch.device("meta"):
        model = DiT(config_from_diffusers(path, **overrides))
    load_wan_state_dict(model, path)
    return model.to(device=device, dtype=dtype)
