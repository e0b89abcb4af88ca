"""Text conditioning for the world model.

The built-in world speaks a closed grammar (language.py), so its text encoder is small and
learned from scratch: a word-level tokenizer over the grammar's vocabulary, token + position
embeddings and two transformer layers. Real backbones (Wan) instead take an external encoder's
embeddings; any callable with the `TextEncoderFn` signature fits, e.g. Wan's umT5-XXL
(text_dim 4096, 512 tokens, positions after each prompt's length zeroed as Wan's pipeline does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn as nn

from spiral_rl.models.attention import attention
from spiral_rl.world.dynamics import DIRECTIONS
from spiral_rl.world.goals import GOALS
from spiral_rl.world.language import normalise
from spiral_rl.world.scene import PALETTE, SHAPES


class TextEncoderFn(Protocol):
    """What the world model needs from any text encoder.

    texts: B prompts -> (emb (B, L, text_dim) float, mask (B, L) bool, True = real token).
    L may differ between calls; positions where mask is False should be zero.
    """

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------- tokenizer

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIALS = (PAD, UNK, BOS)  # ids 0, 1, 2
# Every word of language.py's clause patterns and region phrases except colours, shapes and
# directions, which come from the world's own tables below.
GRAMMAR_WORDS = (
    "move push make let jump swap the to into against towards toward and with then "
    "side corner top bottom centre middle top-left top-right bottom-left bottom-right"
).split()
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")  # hyphenated region words stay one token


def split_words(text: str) -> list[str]:
    """Lower-cased words of `text` after the grammar's normalisation; punctuation is dropped."""
    return _WORD.findall(normalise(text))


def world_vocabulary() -> list[str]:
    """Specials, then every word the built-in world's instructions use, sorted (deterministic)."""
    words = {*GRAMMAR_WORDS, *PALETTE, *SHAPES, *DIRECTIONS}
    words.update(w for goal in GOALS for w in split_words(goal))
    return [*SPECIALS, *sorted(words)]


class WordTokenizer:
    """Deterministic word-level tokenizer: <bos> + word ids, padded with <pad> to max_len.

    Out-of-vocabulary words map to <unk>; text longer than max_len - 1 words is truncated.
    <bos> means an empty prompt still has one real token (a fully masked row would be NaN) and
    doubles as the "no text" condition for classifier-free guidance.
    """

    def __init__(self, vocab: Sequence[str] | None = None, max_len: int = 64):
        self.vocab = list(vocab) if vocab is not None else world_vocabulary()
        if tuple(self.vocab[:3]) != SPECIALS or len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"vocab must start with {SPECIALS} and have no duplicates")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 (<bos> and one word)")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of <bos> and the words of `text` (unpadded, at most max_len)."""
        unk = self.index[UNK]
        return [self.index[BOS], *(self.index.get(w, unk) for w in split_words(text))][: self.max_len]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in (0, 2))  # skip <pad>, <bos>

    def __call__(self, texts: Sequence[str], device: torch.device | str | None = None):
        """B texts -> (ids (B, max_len) long, mask (B, max_len) bool, True = real token)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)  # <pad> is id 0
        for row, text in enumerate(texts):
            enc = self.encode(text)
            ids[row, : len(enc)] = torch.tensor(enc)
        return ids.to(device), (ids != 0).to(device)


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class TextEncoderConfig:
    dim: int = 128  # output width = the DiT's text_dim
    num_layers: int = 2
    num_heads: int = 4
    # Tokens incl. <bos>. One clause (a sub-action) is <= 9; a whole chained instruction
    # (open-loop mode) up to ~9 per clause, so 64 covers world.max_chain = 6.
    max_len: int = 64
    ffn_mult: int = 4


class TextLayer(nn.Module):
    """Pre-LayerNorm transformer layer over the prompt's tokens (padding masked out)."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); mask: (B, L) bool. -> (B, L, D)"""
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, self.num_heads, -1))  # (B, L, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, hd)
        x = x + self.proj(attention(q, k, v, mask).transpose(1, 2).flatten(2))  # (B, L, D)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """The built-in world's learned text encoder; a `TextEncoderFn`."""

    def __init__(self, cfg: TextEncoderConfig | None = None, vocab: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TextEncoderConfig()
        self.tokenizer = WordTokenizer(vocab, cfg.max_len)
        self.token_embedding = nn.Embedding(len(self.tokenizer), cfg.dim)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        self.layers = nn.ModuleList(TextLayer(cfg.dim, cfg.num_heads, cfg.ffn_mult) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        for emb in (self.token_embedding, self.position_embedding):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B texts -> (emb (B, max_len, dim), mask (B, max_len) bool)."""
        ids, mask = self.tokenizer(texts, device=self.token_embedding.weight.device)
        return self.encode(ids, mask)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: (B, L) long; mask: (B, L) bool. -> (emb (B, L, dim), mask)"""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x, mask)
        # Zero the padding, as Wan zero-pads umT5 output, so padding carries no information
        # even for a consumer that ignores the mask (Wan's cross-attention does).
        return self.norm(x) * mask[..., None], mask
