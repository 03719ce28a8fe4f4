"""spotlib.explore: the placement explorer's state (no browser) and its widget's Python side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spotlib.explore.widget as explore_widget
from conftest import make_split, make_vit
from spotlib import sample_positions, spot_on
from spotlib.explore import EXPLORER_PRIORS, Explorer
from spotlib.tokenizer import snap_to_grid
from spotlib.vit import SPoTViT

TINY = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=24, depth=1, num_heads=2)


@pytest.fixture
def explorer():
    split = make_split(n=40, size=(16, 16), num_classes=4, seed=0)
    models = {"A": SPoTViT(make_vit(**TINY, seed=0)), "B": SPoTViT(make_vit(**TINY, seed=1))}
    return Explorer(models, split, prior="isotropic", num_tokens=5, top=3)


def test_state_gives_positions_and_the_models_predictions(explorer):
    assert explorer.positions.shape == (5, 2)
    torch.testing.assert_close(explorer.positions, sample_positions("isotropic", 1, 5, image_size=(16, 16))[0])
    explorer.select(7)
    predicted = explorer.predict()
    assert list(predicted) == ["A", "B"]
    for name, model in explorer.models.items():
        x = explorer.split.normalise(explorer.split.images[7:8])
        probs = model(x, explorer.positions[None]).softmax(-1)[0]
        values, classes = probs.topk(3)
        assert [c for c, _ in predicted[name]] == [explorer.split.classes[int(c)] for c in classes]
        np.testing.assert_allclose([p for _, p in predicted[name]], values.detach().numpy(), rtol=1e-5)


def test_edits_keep_positions_inside_the_image(explorer):
    explorer.add(1.7, -0.4)
    assert explorer.positions[-1].tolist() == [1.0, 0.0] and len(explorer.positions) == 6
    explorer.move(0, -3.0, 0.25)
    assert explorer.positions[0].tolist() == [0.0, 0.25]
    explorer.remove(2)
    assert len(explorer.positions) == 5
    assert ((explorer.positions >= 0) & (explorer.positions <= 1)).all()
    with pytest.raises(ValueError, match="token index"):
        explorer.move(9, 0.5, 0.5)
    explorer.draw(num_tokens=1)
    with pytest.raises(ValueError, match="cannot remove the last token"):
        explorer.remove(0)


def test_prior_and_budget_changes_are_seeded(explorer):
    a = explorer.draw("uniform", 7, seed=3).clone()
    b = explorer.draw("sobol", 4, seed=3).clone()
    again = explorer.draw("uniform", 7, seed=3)
    assert torch.equal(a, again) and a.shape == (7, 2) and b.shape == (4, 2)
    assert torch.equal(a, sample_positions("uniform", 1, 7, seed=3, image_size=(16, 16))[0])
    assert not torch.equal(a, explorer.draw("uniform", 7, seed=4))
    with pytest.raises(ValueError, match="unknown prior 'salient' for the explorer; valid choices: uniform"):
        explorer.draw("salient")
    assert "salient" not in EXPLORER_PRIORS and "center" in EXPLORER_PRIORS


def test_the_oracle_runs_spot_on_from_the_current_positions(explorer):
    explorer.select(3)
    explorer.add(0.3, 0.6)
    result = explorer.oracle("B", steps=5, lr=0.02)
    x = explorer.split.normalise(explorer.split.images[3:4])
    expected = spot_on(explorer.models["B"], x, explorer.split.labels[3:4], explorer.positions[None], steps=5, lr=0.02)
    assert torch.equal(result.trajectory, expected.trajectory) and torch.equal(result.loss, expected.loss)
    explorer.upload(np.zeros((30, 20), np.uint8))
    with pytest.raises(ValueError, match="needs the image's label"):
        explorer.oracle()


def test_upload_resizes_ones_own_image_to_the_models_input(explorer):
    rgb = np.random.default_rng(0).integers(0, 255, (50, 40, 3)).astype(np.uint8)
    explorer.upload(rgb)
    assert explorer.image.shape == (1, 1, 16, 16) and explorer.image.dtype == torch.uint8
    assert explorer.label is None and explorer.index is None
    assert set(explorer.predict()) == {"A", "B"}


def test_image_picker_filters_by_class_and_by_mistakes(explorer):
    split = explorer.split
    assert explorer.indices(label=2) == [i for i in range(len(split)) if split.labels[i] == 2]
    wrong = explorer.indices(misclassified_by="A")
    positions = sample_positions("isotropic", len(split), 5, image_size=(16, 16))
    with torch.no_grad():
        predicted = explorer.models["A"](split.normalise(split.images), positions).argmax(1)
    assert wrong == torch.nonzero(predicted != split.labels).flatten().tolist()


def test_windows_are_what_the_first_model_samples(explorer):
    windows = explorer.windows()
    assert windows.shape == (5, 1, 4, 4)
    explorer.draw("grid", 16)  # the whole grid: the windows are the image's patches
    image = explorer.inputs("A")[0, 0]
    patches = image.unfold(0, 4, 4).unfold(1, 4, 4).reshape(16, 4, 4)
    order = (explorer.positions * 4).floor().long()
    torch.testing.assert_close(explorer.windows()[:, 0], patches[order[:, 0] * 4 + order[:, 1]])


# -- the widget's Python side ---------------------------------------------------------------------
def test_canvas_messages_edit_the_state_and_update_the_prediction(explorer):
    view = explorer.widget(size=160)
    before = view.predictions.value
    view._on_canvas(view.canvas, {"event": "add", "y": 0.1, "x": 1.4}, [])
    assert view.canvas.positions[-1] == [pytest.approx(0.1), 1.0] and len(view.canvas.positions) == 6
    view._on_canvas(view.canvas, {"event": "move", "index": 0, "y": 0.9, "x": 0.9}, [])
    assert view.canvas.positions[0] == [pytest.approx(0.9), pytest.approx(0.9)]
    view._on_canvas(view.canvas, {"event": "remove", "index": 1}, [])
    assert len(view.canvas.positions) == 5 == len(explorer.positions)
    assert all(0 <= v <= 1 for p in view.canvas.positions for v in p)
    assert view.predictions.value != before and "spot-predictions" in view.predictions.value
    assert view.strip.value[:4] == b"\x89PNG"


def test_controls_redraw_seeded_positions_and_snap_shows_grid_cells(explorer):
    view = explorer.widget()
    view.prior.value, view.seed.value = "uniform", 11
    view.budget.value = 9
    assert torch.equal(explorer.positions, sample_positions("uniform", 1, 9, seed=11, image_size=(16, 16))[0])
    view.snap.value = True
    torch.testing.assert_close(torch.tensor(view.canvas.positions), snap_to_grid(explorer.positions, (4, 4)))
    assert "snapped" in view.misalignment.value
    view.class_filter.value = 1
    assert all(explorer.split.labels[i] == 1 for i in view.picker.options)
    assert explorer.label == 1


def test_the_oracle_button_animates_spot_ons_trajectory(explorer, monkeypatch):
    frames = []
    view = explorer.widget()
    monkeypatch.setattr(explore_widget, "sleep_frame", lambda s: frames.append(list(view.canvas.positions)))
    view.steps.value, view.lr.value = 4, 0.02
    start = explorer.positions.clone()
    x = explorer.inputs("A")
    expected = spot_on(explorer.models["A"], x, torch.tensor([explorer.label]), start[None], steps=4, lr=0.02)
    result = view.animate_oracle()
    assert torch.equal(result.trajectory, expected.trajectory)
    assert len(frames) == 5 and frames[0] == start.tolist()
    torch.testing.assert_close(explorer.positions, expected.positions[0])
    assert "loss per step" in view.oracle_log.value
