"""spotlib.paper.train: grid / SPoT training, checkpoints, resume."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import spotlib.paper.train as train_module
from spotlib.paper.train import MODES, TrainConfig, build_vit, train
from spotlib.paper.io import load_safetensors

SPEC = dict(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


def fresh_model(seed=0) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit(SPEC)


def config(mode="grid", **kw) -> TrainConfig:
    return TrainConfig(mode=mode, epochs=2, batch_size=8, lr=1e-2, seed=0, **kw)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Killed(Exception):
    """Stands in for the process being killed."""


def kill_at_state(monkeypatch, *, epoch: int, before: bool = False):
    """Make the run die when ``state.pt`` of ``epoch`` (0-based) is saved: just after the
    write (a kill at the end of that epoch) or, with ``before``, just before it (a kill between
    the weights file and the state file of that epoch)."""
    real = train_module.save_state

    def save(obj, path):
        target = Path(path).name == "state.pt" and obj["epoch"] == epoch
        if target and before:
            raise Killed(f"killed before writing state.pt of epoch {epoch}")
        real(obj, path)
        if target:
            raise Killed(f"killed after writing state.pt of epoch {epoch}")

    monkeypatch.setattr(train_module, "save_state", save)


# -- a plain run ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_train_writes_checkpoints_and_logs(tmp_path, tiny_split, mode):
    model = fresh_model()
    init = weights(model)
    cfg = config(mode, min_tokens=1, max_tokens=4)
    log = train(model, tiny_split, cfg, tmp_path)
    for name in ("model.safetensors", "state.pt", "log.csv", "log.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.tmp"))
    # the model was trained in place and is left in eval mode
    assert not model.training
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items())
    # the safetensors file holds the final weights
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert_bitwise_equal(saved, weights(model))
    assert_bitwise_equal(load_safetensors(tmp_path / "model.safetensors"), weights(model))
    # the logs
    assert isinstance(log, pd.DataFrame)
    assert list(log.epoch) == [1, 2]
    assert {"epoch", "loss", "acc", "lr", "seconds", "images_per_s"} <= set(log.columns)
    assert log.acc.between(0, 100).all() and (log.loss > 0).all()
    csv = pd.read_csv(tmp_path / "log.csv")
    assert list(csv.epoch) == [1, 2]
    assert csv.loss.tolist() == pytest.approx(log.loss.tolist())
    assert [row["epoch"] for row in json.loads((tmp_path / "log.json").read_text())] == [1, 2]
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["epoch"] == 1 and state["config"] == asdict(cfg)


def test_training_learns_the_toy_task(tmp_path, split_factory):
    data = split_factory(n=64, seed=3)
    model = fresh_model()
    log = train(model, data, TrainConfig(epochs=4, batch_size=16, lr=1e-2, weight_decay=0.0), tmp_path)
    assert log.loss.iloc[-1] < log.loss.iloc[0]
    with torch.no_grad():
        acc = (model(data.normalise(data.images)).argmax(1) == data.labels).float().mean().item()
    assert acc >= 0.9


# -- reproducibility and resume -----------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_weights(tmp_path, tiny_split, mode):
    a, b, c = fresh_model(), fresh_model(), fresh_model()
    train(a, tiny_split, config(mode), tmp_path / "a")
    train(b, tiny_split, config(mode), tmp_path / "b")
    assert_bitwise_equal(weights(a), weights(b))
    cfg = config(mode)
    cfg.seed = 1
    train(c, tiny_split, cfg, tmp_path / "c")
    assert any(not torch.equal(v, weights(c)[k]) for k, v in weights(a).items())


@pytest.mark.parametrize("mode", MODES)
def test_resume_after_a_kill_matches_uninterrupted_run(tmp_path, tiny_split, monkeypatch, mode):
    reference = fresh_model()
    ref_log = train(reference, tiny_split, config(mode), tmp_path / "reference")

    run_dir = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_at_state(m, epoch=0)
        with pytest.raises(Killed):
            train(fresh_model(), tiny_split, config(mode), run_dir)
    assert torch.load(run_dir / "state.pt", weights_only=False)["epoch"] == 0
    assert not (run_dir / "log.csv").exists()

    # a new process: a freshly built model (even with other initial weights) picks up the checkpoint
    resumed = fresh_model(seed=123)
    log = train(resumed, tiny_split, config(mode), run_dir)
    assert_bitwise_equal(weights(resumed), weights(reference))
    assert list(log.epoch) == [1, 2]
    assert log.loss.tolist() == ref_log.loss.tolist()
    assert_bitwise_equal(load_file(str(run_dir / "model.safetensors")), weights(reference))


def test_resume_after_a_kill_between_weights_and_state(tmp_path, tiny_split, monkeypatch):
    """Killed after epoch 2's weights were written but before its state.pt: the pair on disk
    must still resume to the uninterrupted result (the docstring promises resume from the last
    finished epoch with the same final weights)."""
    reference = fresh_model()
    train(reference, tiny_split, config("grid"), tmp_path / "reference")

    run_dir = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_at_state(m, epoch=1, before=True)
        with pytest.raises(Killed):
            train(fresh_model(), tiny_split, config("grid"), run_dir)
    resumed = fresh_model(seed=123)
    train(resumed, tiny_split, config("grid"), run_dir)
    assert_bitwise_equal(weights(resumed), weights(reference))


def test_finished_run_is_not_retrained(tmp_path, tiny_split):
    model = fresh_model()
    train(model, tiny_split, config(), tmp_path)
    final = weights(model)
    again = fresh_model(seed=7)
    log = train(again, tiny_split, config(), tmp_path)
    assert_bitwise_equal(weights(again), final)
    assert list(log.epoch) == [1, 2]


def test_resume_with_another_config_raises(tmp_path, tiny_split):
    train(fresh_model(), tiny_split, config(), tmp_path)
    other = config()
    other.lr = 5e-3
    with pytest.raises(ValueError, match="another config"):
        train(fresh_model(), tiny_split, other, tmp_path)


# -- errors and helpers ------------------------------------------------------------------
def test_unknown_mode_raises():
    with pytest.raises(ValueError, match=r"unknown training mode 'patch'; valid choices: grid, spot"):
        TrainConfig(mode="patch")


def test_bad_token_range_raises(tmp_path, tiny_split):
    with pytest.raises(ValueError, match=r"need min_tokens <= max_tokens, got 5 > 3"):
        train(fresh_model(), tiny_split, config("spot", min_tokens=5, max_tokens=3), tmp_path)
    with pytest.raises(ValueError, match=r"min_tokens must be an integer >= 1, got 0"):
        train(fresh_model(), tiny_split, config("spot", min_tokens=0), tmp_path)
    with pytest.raises(ValueError, match=r"unknown training prior 'salient'; valid choices: uniform, gaussian"):
        config("spot", priors=["salient"])  # needs saliency maps, which training does not have


def test_build_vit_from_kwargs_and_timm_name():
    model = build_vit({**SPEC, "pretrained": False})
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.grid_size == (2, 2) and model.num_classes == 2
    named = build_vit({"timm_name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32, "num_classes": 3,
                       "depth": 1})
    assert isinstance(named, VisionTransformer) and named.num_classes == 3
    with pytest.raises(TypeError, match="not a VisionTransformer"):
        build_vit({"timm_name": "resnet10t", "pretrained": False, "num_classes": 2})


def test_train_size_uses_the_first_images(tmp_path, split_factory):
    data = split_factory(n=40)
    a, b = fresh_model(), fresh_model()
    cfg = config()
    cfg.train_size = 16
    train(a, data, cfg, tmp_path / "a")
    train(b, data.head(16), config(), tmp_path / "b")
    assert_bitwise_equal(weights(a), weights(b))
