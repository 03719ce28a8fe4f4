"""Small shared helpers: argument checks, one atomic writer, loaders that name the file.

Every output of the library and the pipeline is written through :func:`atomic_path`
(a temporary sibling renamed over the target, so a kill never leaves a half-written
file, and readable by everyone: mode 0644), and every file is read through a loader
that puts the file's path in its error.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import operator
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int (anything ``operator.index`` accepts: int, NumPy or 0-d torch integers),
    checked against ``[minimum, maximum]``; bools and floats are refused with a message naming ``name``."""
    bounds = (f" >= {minimum}" if maximum is None else f" in [{minimum}, {maximum}]") if minimum is not None else (
        f" <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer{bounds}, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer{bounds}, got {type(value).__name__} {value!r}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be an integer{bounds}, got {number}")
    return number


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

    path = _existing(path, hint)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else dict(raw)
    except Exception as err:
        raise _unreadable(path, "safetensors", err) from err


def _unreadable(path: Path, what: str, err: Exception) -> Exception:
    return ValueError(f"cannot read {path} as {what} ({type(err).__name__}: {err}); the file is corrupt, "
                      "truncated or of another kind: delete it and rerun the stage that writes it")


def _existing(path: str | Path, hint: str = "") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}" + (f"; {hint}" if hint else ""))
    return path


def read_json(path: str | Path, hint: str = "") -> Any:
    """JSON from ``path``; errors name the file (and ``hint``: how to make it)."""
    path = _existing(path, hint)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _unreadable(path, "JSON", err) from err


def load_safetensors(path: str | Path, hint: str = "", device: str = "cpu") -> dict:
    """``{name: tensor}`` from a safetensors file; errors name the file."""
    from safetensors.torch import load_file

    path = _existing(path, hint)
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on bad headers
        raise _unreadable(path, "safetensors", err) from err


def torch_load(path: str | Path, hint: str = "", **kwargs) -> Any:
    """``torch.load(path, **kwargs)``; errors (other than refused pickles) name the file."""
    import pickle
    import zipfile

    import torch

    path = _existing(path, hint)
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        # a real torch.save archive refused by weights_only (it pickles other objects): callers explain that;
        # anything else (garbage, a truncated file) is unreadable, whatever torch's message says
        if zipfile.is_zipfile(path) and "weights_only" in str(err):
            raise
        raise _unreadable(path, "a torch checkpoint", err) from err


PROGRESS_ENV = "SPOTLIB_PROGRESS"  # "text": plain-text bars, as pipeline runs set it for logs and stored notebooks


def progress(*args, **kwargs):
    """A tqdm progress bar: widgets in Jupyter, text in a terminal; plain text every 5 s when the
    environment sets ``SPOTLIB_PROGRESS=text`` (papermill runs of the pipeline: the bars then reach
    the terminal through papermill's log and read as text in the executed notebooks)."""
    if os.environ.get(PROGRESS_ENV) == "text":
        import sys

        from tqdm.std import tqdm

        kwargs = {"file": sys.stderr, "mininterval": 5.0, "ascii": True, **kwargs, "leave": True}
        return tqdm(*args, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


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


__all__ = ["atomic_path", "check_choice", "check_int", "config_from_spec", "load_safetensors", "progress", "read_json",
           "read_safetensors_metadata", "save_safetensors", "torch_load", "write_json", "write_text"]


# -- devices, models, timing ------------------------------------------------------------------
def default_device() -> torch.device:
    """``cuda:{LOCAL_RANK}`` when CUDA is available (LOCAL_RANK from torchrun, 0 otherwise), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def mixed_precision(device, amp: bool | None = None):
    """bfloat16 autocast on CUDA (``amp=None``: on iff ``device`` is a CUDA device; True elsewhere uses the
    CPU's bfloat16 autocast, for tests); a no-op context when off."""
    device = torch.device(device or "cpu")
    enabled = device.type == "cuda" if amp is None else amp
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no parameter gradients inside the block; every module's mode and every
    parameter's flag are restored after (the wrapper's own flag need not match its submodules')."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def check_positive(value: float, name: str) -> None:
    """Raise a clear error unless ``value`` is a finite real number > 0 (a step size, a temperature)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def images_per_second(forward: Callable[[], Any], num_images: int, repeats: int = 3) -> float:
    """Throughput of ``forward()`` (a call that processes ``num_images`` images): best of ``repeats``
    timed calls after one warm-up call (CUDA is synchronised when available)."""
    repeats = check_int(repeats, "repeats", 1)  # 0 would report 0 images/s
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    forward()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        forward()
        sync()
        best = min(best, time.perf_counter() - start)
    return num_images / best
