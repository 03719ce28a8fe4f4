"""spotlib.evaluate: top-1, kNN and sweeps."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from spotlib.evaluate import draw_positions, embed, evaluate, knn_predict, sweep
from spotlib.vit import SPoTViT


# -- kNN ------------------------------------------------------------------------
def test_knn_on_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 5
    bank_labels = torch.arange(4).repeat_interleave(10)
    bank = centres[bank_labels] + 0.3 * torch.randn(40, 8, generator=g)
    query_labels = torch.tensor([3, 0, 2, 1, 1, 2])
    queries = centres[query_labels] + 0.3 * torch.randn(6, 8, generator=g)
    pred = knn_predict(bank, bank_labels, queries, num_classes=4, k=5)
    assert pred.dtype == torch.int64
    assert torch.equal(pred, query_labels)


def weighted_vs_majority_case():
    """One very close neighbour of class 0 against two farther ones of class 1 (cosine 1 vs 0.8)."""
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    return bank, labels, query


def test_knn_weighted_vote_beats_majority():
    bank, labels, query = weighted_vs_majority_case()
    # exp(1 / 0.07) = 1.6e6 against 2 * exp(0.8 / 0.07) = 1.8e5: class 0 wins
    assert knn_predict(bank, labels, query, num_classes=3, k=3).tolist() == [0]
    # with a flat temperature the vote is a plain majority: class 1
    assert knn_predict(bank, labels, query, num_classes=3, k=3, temperature=100.0).tolist() == [1]
    # k = 1: nearest neighbour
    assert knn_predict(bank, labels, query, num_classes=3, k=1, temperature=100.0).tolist() == [0]


def test_knn_uses_cosine_similarity():
    """Scaling bank or query vectors changes nothing (L2 normalisation), unlike a dot product."""
    bank, labels, query = weighted_vs_majority_case()
    bank = bank * torch.tensor([[1.0], [50.0], [50.0], [1.0]])
    assert knn_predict(bank, labels, query * 0.01, num_classes=3, k=3).tolist() == [0]
    # Euclidean nearest neighbour of [2, 0] would be [1, 0] too, so check a case where it is not:
    bank2 = torch.tensor([[10.0, 0.0], [0.6, 0.8]])
    labels2 = torch.tensor([0, 1])
    assert knn_predict(bank2, labels2, torch.tensor([[0.6, 0.8]]), num_classes=2, k=1).tolist() == [1]
    assert knn_predict(bank2, labels2, torch.tensor([[1.0, 0.1]]), num_classes=2, k=1).tolist() == [0]


def test_knn_k_larger_than_bank_and_chunking():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(7, 4, generator=g)
    labels = torch.randint(0, 3, (7,), generator=g)
    queries = torch.randn(25, 4, generator=g)
    full = knn_predict(bank, labels, queries, num_classes=3, k=50)
    chunked = knn_predict(bank, labels, queries, num_classes=3, k=50, chunk=4)
    assert full.shape == (25,)
    assert torch.equal(full, chunked)


def test_knn_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(30, 6, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    queries = torch.randn(10, 6, generator=g)
    k, T = 5, 0.07
    expected = []
    for q in queries:
        sims = torch.nn.functional.cosine_similarity(bank, q[None], dim=1)
        top = sims.argsort(descending=True)[:k]
        votes = torch.zeros(4)
        for i in top:
            votes[labels[i]] += torch.exp(sims[i] / T)
        expected.append(int(votes.argmax()))
    assert knn_predict(bank, labels, queries, num_classes=4, k=k, temperature=T).tolist() == expected


def test_knn_errors():
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        knn_predict(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(1, 2), 2, k=0)
    with pytest.raises(ValueError, match="different numbers of samples"):
        knn_predict(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), torch.zeros(1, 2), 2)


# -- evaluate -----------------------------------------------------------------------
@pytest.fixture
def spot_and_splits(vit_factory, split_factory):
    model = vit_factory(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=16)
    spot = SPoTViT(model).eval()
    test = split_factory(n=20, size=(8, 8), seed=1)
    bank = split_factory(n=30, size=(8, 8), seed=2)
    return spot, test, bank


def test_evaluate_returns_percentages(spot_and_splits):
    spot, test, bank = spot_and_splits
    out = evaluate(spot, test, bank, "uniform", 3, batch_size=8)
    assert set(out) == {"acc1", "knn"}
    for v in out.values():
        assert isinstance(v, float) and 0 <= v <= 100
        assert (v * len(test) / 100) == pytest.approx(round(v * len(test) / 100), abs=1e-6)  # a count of hits
    assert set(evaluate(spot, test, None, "uniform", 3)) == {"acc1"}


def test_evaluate_top1_matches_a_manual_forward(spot_and_splits):
    spot, test, _ = spot_and_splits
    pos = draw_positions("gaussian", test, 3, spot, seed=4)
    with torch.no_grad():
        logits = spot(test.normalise(test.images), pos)
    expected = 100 * (logits.argmax(1) == test.labels).float().mean().item()
    # batch size does not matter
    for bs in (3, 256):
        assert evaluate(spot, test, None, "gaussian", 3, seed=4, batch_size=bs)["acc1"] == pytest.approx(expected)
    # explicit positions override the prior
    assert evaluate(spot, test, None, "uniform", 3, positions=pos, batch_size=7)["acc1"] == pytest.approx(expected)


def test_evaluate_full_grid_matches_timm(spot_and_splits):
    spot, test, _ = spot_and_splits
    with torch.no_grad():
        expected = 100 * (spot.model(test.normalise(test.images)).argmax(1) == test.labels).float().mean().item()
    assert evaluate(spot, test, None, "isotropic", spot.num_grid_tokens)["acc1"] == pytest.approx(expected)
    assert evaluate(spot, test, None, "grid", spot.num_grid_tokens)["acc1"] == pytest.approx(expected)


def test_evaluate_knn_matches_manual_pipeline(spot_and_splits):
    spot, test, bank = spot_and_splits
    pos_test = draw_positions("uniform", test, 3, spot, seed=7)
    pos_bank = draw_positions("uniform", bank, 3, spot, seed=8)  # the bank uses seed + 1
    _, f_test = embed(spot, test, pos_test)
    _, f_bank = embed(spot, bank, pos_bank)
    pred = knn_predict(f_bank, bank.labels, f_test, num_classes=2, k=20, temperature=0.07)
    expected = 100 * (pred == test.labels).float().mean().item()
    assert evaluate(spot, test, bank, "uniform", 3, seed=7)["knn"] == pytest.approx(expected)


def test_embed_shapes_and_consistency(spot_and_splits):
    spot, test, _ = spot_and_splits
    pos = draw_positions("sobol", test, 4, spot, seed=0)
    logits, feats = embed(spot, test, pos, batch_size=6)
    assert logits.shape == (len(test), 2) and feats.shape == (len(test), 16)
    with torch.no_grad():
        torch.testing.assert_close(logits, spot(test.normalise(test.images), pos), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats, spot.features(test.normalise(test.images), pos), rtol=1e-5, atol=1e-5)


def test_evaluate_is_deterministic(spot_and_splits):
    spot, test, bank = spot_and_splits
    a = evaluate(spot, test, bank, "uniform", 2, seed=3)
    b = evaluate(spot, test, bank, "uniform", 2, seed=3)
    assert a == b


def test_evaluate_leaves_eval_mode_alone(vit_factory, split_factory):
    """``model.eval(); evaluate(SPoTViT(model), ...)`` must not switch the timm model to train mode."""
    model = vit_factory(img_size=8, patch_size=4, num_classes=2).eval()
    evaluate(SPoTViT(model), split_factory(n=4), None, "uniform", 2)
    assert not model.training


# -- sweep ---------------------------------------------------------------------------
COLUMNS = ["backbone", "model", "prior", "oracle", "tokens", "metric", "value", "ci_low", "ci_high", "n"]


def test_sweep_tidy_frame(vit_factory, split_factory):
    test = split_factory(n=10, size=(8, 8), seed=1)
    bank = split_factory(n=12, size=(8, 8), seed=2)
    models = {
        "grid": SPoTViT(vit_factory(img_size=8, patch_size=4, num_classes=2, embed_dim=16, seed=0)),
        "spot": SPoTViT(vit_factory(img_size=8, patch_size=4, num_classes=2, embed_dim=16, seed=1)),
    }
    priors = {"grid": ["grid"], "spot": ["uniform", "salient"]}
    saliency = {"test": torch.rand(10, 8, 8), "bank": torch.rand(12, 8, 8)}
    budgets = [1, 4]
    df = sweep(models, priors, budgets, test, bank, backbone="tiny", saliency=saliency, batch_size=5)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == COLUMNS
    assert len(df) == (1 + 2) * len(budgets) * 2  # (model, prior) pairs x budgets x {acc1, knn}
    assert set(df.metric) == {"acc1", "knn"}
    assert (df.backbone == "tiny").all()
    assert df.value.between(0, 100).all()
    assert df.loc[df.prior == "salient", "oracle"].all()
    assert not df.loc[df.prior != "salient", "oracle"].any()
    assert sorted(set(df.tokens)) == budgets
    assert set(zip(df.model, df.prior)) == {("grid", "grid"), ("spot", "uniform"), ("spot", "salient")}
    # every (model, prior, tokens, metric) appears once
    assert not df.duplicated(["model", "prior", "tokens", "metric"]).any()
    # the values are those of evaluate()
    row = df[(df.model == "spot") & (df.prior == "uniform") & (df.tokens == 4) & (df.metric == "acc1")]
    assert row.value.item() == pytest.approx(evaluate(models["spot"], test, bank, "uniform", 4)["acc1"])
    assert (df.ci_low <= df.value).all() and (df.value <= df.ci_high).all() and (df.n == 10).all()


def test_sweep_per_image_outcomes_and_partial_saliency(vit_factory, split_factory):
    """per_image holds the outcomes behind each value; maps for fewer images score those priors on them."""
    test = split_factory(n=10, size=(8, 8), seed=1)
    model = SPoTViT(vit_factory(img_size=8, patch_size=4, num_classes=2, embed_dim=16, seed=0))
    per_image = {}
    df = sweep({"m": model}, {"m": ["isotropic", "salient"]}, [3], test, None, backbone="b", per_image=per_image,
               saliency={"test": torch.rand(6, 8, 8)}, saliency_name="maps")
    assert set(df.prior) == {"isotropic", "salient (maps)"}
    for r in df.itertuples():
        correct = per_image["b", "m", r.prior, 3, "acc1"]
        assert correct.dtype == torch.bool and len(correct) == r.n
        assert r.value == pytest.approx(100 * correct.float().mean().item())
    assert df.set_index("prior").n.to_dict() == {"isotropic": 10, "salient (maps)": 6}


def test_sweep_without_bank_has_top1_only(vit_factory, split_factory):
    test = split_factory(n=6, size=(8, 8))
    models = {"m": SPoTViT(vit_factory(img_size=8, patch_size=4, num_classes=2, embed_dim=16))}
    df = sweep(models, {"m": ["uniform", "isotropic", "center"]}, [2, 3, 4], test, None)
    assert list(df.columns) == COLUMNS
    assert len(df) == 3 * 3
    assert set(df.metric) == {"acc1"}
