"""Small shared helpers of the core: argument checks, reading JSON, progress bars, devices, freezing a
model, mixed precision and a throughput timer. (Writing files is the paper layer's: :mod:`spotlib.paper.io`.)
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import operator
import os
import time
from pathlib import Path
from typing import Any, Callable

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


def unreadable_error(path: Path, what: str, err: Exception) -> Exception:
    return ValueError(f"cannot read {path} as {what} ({type(err).__name__}: {err}); the file is corrupt, "
                      "truncated or of another kind: delete it and rerun the stage that writes it")


def existing_file(path: str | Path, hint: str = "") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}" + (f"; {hint}" if hint else ""))
    return path


def read_json(path: str | Path, hint: str = "") -> Any:
    """JSON from ``path``; errors name the file (and ``hint``: how to make it)."""
    path = existing_file(path, hint)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise unreadable_error(path, "JSON", err) from err


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
