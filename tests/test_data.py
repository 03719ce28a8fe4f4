"""spotlib.data and spotlib.paper.datasets: IDX reading, dataset building, splits."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from spotlib.data import Split, load_split
from spotlib.paper import datasets as data_module
from spotlib.paper.datasets import FASHION_MNIST_DIR, SOURCES, DataSourceError, build_dataset, read_idx

HAS_FASHION_MNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


def write_idx(path, array: np.ndarray, compress: bool):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


# -- IDX -----------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 6), (2, 3, 300)])
def test_read_idx_round_trip(tmp_path, compress, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, array, compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 4) + b"\x00" * 16)  # float32 IDX
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(png)


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_read_idx_on_fashion_mnist_labels():
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,)
    assert set(np.unique(labels)) == set(range(10))
    assert (np.bincount(labels) == 1000).all()


# -- ImageFolder ------------------------------------------------------------------------
CLASS_VALUES = {"bright": 230, "dark": 20}  # imagefolder labels sort alphabetically: bright=0, dark=1


@pytest.fixture
def image_folder(tmp_path):
    """root/{train,val}/{bright,dark}/*.png, RGB, odd sizes, with a class-dependent brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    counts = {"train": 3, "val": 2}
    for split, n in counts.items():
        for cls, value in CLASS_VALUES.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = 14 + i, 20 + 2 * i
                pixels = np.clip(value + rng.integers(-15, 16, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of these tests inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.parametrize("channels", [1, 3])
def test_build_imagefolder_and_load_split(tmp_path, image_folder, hf_cache, channels):
    import datasets

    out = build_dataset(tmp_path / "built", "imagefolder", path=str(image_folder), image_size=8, channels=channels)
    assert out == tmp_path / "built" and out.is_dir()
    assert not (tmp_path / "built.tmp").exists()

    ds = datasets.load_from_disk(str(out))
    assert isinstance(ds, datasets.DatasetDict)
    assert set(ds) == {"train", "test"}  # val is renamed to test
    assert ds["train"].features["label"].names == ["bright", "dark"]
    image_feature = ds["train"].features["image"]
    assert isinstance(image_feature, datasets.Array3D)
    assert image_feature.dtype == "uint8" and tuple(image_feature.shape) == (channels, 8, 8)
    raw = ds["train"].with_format("numpy", columns=["image"], dtype=np.uint8)[:]["image"]
    assert raw.shape == (6, channels, 8, 8)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["bright", "dark"]
    assert stats["sizes"] == {"train": 6, "test": 4}
    assert stats["image_shape"] == [channels, 8, 8]
    assert len(stats["mean"]) == len(stats["std"]) == channels

    for split_name, n in (("train", 6), ("test", 4)):
        split = load_split(out, split_name)
        assert isinstance(split, Split)
        assert split.images.shape == (n, channels, 8, 8)
        assert 0 <= int(split.images.min()) and int(split.images.max()) <= 255
        assert split.labels.dtype == torch.int64 and len(split) == n
        assert split.classes == ("bright", "dark") and split.channels == channels and split.image_size == (8, 8)
        # labels follow the folders: bright images have label 0, dark ones label 1
        brightness = split.images.float().mean(dim=(1, 2, 3))
        assert torch.equal(split.labels, (brightness < 128).long())
        assert (split.labels == 0).sum() == n // 2

    train = load_split(out, "train")
    pixels = train.images.float() / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    np.testing.assert_allclose(stats["std"], pixels.std(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert train.mean == tuple(stats["mean"]) and train.std == tuple(stats["std"])
    normalised = torch.cat([b for _, b, _ in train.batches(4)])
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-4, rtol=0)


def test_load_split_keeps_uint8_images(tmp_path, image_folder, hf_cache):
    """Split holds uint8 images (its docstring; 8x less memory than int64 for a 60k-image split)."""
    out = build_dataset(tmp_path / "built", "imagefolder", path=str(image_folder), image_size=8)
    split = load_split(out, "train")
    assert split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64


def test_build_subsets_are_seeded(tmp_path, image_folder, hf_cache):
    a = build_dataset(tmp_path / "a", "imagefolder", path=str(image_folder), image_size=8, train_size=4, test_size=2)
    b = build_dataset(tmp_path / "b", "imagefolder", path=str(image_folder), image_size=8, train_size=4, test_size=2)
    sa, sb = load_split(a, "train"), load_split(b, "train")
    assert len(sa) == 4 and len(load_split(a, "test")) == 2
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)


def test_imagefolder_order_is_random_and_per_class_subsets_exact(tmp_path, image_folder, hf_cache):
    """Folders list images class by class; the built split is a seeded random order (so a stage's first n
    images are a random sample), every image keeps its label, and train_per_class keeps exactly n per class."""
    out = build_dataset(tmp_path / "all", "imagefolder", path=str(image_folder), image_size=8, seed=3)
    train = load_split(out, "train")
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1] and train.labels.tolist() != sorted(train.labels.tolist())
    bright = train.images.float().mean((1, 2, 3)) > 128
    assert torch.equal(bright, train.labels == 0)  # images moved with their labels
    few = load_split(build_dataset(tmp_path / "few", "imagefolder", path=str(image_folder), image_size=8,
                                   train_per_class=2, test_size=3), "train")
    assert few.labels.bincount().tolist() == [2, 2]


def test_parallel_decoding_gives_the_same_dataset(tmp_path, image_folder, hf_cache):
    one = build_dataset(tmp_path / "one", "imagefolder", path=str(image_folder), image_size=8, workers=1)
    two = build_dataset(tmp_path / "two", "imagefolder", path=str(image_folder), image_size=8, workers=2)
    for split in ("train", "test"):
        a, b = load_split(one, split), load_split(two, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_rebuild_replaces_the_old_dataset(tmp_path, image_folder, hf_cache):
    out = tmp_path / "built"
    build_dataset(out, "imagefolder", path=str(image_folder), image_size=8, train_size=2)
    build_dataset(out, "imagefolder", path=str(image_folder), image_size=8)
    assert len(load_split(out, "train")) == 6


def test_unknown_source_lists_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source 'mnist'; valid choices: fashion_mnist, imagefolder, hub"):
        build_dataset(tmp_path / "x", "mnist")
    assert SOURCES == ("fashion_mnist", "imagefolder", "hub")


def test_imagefolder_needs_a_directory(tmp_path):
    with pytest.raises(DataSourceError, match="existing directory"):
        build_dataset(tmp_path / "x", "imagefolder", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="hub_id"):
        build_dataset(tmp_path / "x", "hub")


def test_load_split_errors(tmp_path, image_folder, hf_cache):
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        load_split(tmp_path / "nothing", "train")
    out = build_dataset(tmp_path / "built", "imagefolder", path=str(image_folder), image_size=8)
    with pytest.raises(ValueError, match=r"unknown split 'validation'; valid choices: train, test"):
        load_split(out, "validation")


# -- Split -----------------------------------------------------------------------------
def test_split_helpers(split_factory):
    split = split_factory(n=10, channels=3, size=(6, 5), num_classes=2, seed=0)
    assert split.image_size == (6, 5) and split.channels == 3 and len(split) == 10
    head = split.head(4)
    assert len(head) == 4 and torch.equal(head.images, split.images[:4])
    assert split.head(None) is split and split.head(100) is split
    sub = split.subset([3, 1])
    assert torch.equal(sub.labels, split.labels[[3, 1]])
    got = list(split.batches(4))
    assert [sl for sl, _, _ in got] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    images = torch.cat([im for _, im, _ in got])
    expected = (split.images.float() / 255 - 0.4) / 0.3
    torch.testing.assert_close(images, expected)
    assert torch.equal(torch.cat([lb for _, _, lb in got]), split.labels)


# -- Fashion-MNIST (offline Debian package) --------------------------------------------------
@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_build_fashion_mnist_subset(tmp_path, hf_cache):
    out = build_dataset(tmp_path / "fmnist", "fashion_mnist", train_size=64, test_size=32)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == list(data_module.FASHION_MNIST_CLASSES)
    assert stats["sizes"] == {"train": 64, "test": 32}
    assert stats["image_shape"] == [1, 28, 28]
    train = load_split(out, "train")
    assert train.images.shape == (64, 1, 28, 28)
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) <= 9
    # the subset is a seeded random draw of the real images: the first image of the test
    # split is one of the 10,000 IDX test images
    idx = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    test = load_split(out, "test")
    first = test.images[0, 0].numpy()
    assert any(np.array_equal(first, im) for im in idx)


def test_evaluation_split_prefers_validation_over_an_unlabelled_test_split():
    """Hub ImageNet has train, validation and an unlabelled test split: the labelled validation split is used,
    and the test split's images are never decoded."""
    import datasets
    from PIL import Image

    from spotlib.paper.datasets import _image_dataset_arrays

    def split(value: int, label: int, n: int = 2) -> datasets.Dataset:
        images = [Image.new("RGB", (10, 12), (value,) * 3) for _ in range(n)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        return datasets.Dataset.from_dict({"image": images, "label": [label] * n}, features=features)

    ds = datasets.DatasetDict({"train": split(10, 0), "validation": split(200, 1), "test": split(99, 0, n=3)})
    arrays, names = _image_dataset_arrays(ds, 8, None, 3, lambda name, labels, shuffle: None)
    assert names == ["a", "b"] and set(arrays) == {"train", "test"}
    images, labels = arrays["test"]
    assert labels.tolist() == [1, 1] and (images == 200).all()
