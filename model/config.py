"""``HybridConfig``: the one description of a model's shape, validated on construction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from model.exceptions import ConfigError
from model.tokenizer import VOCAB_SIZE

BLOCK_KINDS = {"G": "gated deltanet", "A": "sliding-window attention"}


@dataclass(frozen=True)
class HybridConfig:
    # Token ids: 256 bytes plus the turn specials of model.tokenizer.
    vocab_size: int = VOCAB_SIZE
    # Width of the residual stream.
    d_model: int = 256
    # Number of blocks; `pattern` is tiled over them.
    n_layers: int = 4
    # Mixer per layer, G = Gated DeltaNet (owns fast weights S), A = sliding-window attention.
    pattern: str = "GAGA"
    # Heads of both mixers; each GDN head has an S of head_dim x head_dim.
    n_heads: int = 4
    # Per-head width of q, k and v (fla's kernels take up to 256).
    head_dim: int = 64
    # Attention sees this many most recent tokens (itself included).
    window: int = 256
    # Tokens per sleep chunk L: what is consolidated (and evicted) at once.
    chunk: int = 256
    # Offline recurrence passes N per sleep, unless a call says otherwise.
    sleep_passes: int = 4
    # Kernel size of the short causal conv on GDN q/k/v (0 = none); it gives keys local context.
    conv_size: int = 4
    # Hidden width of the SwiGLU MLP (0 = 8/3 * d_model rounded up to a multiple of 64).
    d_ff: int = 0
    # Rotary embedding base of the attention blocks.
    rope_base: float = 10000.0
    # Epsilon of every RMSNorm.
    norm_eps: float = 1e-6
    # Time steps per block of the pure-torch chunked gated delta rule.
    op_chunk_size: int = 64
    # Share the token embedding with the output head (fewer parameters for tiny models).
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        positive = [
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "head_dim",
            "window",
            "chunk",
            "sleep_passes",
            "op_chunk_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"HybridConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < VOCAB_SIZE:
            raise ConfigError(
                f"HybridConfig.vocab_size must be >= {VOCAB_SIZE} (bytes + specials), "
                f"got {self.vocab_size!r}"
            )
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(
                f"HybridConfig.pattern must be a non-empty string, got {self.pattern!r}"
            )
        bad = sorted(set(self.pattern) - set(BLOCK_KINDS))
        if bad:
            raise ConfigError(
                f"HybridConfig.pattern may only use {sorted(BLOCK_KINDS)}, got {self.pattern!r} "
                f"(bad: {bad})"
            )
        if len(self.pattern) > self.n_layers or self.n_layers % len(self.pattern):
            raise ConfigError(
                f"HybridConfig.pattern {self.pattern!r} (length {len(self.pattern)}) must tile "
                f"n_layers={self.n_layers} exactly"
            )
        if self.head_dim > 256:
            raise ConfigError(f"HybridConfig.head_dim must be <= 256, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ConfigError(f"HybridConfig.head_dim must be even (RoPE), got {self.head_dim!r}")
        if not isinstance(self.conv_size, int) or self.conv_size < 0 or self.conv_size == 1:
            raise ConfigError(f"HybridConfig.conv_size must be 0 or >= 2, got {self.conv_size!r}")
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ConfigError(f"HybridConfig.d_ff must be an int >= 0, got {self.d_ff!r}")
        if self.d_ff == 0:
            auto = -(-(8 * self.d_model // 3) // 64) * 64
            object.__setattr__(self, "d_ff", auto)
        for name in ("rope_base", "norm_eps"):  # 10000 and 10000.0 must hash the same
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"HybridConfig.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.rope_base > 0:
            raise ConfigError(f"HybridConfig.rope_base must be > 0, got {self.rope_base!r}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"HybridConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")

    @property
    def layer_kinds(self) -> str:
        """The pattern tiled over all layers, e.g. "GAGA" for 4 layers of "GA"."""
        return self.pattern * (self.n_layers // len(self.pattern))

    @property
    def gdn_layers(self) -> list[int]:
        """Indices of the layers that own fast weights."""
        return [i for i, kind in enumerate(self.layer_kinds) if kind == "G"]

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_kinds) if kind == "A"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"HybridConfig has no field(s) {unknown}")
        return cls(**data)

    def config_hash(self) -> str:
        """Stable 16-hex-digit id of the architecture (sleep_passes excluded: it is a call
        argument, and a state is valid under any N)."""
        fields = self.to_dict()
        fields.pop("sleep_passes")
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
