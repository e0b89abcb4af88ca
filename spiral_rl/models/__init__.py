"""World-model networks: the video DiT (Wan layout), its text encoder, presets, Wan loading.

    from spiral_rl.models import build_model, build_text_encoder, frames_to_tensor
    model, text = build_model("tiny"), build_text_encoder("tiny")
    emb, mask = text(["move the red square left"])
    v = model(x, t, emb, mask)  # x (B, 3, F, H, W) in [-1, 1], t (B, F) -> (B, 3, F, H, W)
"""
from spiral_rl.models.attention import attention, attention_reference, available_backends
from spiral_rl.models.dit import (DiT, DiTConfig, frame_timesteps, frames_to_tensor,
                                  tensor_to_frames)
from spiral_rl.models.presets import (PRESETS, build_model, build_text_encoder,
                                      count_parameters, param_count, preset_config)
from spiral_rl.models.text import (TextEncoder, TextEncoderConfig, TextEncoderFn,
                                   WordTokenizer, world_vocabulary)

__all__ = [
    "attention", "attention_reference", "available_backends",
    "DiT", "DiTConfig", "frame_timesteps", "frames_to_tensor", "tensor_to_frames",
    "PRESETS", "build_model", "build_text_encoder", "count_parameters", "param_count", "preset_config",
    "TextEncoder", "TextEncoderConfig", "TextEncoderFn", "WordTokenizer", "world_vocabulary",
]
