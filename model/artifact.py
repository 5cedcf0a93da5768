"""The fast-weight artifact: a scope's consolidated S as safetensors plus metadata.

    tensors   {"layers.<i>.S": (H, K, V) float32} for each GDN layer i
    metadata  format, format_version, config_hash, base_model_version, watermark, shapes,
              sha256 (of the tensors' bytes and every other metadata entry)

The sha256 is computed over a canonical encoding (sorted names, dtype, shape, raw bytes,
then the sorted metadata without sha256), so it does not depend on how safetensors lays
out the file, and editing the watermark or swapping a tensor is caught on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from model.config import HybridConfig
from model.exceptions import ArtifactError, StateMismatchError
from model.state import MemoryState

FORMAT = "somna-fast-weights"
FORMAT_VERSION = "1"


def artifact_sha256(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """Canonical content hash of an artifact (the ``sha256`` metadata entry excluded)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = {k: v for k, v in metadata.items() if k != "sha256"}
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def to_artifact(
    state: MemoryState, *, base_model_version: str, watermark: int, config: HybridConfig
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a single-scope state's consolidated fast weights."""
    state.check(config)
    tensors = {name: t.contiguous() for name, t in state.fast_weights().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": config.config_hash(),
        "base_model_version": str(base_model_version),
        "watermark": str(int(watermark)),
        "shapes": json.dumps({n: list(t.shape) for n, t in sorted(tensors.items())}),
    }
    metadata["sha256"] = artifact_sha256(tensors, metadata)
    return tensors, metadata


def save_artifact(
    path: str | Path,
    state: MemoryState,
    *,
    base_model_version: str,
    watermark: int,
    config: HybridConfig,
) -> dict[str, str]:
    """Write the artifact to ``path`` (a .safetensors file); returns its metadata."""
    from safetensors.torch import save_file

    tensors, metadata = to_artifact(
        state, base_model_version=base_model_version, watermark=watermark, config=config
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)  # readers never see a half-written file
    return metadata


def load_artifact(
    path: str | Path, expected_sha256: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and verify an artifact: its own sha256, and ``expected_sha256`` when given."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own types for a corrupt header
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ArtifactError(
            f"{path} is not a {FORMAT} artifact (format={metadata.get('format')!r})"
        )
    actual = artifact_sha256(tensors, metadata)
    if metadata.get("sha256") != actual:
        raise ArtifactError(f"{path}: content sha256 {actual} != recorded {metadata.get('sha256')}")
    if expected_sha256 is not None and expected_sha256 != actual:
        raise ArtifactError(f"{path}: sha256 {actual} != expected {expected_sha256}")
    return tensors, metadata


def state_from_artifact(
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    config: HybridConfig,
    device: torch.device | str | None = None,
) -> MemoryState:
    """A B = 1 MemoryState from a loaded artifact, refusing one made for another config."""
    if metadata.get("config_hash") != config.config_hash():
        raise StateMismatchError(
            f"artifact was made for config {metadata.get('config_hash')}, model has "
            f"{config.config_hash()}"
        )
    return MemoryState.from_fast_weights(
        tensors, config, watermark=int(metadata["watermark"]), device=device
    )
