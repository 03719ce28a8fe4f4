"""A built dataset in memory: :class:`Split` (uint8 images, labels, normalisation).

A dataset on disk (written by :func:`spotlib.paper.datasets.build_dataset`) is a
Hugging Face ``DatasetDict`` with ``train`` and ``test`` splits and two columns:
``image``, uint8 (C, H, W), and ``label``; the training images' per-channel
mean/std and the class names sit beside it in ``stats.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .utils import check_int, read_json

BUILD_HINT = "build it with the data stage: dvc repro data (python -m spotlib.paper.pipeline data)"


def image_label_arrays(ds, names=("image", "label")) -> dict[str, np.ndarray]:
    """Rows of a ``datasets.Dataset`` as numpy arrays: uint8 images, int64 labels (one batched read each)."""
    dtypes = {"image": np.uint8, "label": np.int64}
    return {n: ds.with_format("numpy", columns=[n], dtype=dtypes[n])[:][n] for n in names}


# -- using -------------------------------------------------------------------
@dataclass
class Split:
    """One split in memory: uint8 images (n, C, H, W), labels (n,), normalisation stats.

    ``batches`` yields model-ready float tensors, normalised with ``mean``/``std``
    (the training split's statistics when loaded; a pretrained backbone's own
    via :meth:`with_stats` or :func:`for_model`), in dataset order. Images
    stay uint8 until they reach the device: on CUDA they are copied from
    pinned memory without blocking and normalised there.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, C, H, W) -> normalised float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def with_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> "Split":
        """The same images normalised with another per-channel mean/std (e.g. a pretrained backbone's)."""
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values (one per channel), got {len(mean)} and {len(std)}")
        return Split(self.images, self.labels, tuple(mean), tuple(std), self.classes)

    def subset(self, indices) -> "Split":
        indices = torch.as_tensor(indices)
        return Split(self.images[indices], self.labels[indices], self.mean, self.std, self.classes)

    def head(self, n: int | None) -> "Split":
        """The first n images: all if n is None or n >= len(self); n must be an int >= 0 (0 gives an
        empty split, which evaluation then refuses by name). A negative n is refused, not taken as
        Python's "all but the last |n|"."""
        if n is None:
            return self
        n = check_int(n, "n", 0)
        return self if n >= len(self) else self.subset(torch.arange(n))

    def batches(self, batch_size: int, device=None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (slice into the split, normalised images, labels) in order; ``batch_size`` an int >= 1."""
        batch_size = check_int(batch_size, "batch_size", 1)
        device = torch.device(device or "cpu")
        pin = device.type == "cuda"
        for start in range(0, len(self), batch_size):
            sl = slice(start, min(start + batch_size, len(self)))
            images, labels = self.images[sl], self.labels[sl]
            if pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield sl, self.normalise(images.to(device, non_blocking=pin)), labels.to(device, non_blocking=pin)


def for_model(split: Split, model) -> Split:
    """``split`` normalised as ``model`` expects: its ``input_stats`` (mean, std) if it has them
    (pretrained backbones, set by :func:`spotlib.paper.backbones.load_backbones`), else unchanged."""
    stats = getattr(model, "input_stats", None)
    return split if stats is None else split.with_stats(*stats)


def load_split(data_dir: str | Path, split: str) -> Split:
    """Load one split of a dataset written by :func:`build_dataset` into memory.

    Raises FileNotFoundError (no dataset, or a piece of it missing) or ValueError (a corrupt
    ``stats.json`` or Arrow file), naming the folder and how to rebuild it.
    """
    import datasets

    data_dir = Path(data_dir)
    if not (data_dir / "stats.json").exists():
        raise FileNotFoundError(f"no dataset at {data_dir}; build it first: `dvc repro data` for the workspace's "
                                f"results/data, or `python -m spotlib.paper.pipeline data --profile <profile> "
                                f"--out-root <root>` for <root>/results/data (opening a stage notebook does it)")

    def unreadable(err: Exception) -> Exception:
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
        return kind(f"cannot read the dataset in {data_dir} ({type(err).__name__}: {err}); it is incomplete or "
                    f"corrupt: delete it and {BUILD_HINT}")

    try:
        ds_dict = datasets.load_from_disk(str(data_dir))
    except Exception as err:  # datasets raises JSON, Arrow and file errors that do not name the folder
        raise unreadable(err) from err
    if split not in ds_dict:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(ds_dict)}")
    stats = read_json(data_dir / "stats.json", BUILD_HINT)
    missing = {"mean", "std", "classes"} - set(stats if isinstance(stats, dict) else ())
    if missing:
        raise ValueError(f"{data_dir / 'stats.json'} lacks {sorted(missing)}; delete the dataset and {BUILD_HINT}")
    try:
        columns = image_label_arrays(ds_dict[split])
    except Exception as err:  # a truncated Arrow file may only fail when read
        raise unreadable(err) from err
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(columns["image"], dtype=np.uint8)),
        labels=torch.from_numpy(np.asarray(columns["label"], dtype=np.int64)),
        mean=tuple(stats["mean"]),
        std=tuple(stats["std"]),
        classes=tuple(stats["classes"]),
    )
