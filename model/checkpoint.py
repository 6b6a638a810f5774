"""Weights on disk: safetensors with the resolved config as metadata, so a file rebuilds its own model.

Writing is always safetensors. Reading also accepts .pt/.pth state dicts (e.g. pretrained CLIP weights),
through `torch.load(weights_only=True)` only: a pickle that would run code is refused, never executed.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import fsspec

import torch
from safetensors.torch import load_file, safe_open, save_file

CONFIG_KEY = "config"  # metadata key under which save_weights stores the resolved config (JSON)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint holds more than tensors (code, arbitrary objects) and was not loaded."""


def _state_dict(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module) \
        else dict(module_or_state_dict)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict entries are not tensors: {bad[:5]}")
    # safetensors refuses shared and non-contiguous storage; a plain contiguous copy of each is exact.
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_weights(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors. `metadata` values that are not strings are stored as JSON, so pass the
    resolved config as `{"config": cfg.model_dump()}` (or a JSON string). Writes atomically (temp file +
    rename) so a crash never leaves a half-written checkpoint under the final name."""
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"save_weights writes safetensors: use a .safetensors path, not {path.name!r}")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_state_dict(module_or_state_dict), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _decode_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """Metadata values back to Python: JSON where they parse (so a config saved as a dict or as a JSON
    string both come back as a dict), the raw string otherwise."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load, the pickle holds objects other than tensors (it could run code); "
            "convert it to safetensors from a trusted environment") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # Training checkpoints (open_clip, Lightning) wrap the weights; keep any config beside them.
        meta = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, torch.Tensor)}
        obj = obj["state_dict"]
    else:
        meta = {}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return dict(obj), meta


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, metadata) on CPU from .safetensors, or from a .pt/.pth/.bin/.ckpt state dict
    through torch.load(weights_only=True). Metadata values written by `save_weights` come back as Python
    objects (the config as a dict). Raises FileNotFoundError naming the path when it is absent.
    `path` may be a URL (s3://, gs://, file://: anything fsspec opens): it is read from a temporary copy."""
    if is_url(path):
        with fetched(path) as local:
            return load_weights(local)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return load_file(str(path), device="cpu"), read_metadata(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise ValueError(f"{path}: unknown weights format; expected one of "
                     f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a safetensors file without loading its tensors (only the header is read)."""
    if is_url(path):
        with fetched(path) as local:
            return read_metadata(local)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return load_weights(path)[1]
    with safe_open(str(path), framework="pt") as f:
        return _decode_metadata(f.metadata())


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def fetched(url: str | os.PathLike) -> Iterator[Path]:
    """A temporary local copy of the file at `url` (any fsspec URL), removed afterwards."""
    url = os.fspath(url)
    fs, remote = fsspec.core.url_to_fs(url)
    if not fs.isfile(remote):
        raise FileNotFoundError(f"weights file not found: {url}")
    with tempfile.TemporaryDirectory(prefix="mav-weights-") as tmp:
        local = Path(tmp) / PurePosixPath(remote).name
        fs.get_file(remote, str(local))
        yield local


def load_config(path: str | os.PathLike) -> Any:
    """The resolved config stored with `save_weights(..., metadata={"config": ...})`, or None."""
    return read_metadata(path).get(CONFIG_KEY)
