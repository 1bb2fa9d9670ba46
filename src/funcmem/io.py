"""Files: atomic writes and safetensors directories (single file or sharded with an index).

Safety rules every reader in funcmem follows:

- only safetensors and JSON are read by default; a pickle-based file (``.pt``, ``.pth``, ``.bin``,
  ``.ckpt``, ``.pkl``) is refused with ``PickleRefusedError`` unless the caller passes
  ``allow_pickle=True``, and even then it is read with ``torch.load(weights_only=True)``;
- every file is written atomically (``atomic_write``: a temporary file in the same folder,
  fsync, rename, fsync of the folder), so a reader sees the old file or the new one, never half;
  a directory written as one piece is built in a temporary sibling and renamed (``atomic_directory``);
- safetensors headers record every tensor's byte range, so a truncated file is refused
  (``read_safetensors``), and ``file_sha256`` lets an index record a whole file's checksum.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PICKLE_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.pth", "model.bin")  # looked for in a directory


class PickleRefusedError(ValueError):
    """A pickle-based weights file, refused: unpickling can run arbitrary code."""


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
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(path: str | Path):
    """Build a directory in a temporary sibling and rename it into place when the block ends.

    ``with atomic_directory(dst) as tmp:`` yields the hidden sibling ``.{name}.{pid}.{random}.tmp``
    to write into; ``dst`` appears whole, with every file, or not at all. ``dst`` must not exist or
    be an empty directory (``FileExistsError`` otherwise, before anything is written). An
    exception removes the sibling; a killed process leaves it, and the next build of ``dst``
    removes siblings whose process is gone.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose a new destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)  # POSIX rename: atomic, and it may replace an empty directory
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_siblings(path: Path) -> None:
    """Remove ``atomic_directory`` siblings of ``path`` left by processes that no longer run."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: str | Path, object_pairs_hook=None) -> dict:
    """A JSON file; a missing or damaged one fails with the file's name (``object_pairs_hook``: as ``json.loads``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return json.loads(path.read_text(), object_pairs_hook=object_pairs_hook)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from e


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """A state dict from a safetensors file or, only with ``allow_pickle=True``, a torch pickle.

    Args:
        path: a ``.safetensors`` file, or a pickle-based one (``PICKLE_SUFFIXES``).
        allow_pickle: read a pickle with ``torch.load(weights_only=True)`` (tensors and plain
            containers only). Without it a pickle is refused before a byte of it is unpickled.

    Raises:
        PickleRefusedError: a pickle and ``allow_pickle`` is False.
        ValueError: a damaged file, or a pickle holding anything but tensors (named in the message).
    """
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path)
    if not allow_pickle:
        raise PickleRefusedError(f"refusing to load {path}: {path.suffix} files are pickles, and unpickling can run "
                                 "arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you trust "
                                 "its source (it is then read with torch.load(weights_only=True))")
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        state = torch_load(path)
    except Exception as e:  # pickle.UnpicklingError for a forbidden global, EOFError/RuntimeError when damaged
        raise ValueError(f"cannot load {path} with torch.load(weights_only=True): {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar")


def torch_load(path: str | Path, allow_numpy: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only.

    With ``allow_numpy`` numeric numpy arrays are allowed too (the globals that rebuild an
    ``ndarray``, and the ``numpy.dtypes`` classes except object arrays, which hold pickles).
    """
    import importlib

    extra = []
    if allow_numpy:
        import numpy as np

        for name in NUMPY_GLOBALS:
            module, _, attr = name.rpartition(".")
            try:
                extra.append(getattr(importlib.import_module(module), attr))
            except ImportError:  # numpy < 2 names it numpy.core
                extra.append(getattr(importlib.import_module(module.replace("_core", "core")), attr))
        extra += [getattr(np.dtypes, n) for n in dir(np.dtypes)  # numeric and bool dtypes: no pickled objects
                  if n.endswith("DType") and n not in ("ObjectDType", "VoidDType", "StringDType")]
    with torch.serialization.safe_globals(extra):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file; a damaged one fails with the file's name."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers etc.
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header; a damaged file fails with its name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors file's header, without reading a tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e


def safetensors_dir_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``safetensors_shapes`` over a directory's ``model.safetensors`` or the shards its index names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        if not (path / "model.safetensors").is_file():
            load_safetensors_dir(path)  # raises: no weights, or only a pickle
        return safetensors_shapes(path / "model.safetensors")
    shapes = {}
    for shard in sorted(set(_weight_map(index).values())):
        shapes.update(safetensors_shapes(path / shard))
    return shapes


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's ``weight_map`` (weight name -> shard file), or a ValueError."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    return weight_map


def load_safetensors_dir(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """``model.safetensors``, or every shard named in ``model.safetensors.index.json``.

    A directory with only pickle weights (``PICKLE_WEIGHTS``) is refused unless ``allow_pickle``
    (see ``load_tensors``).
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _weight_map(index)
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(path / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists weights that no shard holds: {missing[:8]}")
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        pickled = [path / name for name in PICKLE_WEIGHTS if (path / name).is_file()]
        if pickled:
            return load_tensors(pickled[0], allow_pickle)
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return read_safetensors(single)
