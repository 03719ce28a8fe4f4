"""spotlib.policy (learned prior, placement policy) and spotlib.paper.placement (training, evaluation, costs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import spotlib.paper.train as train_module
from spotlib.data import Split
from spotlib.paper.placement import (PLACER_FILE, PlacementConfig, at_equal_flops, evaluate_placer, gap_closed,
                                     load_placer, placer_costs, save_placer, teacher_logits, train_placer)
from spotlib.policy import LearnedPrior, PlacementPolicy, build_placer, initial_positions, place
from spotlib.vit import SPoTViT
from conftest import make_vit

TINY = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=24, depth=1, num_heads=2)


def policy(n=6, seed=0, **kwargs):
    return PlacementPolicy(initial_positions(n, "isotropic", (16, 16)), in_chans=1, view_size=8, width=4, hidden=16,
                           seed=seed, **kwargs)


def scrambled(placer: torch.nn.Module, scale: float = 3.0) -> torch.nn.Module:
    """The placer with large random weights everywhere (far from its init: offsets that would leave the image)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in placer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return placer


@pytest.mark.parametrize("n", [1, 2, 6, 16, 49])
@pytest.mark.parametrize("kind", ["prior", "policy"])
def test_placers_return_exactly_n_positions_inside_the_image(n, kind):
    images = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 4
    placer = LearnedPrior(initial_positions(n, "isotropic", (16, 16))) if kind == "prior" else policy(n)
    for module in (placer, scrambled(placer)):
        positions = module(images)
        assert positions.shape == (5, n, 2)
        assert positions.dtype == torch.float32
        assert ((positions >= 0) & (positions <= 1)).all()
        assert module.num_tokens == n


def test_an_untrained_placer_returns_its_initial_positions():
    init = initial_positions(12, "center", (16, 16))
    images = torch.randn(3, 1, 16, 16)
    for placer in (LearnedPrior(init), PlacementPolicy(init, in_chans=1, view_size=8, width=4, hidden=8)):
        torch.testing.assert_close(placer(images), init.expand(3, -1, -1), atol=1e-6, rtol=0)


def test_the_policy_depends_on_the_image_and_the_prior_does_not():
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    moved = scrambled(policy(6), 0.5)(images)
    assert not torch.allclose(moved[0], moved[1])
    fixed = scrambled(LearnedPrior(initial_positions(6)), 0.5)(images)
    assert torch.equal(fixed[0], fixed[3])


def test_the_policy_is_deterministic_in_eval_mode_and_seeded():
    images = torch.randn(4, 1, 16, 16)
    a = scrambled(policy(6), 0.3).eval()
    assert torch.equal(a(images), a(images))
    state = torch.random.get_rng_state()
    b, c, d = policy(6, seed=0), policy(6, seed=0), policy(6, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "building a policy must not consume the global RNG"
    for (name, p), q, r in zip(b.named_parameters(), c.parameters(), d.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(b.parameters(), d.parameters()))


def test_place_never_reads_the_labels(split_factory):
    """Shuffled (even nonsense) labels give identical positions: the placer sees images only."""
    data = split_factory(n=20, size=(16, 16), num_classes=3)
    spot = SPoTViT(make_vit(**TINY))
    placer = scrambled(policy(6), 0.3)
    shuffled = Split(data.images, data.labels[torch.randperm(len(data))], data.mean, data.std, data.classes)
    nonsense = Split(data.images, torch.full_like(data.labels, -7), data.mean, data.std, data.classes)
    reference = place(placer, data, spot, batch_size=7)
    assert reference.shape == (20, 6, 2)
    assert torch.equal(place(placer, shuffled, spot, batch_size=7), reference)
    assert torch.equal(place(placer, nonsense, spot, batch_size=7), reference)
    assert placer.training, "place restores the placer's mode"


@pytest.mark.parametrize("kind", ["prior", "policy"])
def test_placer_parameters_receive_gradients_through_the_tokenizer(vit_factory, kind):
    spot = SPoTViT(vit_factory(**TINY))
    for p in spot.parameters():
        p.requires_grad_(False)
    placer = LearnedPrior(initial_positions(6)) if kind == "prior" else scrambled(policy(6), 0.3)
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    F.cross_entropy(spot(images, placer(images)), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in placer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} receives no gradient"


def test_the_policy_gradient_matches_finite_differences(vit_factory):
    """d loss / d base through the frozen model (float64; bilinear kinks avoided by a generic init)."""
    spot = SPoTViT(vit_factory(**TINY)).double()
    placer = PlacementPolicy(torch.tensor([[0.31, 0.42], [0.63, 0.57], [0.22, 0.71]]), in_chans=1, view_size=8,
                             width=2, hidden=4).double()
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    base = placer.base.detach().clone().requires_grad_(True)

    def loss(b):
        positions = torch.sigmoid(b + placer.offsets(placer.features(placer.view(images))).view(-1, 3, 2))
        return F.cross_entropy(spot(images, positions), torch.tensor([0, 2]))

    assert torch.autograd.gradcheck(loss, (base,), eps=1e-6, atol=1e-5)


def test_bad_arguments_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"init positions must have shape \(N, 2\)"):
        LearnedPrior(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="channels, the policy was built for 1"):
        policy(6)(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown placer kind 'glimpse'; valid choices: learned prior, learned policy"):
        build_placer({"kind": "glimpse", "num_tokens": 3})
    with pytest.raises(ValueError, match="unknown placement loss 'mse'.*distill, ce"):
        PlacementConfig(loss="mse")
    with pytest.raises(ValueError, match="unknown key.*'epoch'.*valid keys: epochs"):
        PlacementConfig.from_spec({"epoch": 2})
    with pytest.raises(ValueError, match="noise must be a number >= 0"):
        PlacementConfig(noise=-0.1)


# -- training ---------------------------------------------------------------------------------
def tiny_data(split_factory) -> Split:
    return split_factory(n=48, size=(16, 16), num_classes=3, seed=0)


def config(**changes) -> PlacementConfig:
    return PlacementConfig(**{"epochs": 2, "batch_size": 16, "lr": 2e-2, **changes})


def test_distillation_training_moves_the_positions_and_lowers_the_loss(vit_factory, split_factory, tmp_path):
    data = tiny_data(split_factory)
    spot, teacher_view = SPoTViT(vit_factory(**TINY, seed=1)), SPoTViT(vit_factory(**TINY, seed=2))
    teacher = teacher_logits(teacher_view, data)
    torch.testing.assert_close(teacher, teacher_view.model(data.normalise(data.images)), atol=1e-5, rtol=1e-5)
    placer = policy(6)
    before = placer(data.normalise(data.images[:4])).detach()
    frozen_weights = {k: v.clone() for k, v in spot.state_dict().items()}
    log = train_placer(placer, spot, data, config(epochs=4), tmp_path, teacher=teacher)
    assert list(log.epoch) == [1, 2, 3, 4] and log.loss.iloc[-1] < log.loss.iloc[0]
    assert not torch.allclose(placer(data.normalise(data.images[:4])), before)
    assert all(torch.equal(v, spot.state_dict()[k]) for k, v in frozen_weights.items()), "the SPoT model must stay frozen"
    assert (tmp_path / "log.csv").exists() and (tmp_path / PLACER_FILE).exists()
    again = load_placer(tmp_path / PLACER_FILE)
    assert torch.equal(place(again, data, spot), place(placer, data, spot))
    with pytest.raises(ValueError, match="the distill loss needs teacher logits"):
        train_placer(policy(6), spot, data, config(), tmp_path / "no_teacher")


def test_ce_training_reads_the_training_labels(vit_factory, split_factory, tmp_path):
    data = tiny_data(split_factory)
    spot = SPoTViT(vit_factory(**TINY))
    a = train_placer(LearnedPrior(initial_positions(4)), spot, data, config(loss="ce"), tmp_path / "a")
    flipped = Split(data.images, (data.labels + 1) % 3, data.mean, data.std, data.classes)
    b = train_placer(LearnedPrior(initial_positions(4)), spot, flipped, config(loss="ce"), tmp_path / "b")
    assert a.loss.tolist() != b.loss.tolist()


class Killed(Exception):
    """Stands in for the process being killed."""


def test_a_killed_training_resumes_to_the_uninterrupted_weights(vit_factory, split_factory, tmp_path, monkeypatch):
    data = tiny_data(split_factory)
    spot = SPoTViT(vit_factory(**TINY))
    teacher = teacher_logits(SPoTViT(vit_factory(**TINY, seed=2)), data)
    reference = policy(6)
    ref_log = train_placer(reference, spot, data, config(noise=0.02), tmp_path / "reference", teacher=teacher)
    real = train_module.save_state

    def save(obj, path):
        real(obj, path)
        if Path(path).name == "state.pt" and obj["epoch"] == 0:
            raise Killed("killed after epoch 1")

    with monkeypatch.context() as m:
        m.setattr(train_module, "save_state", save)
        with pytest.raises(Killed):
            train_placer(policy(6), spot, data, config(noise=0.02), tmp_path / "killed", teacher=teacher)
    resumed = policy(6, seed=5)  # other initial weights: the checkpoint wins
    log = train_placer(resumed, spot, data, config(noise=0.02), tmp_path / "killed", teacher=teacher)
    for p, q in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert log.loss.tolist() == ref_log.loss.tolist()
    with pytest.raises(ValueError, match="another config"):
        train_placer(policy(6), spot, data, config(lr=1e-3), tmp_path / "killed", teacher=teacher)


# -- evaluation, costs, the oracle's gap ------------------------------------------------------------
def test_evaluate_placer_scores_the_placed_tokens(vit_factory, split_factory):
    data = split_factory(n=30, size=(16, 16), num_classes=3)
    spot = SPoTViT(vit_factory(**TINY))
    placer = scrambled(policy(6), 0.3)
    scores = evaluate_placer(placer, spot, data, data.head(12), k=3, batch_size=8)
    logits = spot(data.normalise(data.images), place(placer, data, spot))
    assert torch.equal(scores["acc1"], logits.argmax(1) == data.labels)
    assert scores["knn"].shape == (30,)


def test_placer_costs_include_the_policys_own_flops(vit_factory, split_factory):
    data = split_factory(n=8, size=(16, 16), num_classes=3)
    spot = SPoTViT(vit_factory(**TINY))
    from spotlib.paper.sparsify import count_flops

    model_only = count_flops(spot, data.normalise(data.images[:1]), initial_positions(6)[None])
    prior = placer_costs("A", "learned prior", LearnedPrior(initial_positions(6)), spot, data, 16, "cpu")
    learned = placer_costs("A", "learned policy", policy(6), spot, data, 16, "cpu")
    assert prior["flops"] == model_only and prior["placer_flops"] == 0
    assert learned["placer_flops"] > 0 and learned["flops"] == model_only + learned["placer_flops"]
    assert learned["tokens"] == 6 and learned["images_per_s"] > 0


def test_gap_closed_is_the_share_of_the_ceilings_gap():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.6
    ceiling = np.ones(400, bool)
    assert gap_closed(base, base, ceiling)["gap_closed"] == 0
    assert gap_closed(ceiling, base, ceiling)["gap_closed"] == 100
    half = base.copy()
    wrong = np.flatnonzero(~base)
    half[wrong[: len(wrong) // 2]] = True
    out = gap_closed(half, base, ceiling)
    assert out["gap_closed"] == pytest.approx(100 * (len(wrong) // 2) / len(wrong))
    assert out["ci_low"] < out["gap_closed"] < out["ci_high"] and out["n"] == 400
    assert np.isnan(gap_closed(base, ceiling, ceiling)["gap_closed"])  # no gap to close
    with pytest.raises(ValueError, match="same images"):
        gap_closed(base[:10], base, ceiling)


def test_at_equal_flops_interpolates_and_finds_dominating_points():
    points = pd.DataFrame([
        dict(backbone="A", method="policy", tokens=6, mflops=4.0, acc1=78.0),
        dict(backbone="A", method="policy", tokens=25, mflops=12.0, acc1=84.0),
        dict(backbone="A", method="relevance", tokens=6, mflops=13.0, acc1=82.0),
        dict(backbone="A", method="relevance", tokens=3, mflops=8.0, acc1=79.0),
    ])
    out = at_equal_flops(points, "policy", "relevance").set_index("tokens")
    assert out.acc1_at_equal_flops[3] == pytest.approx(81.0)
    assert pd.isna(out.acc1_at_equal_flops[6])  # beyond the policy's costliest point
    assert out.dominated[6] and out.dominated_by[6] == "25 tokens"
    assert not out.dominated[3]
