"""A frozen, deterministic text encoder for the embedded shapes world.

No weights can be downloaded here, so the shapes world needs a text encoder that is the same on every machine
without training: each word maps to a fixed pseudo-random vector derived from a stable hash of the word (blake2b),
and a sinusoidal position code is added so that word order ("a red circle and a blue square") stays visible to
the transformer's joint attention. It fills the same two slots the FLUX pipeline fills from T5 and CLIP:

- ``encoder_hidden_states`` (B, L, C): per-token embeddings (T5's role), padded with a fixed pad vector;
- ``pooled_projections`` (B, P): a pooled sentence vector (CLIP's role), the mean of the word vectors.

The empty prompt "" (classifier-free guidance's unconditional input) gives all-pad tokens and a zero pooled vector.

Legend: B batch, L tokens, C token width, P pooled width.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

_WORD_RE = re.compile(r"[a-z0-9]+")
CACHE_PROMPTS = 8192
"""Encoded prompts kept in memory (the shapes world has a few thousand; the glyph world millions)."""


@dataclass
class TextEncoderConfig:
    dim: int = 64
    """Per-token embedding width C (the transformer's ``joint_attention_dim``)."""
    pooled_dim: int = 64
    """Pooled vector width P (the transformer's ``pooled_projection_dim``)."""
    max_tokens: int = 16
    """Tokens per prompt L; longer prompts are truncated, shorter ones padded."""
    seed: int = 0
    """Salt of the word hash: a different seed is a different (equally valid) encoder."""

    def __post_init__(self) -> None:
        for name in ("dim", "pooled_dim", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"text encoder {name}={value!r}: must be a positive integer")
        if self.dim % 2:
            raise ValueError(f"text encoder dim={self.dim}: must be even (sinusoidal position code)")


def tokenize(prompt: str) -> list[str]:
    """Lower-case alphanumeric words; punctuation is dropped."""
    return _WORD_RE.findall(prompt.lower())


class HashTextEncoder(nn.Module):
    """Deterministic word-hash text encoder; has no trainable parameters."""

    def __init__(self, cfg: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TextEncoderConfig()
        c = self.cfg
        position = torch.arange(c.max_tokens, dtype=torch.float64)[:, None]
        freq = torch.exp(torch.arange(0, c.dim, 2, dtype=torch.float64) * (-math.log(10000.0) / c.dim))
        pos_LC = torch.zeros(c.max_tokens, c.dim, dtype=torch.float64)
        pos_LC[:, 0::2] = torch.sin(position * freq)
        pos_LC[:, 1::2] = torch.cos(position * freq)
        self.register_buffer("pos_LC", pos_LC.float(), persistent=False)
        self.register_buffer("pad_C", self._word_vector("<pad>", c.dim, "tok"), persistent=False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _word_vector(self, word: str, dim: int, table: str) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.cfg.seed}/{table}/{word}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return torch.randn(dim, generator=gen)

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._cache:
            if len(self._cache) >= CACHE_PROMPTS:  # the glyph world rarely repeats a prompt: keep the newest
                del self._cache[next(iter(self._cache))]
            c = self.cfg
            words = tokenize(prompt)[: c.max_tokens]
            tokens_LC = self.pad_C.expand(c.max_tokens, c.dim).clone()
            pooled_P = torch.zeros(c.pooled_dim)
            if words:
                tokens_LC[: len(words)] = torch.stack([self._word_vector(w, c.dim, "tok") for w in words])
                tokens_LC[: len(words)] += self.pos_LC[: len(words)]
                pooled_P = torch.stack([self._word_vector(w, c.pooled_dim, "pool") for w in words]).mean(0)
            self._cache[prompt] = (tokens_LC, pooled_P)
        return self._cache[prompt]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts → (encoder_hidden_states (B, L, C), pooled_projections (B, P)) on this module's device."""
        pairs = [self._encode_one(p) for p in prompts]
        device = self.pos_LC.device
        tokens_BLC = torch.stack([t for t, _ in pairs]).to(device)
        pooled_BP = torch.stack([p for _, p in pairs]).to(device)
        return tokens_BLC, pooled_BP
