"""Datasets as Hugging Face ``datasets`` on disk, and batches for the models.

A built dataset is a ``DatasetDict`` with ``train`` and ``test`` splits and two
columns: ``image``, uint8 (C, H, W), and ``label`` (``ClassLabel``). The
per-channel mean/std of the training images are stored beside it in
``stats.json`` and used to normalise model inputs.

Sources (``build_dataset(source=...)``):

* ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (IDX files,
  offline), else the Hugging Face hub (``zalando-datasets/fashion_mnist``).
* ``imagefolder``: a local ``split/class/image`` tree (``path``).
* ``hub``: a hub dataset id (``hub_id``) with an image and a label column.

Nothing is read or downloaded at import time.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import image_label_arrays
from ..utils import check_int
from .io import atomic_path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SOURCES = ("fashion_mnist", "imagefolder", "hub")
CHANNELS = (1, 3)


class DataSourceError(RuntimeError):
    """No source could provide the requested data."""


# -- reading sources ---------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_arrays(root: Path = FASHION_MNIST_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (n, 1, 28, 28) uint8, labels (n,))} from the Debian package or the hub."""
    files = {s: (root / f"{p}-images-idx3-ubyte.gz", root / f"{p}-labels-idx1-ubyte.gz") for s, p in
             (("train", "train"), ("test", "t10k"))}
    if all(f.exists() for pair in files.values() for f in pair):
        return {s: (read_idx(i)[:, None], read_idx(l).astype(np.int64)) for s, (i, l) in files.items()}
    try:
        import datasets

        hub = datasets.load_dataset(FASHION_MNIST_HUB)
    except Exception as err:  # offline, hub down, no such id...
        raise DataSourceError(
            f"Fashion-MNIST not found in {root} and the hub ({FASHION_MNIST_HUB}) failed: {err}.\n"
            "Install it offline with: sudo apt-get install -y dataset-fashion-mnist"
        ) from err
    return {
        s: (np.stack([np.asarray(im, dtype=np.uint8) for im in hub[s]["image"]])[:, None], np.asarray(hub[s]["label"]))
        for s in ("train", "test")
    }


def _load_pil(image, image_size: int, resize: int | None, channels: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bicubic), centre-crop ``image_size``; uint8 (C, H, W)."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    resize = resize or image_size
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    array = np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _subset_indices(labels: np.ndarray, size: int | None, per_class: int | None,
                    rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of a seeded random subset: ``per_class`` images of each class and/or ``size``
    images in all (None: no limit); None when everything is kept."""
    keep = np.arange(len(labels))
    if per_class is not None:
        order = rng.permutation(len(labels))
        taken = np.zeros(int(labels.max()) + 1 if len(labels) else 0, dtype=np.int64)
        chosen = []
        for i in order:  # the first per_class of each class in a random order
            if taken[labels[i]] < per_class:
                taken[labels[i]] += 1
                chosen.append(i)
        keep = np.sort(np.asarray(chosen, dtype=np.int64))
    if size is not None and size < len(keep):
        keep = np.sort(keep[rng.permutation(len(keep))[:size]])
    return None if len(keep) == len(labels) else keep


def _image_dataset_arrays(ds_dict, image_size: int, resize: int | None, channels: int, subsets: Callable,
                          workers: int = 1, image_column="image", label_column="label",
                          ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Decode and crop the train split and the evaluation split (``validation``, else ``val``, else ``test``:
    a hub dataset's ``test`` split may be unlabelled when a validation split exists), only the rows
    ``subsets`` selects, in ``workers`` processes. Returns ({"train"|"test": (images, labels)}, class names)."""
    import datasets

    names = ds_dict[next(iter(ds_dict))].features[label_column].names
    evaluation = next((s for s in ("validation", "val", "test") if s in ds_dict), None)
    out = {}
    for split, target in (("train", "train"), (evaluation, "test")):
        if split not in ds_dict:
            continue
        ds = ds_dict[split]
        labels = np.asarray(ds[label_column], dtype=np.int64)  # reads the label column only, no image decoding
        keep = subsets(split, labels, shuffle=True)
        if keep is not None:
            ds, labels = ds.select(keep), labels[keep]
        probe = _load_pil(ds[0][image_column], image_size, resize, channels)
        features = datasets.Features({"image": datasets.Array3D(shape=probe.shape, dtype="uint8")})
        decoded = ds.map(
            lambda batch: {"image": [_load_pil(im, image_size, resize, channels) for im in batch[image_column]]},
            batched=True, batch_size=64, num_proc=workers if workers > 1 else None, features=features,
            remove_columns=ds.column_names, desc=f"decode {split}")
        out[target] = (image_label_arrays(decoded, ("image",))["image"], labels)
    return out, names


# -- building ----------------------------------------------------------------
def build_dataset(
    out_dir: str | Path,
    source: str = "fashion_mnist",
    *,
    path: str | None = None,
    hub_id: str | None = None,
    image_size: int = 28,
    resize: int | None = None,
    channels: int = 1,
    train_size: int | None = None,
    test_size: int | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Materialise a dataset once as a ``datasets.DatasetDict`` on disk (atomic).

    Args:
        out_dir: where the DatasetDict and ``stats.json`` are written.
        source: one of ``SOURCES``.
        path: ImageFolder root with ``train/`` and a ``val/`` or ``test/`` split (``imagefolder``).
        hub_id: hub dataset id (``hub``).
        image_size, resize, channels: preprocessing of ``imagefolder``/``hub`` images (ints: image_size >= 1,
            resize None or >= image_size, channels 1 or 3); Fashion-MNIST is 28 x 28 grey, so it needs
            image_size 28, channels 1 and no resize.
        train_size, test_size: optional seeded random subsets (None = all, else an int >= 1). ``imagefolder``
            and ``hub`` splits are stored in a seeded random order (their sources list images class by class), so
            the first n images of a split, which the stages' ``test_size``/``bank_size`` take, are a
            random sample; Fashion-MNIST keeps its own (already mixed) order.
        train_per_class: keep this many random training images per class, an int >= 1 (e.g. a kNN bank drawn
            from ImageNet's training split); combined with ``train_size``, the per-class draw comes first.
        seed: int >= 0.
        workers: processes decoding images (``imagefolder``/``hub``), an int >= 1; only the kept rows are decoded.

    Every argument is checked before anything is read: a bad size used to write a dataset that
    failed only when loaded.
    """
    import datasets

    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid choices: {', '.join(SOURCES)}")
    image_size = check_int(image_size, "image_size", 1)
    if resize is not None:
        resize = check_int(resize, "resize", image_size)  # smaller would pad the centre crop with black
    channels = check_int(channels, "channels")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if source == "fashion_mnist" and (image_size, channels, resize) != (28, 1, None):
        raise ValueError("the fashion_mnist source is 28 x 28 grey and is not resized: it needs image_size=28, "
                         f"channels=1, resize=None, got image_size={image_size}, channels={channels}, resize={resize}")
    # 0 would write an empty split that fails only when loaded; negative sizes are meaningless
    train_size = None if train_size is None else check_int(train_size, "train_size", 1)
    test_size = None if test_size is None else check_int(test_size, "test_size", 1)
    train_per_class = None if train_per_class is None else check_int(train_per_class, "train_per_class", 1)
    seed = check_int(seed, "seed", 0)
    workers = check_int(workers, "workers", 1)
    rng = np.random.default_rng(seed)
    limits = {"train": (train_size, train_per_class), "test": (test_size, None)}

    def subsets(split: str, labels: np.ndarray, shuffle: bool = False) -> np.ndarray | None:
        split = "test" if split in ("val", "validation") else split
        keep = _subset_indices(labels, *limits[split], rng)
        if shuffle:  # folders list images class by class: store a random order, so any first n are a random sample
            keep = rng.permutation(np.arange(len(labels)) if keep is None else keep)
        return keep

    if source == "fashion_mnist":
        arrays, names = _fashion_mnist_arrays(), list(FASHION_MNIST_CLASSES)
        for split, (images, labels) in arrays.items():
            keep = subsets(split, labels)
            arrays[split] = (images, labels) if keep is None else (images[keep], labels[keep])
    else:
        if source == "imagefolder":
            if not path or not Path(path).is_dir():
                raise DataSourceError(f"imagefolder source needs an existing directory in 'path', got {path!r}")
            raw = datasets.load_dataset("imagefolder", data_dir=path)
        else:
            if not hub_id:
                raise ValueError("hub source needs 'hub_id' (e.g. 'zalando-datasets/fashion_mnist')")
            try:
                raw = datasets.load_dataset(hub_id)
            except Exception as err:
                raise DataSourceError(f"could not load {hub_id!r} from the hub: {err}") from err
        arrays, names = _image_dataset_arrays(raw, image_size, resize, channels, subsets, workers)
    arrays = {("test" if s in ("val", "validation") else s): v for s, v in arrays.items()}
    missing = {"train", "test"} - set(arrays)
    if missing:
        raise DataSourceError(f"the source has splits {sorted(arrays)}; missing {sorted(missing)}")

    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[split]
        features = datasets.Features({
            "image": datasets.Array3D(shape=images.shape[1:], dtype="uint8"),
            "label": datasets.ClassLabel(names=names),
        })
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    train = arrays_to_float(splits["train"])
    stats = {
        "mean": train.mean(dim=(0, 2, 3)).tolist(),
        "std": train.std(dim=(0, 2, 3)).tolist(),
        "classes": names,
        "sizes": {s: len(d) for s, d in splits.items()},
        "image_shape": list(arrays["train"][0].shape[1:]),
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return out_dir


def arrays_to_float(ds) -> torch.Tensor:
    return torch.as_tensor(image_label_arrays(ds)["image"], dtype=torch.float32) / 255


