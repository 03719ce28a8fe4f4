"""The recipe comparison: a validation split carved from training, the selection rule, and the CLI end to end."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import make_split
from spotlib.paper import recipes
from spotlib.paper.datasets import FASHION_MNIST_DIR, build_dataset
from spotlib.paper.recipes import choose_spot, compare_spot_recipes, validation_split
from spotlib.paper.train import build_vit


def test_validation_split_is_disjoint_complete_and_seeded():
    split = make_split(n=50, size=(4, 4))
    split.images[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # an id per image
    fit, val = validation_split(split, 12, seed=3)
    ids = lambda s: set(s.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(val) == 12 and len(fit) == 38
    assert ids(fit).isdisjoint(ids(val)) and ids(fit) | ids(val) == set(range(50))
    assert ids(validation_split(split, 12, seed=3)[1]) == ids(val)
    assert ids(validation_split(split, 12, seed=4)[1]) != ids(val)


def test_choose_spot_keeps_the_grid_then_maximises_sparse_accuracy():
    frame = pd.DataFrame({"recipe": ["(reference)", "a", "b", "c"], "full_grid_drop": [0.0, 0.5, 0.9, 3.0],
                          "sparse_mean": [50.0, 55.0, 54.0, 70.0]})
    assert choose_spot(frame, tolerance=1.0) == "a"  # c is best sparse but drops the grid by 3 points
    assert choose_spot(frame, tolerance=5.0) == "c"
    assert choose_spot(frame, tolerance=0.1) == "a"  # nothing within tolerance: the smallest drop


def test_compare_spot_recipes_reports_the_untuned_reference_first():
    split = make_split(n=40, size=(28, 28), num_classes=10)
    fit, val = validation_split(split, 16)
    torch.manual_seed(0)
    vit = build_vit({**recipes.VIT, "embed_dim": 16, "num_heads": 2, "depth": 1})
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    frame = compare_spot_recipes(vit, fit, val, {"tiny": dict(epochs=1, lr=1e-3, priors=["uniform"])})
    assert list(frame.recipe) == ["(the grid ViT, not fine-tuned)", "tiny"]
    assert frame.full_grid_drop.iloc[0] == 0
    assert frame.full_grid_drop.iloc[1] == pytest.approx(frame.full_grid.iloc[0] - frame.full_grid.iloc[1])
    assert {"uniform 6", "center 25"} <= set(frame.columns)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # fine-tunes a copy


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_recipes_cli_writes_its_record(tmp_path, monkeypatch):
    """Every recipe once, 1 epoch on 64 images: the CLI writes both tables and names its choices."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = build_dataset(tmp_path / "data", "fashion_mnist", train_size=96, test_size=8)
    out = tmp_path / "recipes"
    assert recipes.main(["--data", str(data), "--out", str(out), "--val-size", "32", "--epochs-scale", "0"]) == 0
    grid, spot = pd.read_csv(out / "grid.csv"), pd.read_csv(out / "spot.csv")
    assert list(grid.recipe) == list(recipes.GRID_RECIPES) and grid.full_grid.between(0, 100).all()
    assert list(spot.recipe)[1:] == list(recipes.SPOT_RECIPES)
    record = (out / "recipes.md").read_text()
    assert "32 training images held out; fit on 64" in record
    assert f"Chosen: **{choose_spot(spot)}**" in record
    assert f"Chosen: **{grid.sort_values('full_grid').iloc[-1].recipe}**" in record
