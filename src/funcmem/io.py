"""Files: atomic writes and safetensors directories (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor


def config_from_dict(cls, d: dict):
    """Build a config dataclass from a dict; unknown fields are an error naming them and the known ones."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file; a damaged one fails with the file's name."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers etc.
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e


def load_safetensors_dir(path: str | Path) -> dict[str, Tensor]:
    """``model.safetensors``, or every shard named in ``model.safetensors.index.json``."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(path / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists weights that no shard holds: {missing[:8]}")
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return read_safetensors(single)
