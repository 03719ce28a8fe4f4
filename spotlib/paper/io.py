"""Files the pipeline writes and reads: one atomic writer, deterministic safetensors, loaders that name the file.

Every output is written through :func:`atomic_path` (a temporary sibling renamed over
the target, so a kill never leaves a half-written file, and readable by everyone:
mode 0644); every file is read through a loader whose error names the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..utils import existing_file, unreadable_error



def check_choice(value: Any, name: str, choices) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")
    return value


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path`` (a file: mode
    0644; a directory: the old one removed first), on error it is removed. The one writer of every output.

    >>> with atomic_path("out.json") as tmp:
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, keys in insertion order, atomically (same object -> same bytes)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


METADATA_KEY = "spotlib"


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Save ``{name: tensor}`` as safetensors atomically, as contiguous CPU copies.

    The same tensors and metadata always give the same bytes: safetensors writes a
    metadata mapping of several keys in a random order, so ``metadata`` is stored as
    one JSON string (sorted keys) under the key ``"spotlib"``; read it back with
    :func:`read_safetensors_metadata`.
    """
    from safetensors.torch import save_file

    tensors = {k: tensors[k].detach().contiguous().cpu() for k in sorted(tensors)}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_safetensors_metadata(path: str | Path, hint: str = "") -> dict[str, Any]:
    """The metadata :func:`save_safetensors` stored (or a plain safetensors header's metadata); errors name the file."""
    from safetensors import safe_open

    path = existing_file(path, hint)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else dict(raw)
    except Exception as err:
        raise unreadable_error(path, "safetensors", err) from err


def load_safetensors(path: str | Path, hint: str = "", device: str = "cpu") -> dict:
    """``{name: tensor}`` from a safetensors file; errors name the file."""
    from safetensors.torch import load_file

    path = existing_file(path, hint)
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on bad headers
        raise unreadable_error(path, "safetensors", err) from err


def torch_load(path: str | Path, hint: str = "", **kwargs) -> Any:
    """``torch.load(path, **kwargs)``; errors (other than refused pickles) name the file."""
    import pickle
    import zipfile

    import torch

    path = existing_file(path, hint)
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        # a real torch.save archive refused by weights_only (it pickles other objects): callers explain that;
        # anything else (garbage, a truncated file) is unreadable, whatever torch's message says
        if zipfile.is_zipfile(path) and "weights_only" in str(err):
            raise
        raise unreadable_error(path, "a torch checkpoint", err) from err


def config_from_spec(cls, spec, what: str, **fixed):
    """``cls(**fixed, **spec)`` for a dataclass ``cls``; unknown keys are an error listing the valid fields."""
    import dataclasses

    if not isinstance(spec, dict):
        raise TypeError(f"{what} must be a mapping of {cls.__name__} fields, got {type(spec).__name__} {spec!r}")
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    unknown = [k for k in spec if k not in fields]
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    return cls(**fixed, **spec)
