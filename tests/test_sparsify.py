"""spotlib.paper.sparsify: learned token-relevance sparsification baseline, its training and FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import spotlib.paper.train as train_module  # the training loop the sparsifier runs on
from spotlib.utils import frozen
from spotlib.paper.sparsify import (
    PREDICTOR_FILE,
    SparsifyConfig,
    TokenRelevanceSparsifier,
    attention_probs,
    count_flops,
    distillation_loss,
    evaluate_sparsifier,
    masked_block_forward,
    plackett_luce_log_prob,
    train_sparsifier,
)
from spotlib.tokenizer import grid_positions
from spotlib.vit import SPoTViT

TINY = dict(img_size=28, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=4, num_heads=2)
N = 49  # 7 x 7 grid


@pytest.fixture
def tiny(vit_factory):
    """(model, sparsifier with prune_after=1, images (3, 1, 28, 28))."""
    model = vit_factory(**TINY)
    sparsifier = TokenRelevanceSparsifier(model, prune_after=1, hidden=16).eval()
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, sparsifier, images


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- inference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 7, 30, N])
def test_keeps_exactly_the_budget_and_the_class_token(tiny, keep):
    model, sparsifier, images = tiny
    seen = {}
    hook = model.blocks[2].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        x_prefix, _ = sparsifier.run_prefix(images)
        logits = sparsifier(images, keep)
    hook.remove()
    assert logits.shape == (3, 5)
    assert seen["x"].shape == (3, 1 + keep, 32)  # blocks after prune_after see class token + keep patches
    assert torch.equal(seen["x"][:, 0], x_prefix[:, 0])  # the class token is never dropped
    idx = sparsifier.keep_indices(images, keep)
    assert idx.shape == (3, keep)
    assert (idx.diff(dim=1) > 0).all() and idx.min() >= 0 and idx.max() < N  # distinct, raster order
    assert torch.equal(seen["x"][:, 1:], x_prefix[:, 1:].gather(1, idx[..., None].expand(-1, -1, 32)))
    positions = sparsifier.kept_positions(images, keep)
    grid = grid_positions((7, 7), 3)
    assert positions.shape == (3, keep, 2)
    assert torch.equal(positions, grid.gather(1, idx[..., None].expand(-1, -1, 2)))
    # the kept tokens are the top-scoring ones
    scores = sparsifier.scores(images)
    assert scores.shape == (3, N)
    assert (scores.gather(1, idx).min(1).values >= scores.topk(keep, 1).values[:, -1]).all()


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "reg_tokens": 2}, {"no_embed_class": True, "qkv_bias": False}],
                         ids=["plain", "qknorm-registers", "noembedcls"])
def test_full_budget_equals_the_unpruned_model(vit_factory, extra):
    model = vit_factory(**TINY, **extra)
    for prune_after in (0, 2):
        sparsifier = TokenRelevanceSparsifier(model, prune_after=prune_after, hidden=8).eval()
        images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, got = model(images), sparsifier(images, N)
            feats = sparsifier.features(images, N)
            expected_feats = model.forward_head(model.forward_features(images), pre_logits=True)
            pruned = sparsifier(images, 10)
        assert (got - expected).abs().max().item() <= 1e-5
        assert (feats - expected_feats).abs().max().item() <= 1e-5
        assert (pruned - expected).abs().max().item() > 1e-3  # pruning changes the output: the test is sensitive
        assert all(block.attn.fused_attn for block in model.blocks)  # capture restores timm's fused path


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_probs_match_timm(vit_factory, qk_norm):
    model = vit_factory(**TINY, qk_norm=qk_norm)
    with torch.no_grad():
        if qk_norm:  # non-trivial q/k norms
            for block in model.blocks:
                block.attn.q_norm.weight.uniform_(0.5, 1.5)
                block.attn.k_norm.bias.uniform_(-0.5, 0.5)
    sparsifier = TokenRelevanceSparsifier(model, prune_after=2, hidden=8).eval()
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = sparsifier.embed(images)
        maps = []
        for block in model.blocks[:3]:
            attn = block.attn
            probs = attention_probs(block, x)
            assert probs.shape == (2, 2, 50, 50)
            assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 50), atol=1e-6)
            h = block.norm1(x)
            v = attn.qkv(h).reshape(2, 50, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
            out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 50, 32))
            assert (out - attn(h)).abs().max().item() <= 1e-5  # attn(h) is timm's fused attention
            maps.append(probs.mean(1))
            x = block(x)
        # the features the predictor reads are built from exactly these maps
        _, features = sparsifier.run_prefix(images)
    cls = torch.stack([m[:, 0, 1:] for m in maps], -1) * 50
    received = torch.stack([m[:, :, 1:].mean(1) for m in maps], -1) * 50
    expected = torch.cat([cls, received, cls.diff(dim=-1), received.diff(dim=-1)], -1)
    assert features.shape == (2, N, sparsifier.num_attn_features) == (2, N, 10)
    assert (features - expected).abs().max().item() <= 1e-4


# -- training relaxation --------------------------------------------------------------------------
def test_masked_block_forward(tiny):
    model, _, _ = tiny
    block = model.blocks[2]
    x = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (masked_block_forward(block, x, torch.ones(2, 50)) - block(x)).abs().max().item() <= 1e-5
        kept = torch.tensor([0, 3, 4, 10, 20, 49])
        mask = torch.zeros(2, 50)
        mask[:, kept] = 1
        out = masked_block_forward(block, x, mask)
        assert (out[:, kept] - block(x[:, kept])).abs().max().item() <= 1e-5
    # dropped tokens (mask 0) still receive a gradient: they learn whether they should have been kept
    mask.requires_grad_(True)
    masked_block_forward(block, x, mask)[:, 0].pow(2).sum().backward()
    dropped = torch.ones(50, dtype=torch.bool)
    dropped[kept] = False
    assert (mask.grad[:, dropped].abs() > 0).all()


@pytest.mark.parametrize("keep", [5, N])
def test_relaxed_forward_equals_pruned_inference(tiny, keep):
    model, sparsifier, images = tiny
    with torch.no_grad():
        student, teacher = sparsifier.relaxed_forward(images, keep, noise=0.0)
        assert (teacher - model(images)).abs().max().item() <= 1e-5
        assert (student - sparsifier(images, keep)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("estimator", ["reinforce", "straight_through"])
def test_gradients_reach_only_the_predictor(tiny, estimator):
    model, sparsifier, images = tiny
    gen = torch.Generator().manual_seed(0)
    with frozen(model):
        if estimator == "reinforce":
            loss = sparsifier.policy_loss(images, 12, samples=3, generator=gen)["loss"]
        else:
            student, teacher = sparsifier.relaxed_forward(images, 12, noise=1.0, generator=gen)
            loss = distillation_loss(student, teacher)
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    for name, p in sparsifier.predictor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_relaxed_forward_takes_a_budget_per_image(tiny):
    _, sparsifier, images = tiny
    keep = torch.tensor([3, 17, N])
    with torch.no_grad():
        student, _ = sparsifier.relaxed_forward(images, keep, noise=0.0)
        for i, k in enumerate(keep.tolist()):
            assert (student[i] - sparsifier(images[i : i + 1], k)[0]).abs().max().item() <= 1e-5


def test_plackett_luce_log_prob_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 6, generator=gen)
    order = torch.stack([torch.randperm(6, generator=gen) for _ in range(2)])
    for places in (1, 3, 6):
        expected = torch.zeros(2)
        for b in range(2):
            left = list(range(6))
            for i in range(places):
                j = int(order[b, i])
                expected[b] += scores[b, j] - scores[b, left].logsumexp(0)
                left.remove(j)
        assert torch.allclose(plackett_luce_log_prob(scores, order, places), expected, atol=1e-6)
    # the probabilities of all orderings of 3 items sum to one
    small = torch.randn(3, generator=gen)
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    assert plackett_luce_log_prob(small.expand(6, 3), perms, 3).exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_policy_loss_runs_the_pruned_model(tiny):
    """With very confident scores every Gumbel draw keeps the top-k: each sample is the inference forward."""
    model, sparsifier, images = tiny

    class Confident(torch.nn.Module):
        def forward(self, tokens, attn_features):
            return 1e4 * tokens[..., 0]

    sparsifier.predictor = Confident()
    out = sparsifier.policy_loss(images, 9, samples=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sparsifier(images, 9)
        assert (out["teacher"] - model(images)).abs().max().item() <= 1e-5
    assert out["student"].shape == (3, 3, 5) and out["kl"].shape == (3, 3)
    assert (out["student"] - expected).abs().max().item() <= 1e-5
    expected_kl = F.kl_div(expected.log_softmax(-1), out["teacher"].log_softmax(-1), log_target=True,
                           reduction="none").sum(-1)
    assert torch.allclose(out["kl"], expected_kl.expand(3, 3), atol=1e-6)


# -- train_sparsifier ---------------------------------------------------------------------------
def tiny_data(split_factory):
    return split_factory(n=32, size=(28, 28), num_classes=5, seed=0)


def config(**kw) -> SparsifyConfig:
    return SparsifyConfig(**{**dict(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.0, min_keep=4, max_keep=20), **kw})


def sensitive(model):
    """Re-initialise the block weights with unit gain: timm's small init makes a random model's
    logits almost independent of the tokens, so there would be nothing to distil."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.blocks.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


@pytest.mark.parametrize("estimator", ["reinforce", "straight_through"])
def test_train_sparsifier_writes_checkpoints_and_learns(vit_factory, split_factory, tmp_path, estimator):
    model = sensitive(vit_factory(**TINY))
    sparsifier = TokenRelevanceSparsifier(model, prune_after=1, hidden=16).eval()
    data = tiny_data(split_factory)
    backbone, predictor = snapshot(model), snapshot(sparsifier.predictor)
    images = data.normalise(data.images)

    def kl_at(keep):
        with torch.no_grad():
            return distillation_loss(sparsifier(images, keep), model(images)).item()

    before = kl_at(8)
    log = train_sparsifier(sparsifier, data, config(epochs=4, estimator=estimator), tmp_path)
    for name in (PREDICTOR_FILE, "state.pt", "log.csv", "log.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.tmp"))
    assert_bitwise_equal(snapshot(model), backbone)  # frozen backbone
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # flags and mode restored
    assert any(not torch.equal(v, snapshot(sparsifier.predictor)[k]) for k, v in predictor.items())
    assert_bitwise_equal(load_file(str(tmp_path / PREDICTOR_FILE)), snapshot(sparsifier.predictor))
    assert isinstance(log, pd.DataFrame) and list(log.epoch) == [1, 2, 3, 4]
    assert {"epoch", "loss", "agree", "mean_keep", "lr", "seconds", "images_per_s"} <= set(log.columns)
    assert log.mean_keep.between(4, 20).all() and (log.loss >= 0).all()
    assert pd.read_csv(tmp_path / "log.csv").loss.tolist() == pytest.approx(log.loss.tolist())
    assert len(json.loads((tmp_path / "log.json").read_text())) == 4
    after = kl_at(8)
    print(f"{estimator}: KL at keep 8 {before:.4f} -> {after:.4f}")
    assert after < before  # distillation improved at a fixed budget
    # the checkpoint rebuilds the sparsifier
    again = TokenRelevanceSparsifier.from_checkpoint(model, tmp_path / PREDICTOR_FILE)
    assert again.prune_after == 1 and again.hidden == 16
    with torch.no_grad():
        assert torch.equal(again(images[:4], 6), sparsifier(images[:4], 6))


class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.mark.parametrize("estimator", ["reinforce", "straight_through"])
def test_resume_after_a_kill_matches_uninterrupted_run(vit_factory, split_factory, tmp_path, monkeypatch, estimator):
    data = tiny_data(split_factory)

    def fresh(seed=0):
        torch.manual_seed(seed)
        return TokenRelevanceSparsifier(vit_factory(**TINY), prune_after=1, hidden=16)

    reference = fresh()
    ref_log = train_sparsifier(reference, data, config(estimator=estimator), tmp_path / "reference")

    real = train_module.save_state

    def save(obj, path):
        real(obj, path)
        if Path(path).name == "state.pt" and obj["epoch"] == 0:
            raise Killed("killed after epoch 1")

    run_dir = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(train_module, "save_state", save)
        with pytest.raises(Killed):
            train_sparsifier(fresh(), data, config(estimator=estimator), run_dir)
    assert not (run_dir / "log.csv").exists()
    resumed = fresh(seed=123)  # other initial predictor weights: the checkpoint wins
    log = train_sparsifier(resumed, data, config(estimator=estimator), run_dir)
    assert_bitwise_equal(snapshot(resumed.predictor), snapshot(reference.predictor))
    assert log.loss.tolist() == ref_log.loss.tolist()
    with pytest.raises(ValueError, match="another config"):
        train_sparsifier(fresh(), data, config(estimator=estimator, lr=5e-3), run_dir)


def test_warmup_ending_at_step_zero_is_handled(tiny, split_factory, tmp_path):
    """OneCycleLR divides by zero when warmup * total_steps == 1 (here 0.5 * 2 steps)."""
    _, sparsifier, _ = tiny
    log = train_sparsifier(sparsifier, tiny_data(split_factory), config(epochs=1, warmup=0.5), tmp_path)
    assert list(log.epoch) == [1]


def test_evaluate_sparsifier(tiny, split_factory):
    _, sparsifier, _ = tiny
    data = tiny_data(split_factory)
    result = evaluate_sparsifier(sparsifier, data.head(12), data, keep=10, k=3, batch_size=8)
    assert set(result) == {"acc1", "knn"}
    assert all(v.dtype == torch.bool and v.shape == (12,) for v in result.values())  # per image, paired
    again = evaluate_sparsifier(sparsifier, data.head(12), None, keep=10, batch_size=5)
    assert set(again) == {"acc1"} and torch.equal(again["acc1"], result["acc1"])  # batching does not matter


# -- FLOPs ----------------------------------------------------------------------------------------
def test_flops_decrease_with_the_budget_and_full_budget_costs_the_model(tiny):
    model, sparsifier, _ = tiny
    images = torch.zeros(1, 1, 28, 28)
    budgets = [1, 5, 10, 25, 40, N]
    with frozen(sparsifier):
        values = [count_flops(sparsifier, images, keep) for keep in budgets]
    assert all(a < b for a, b in zip(values, values[1:]))
    full = count_flops(model, images)
    assert full < values[-1] < 1.05 * full  # the predictor's overhead is small
    # fused CPU attention is counted: fused and explicit attention cost the same
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_flops(model, images) == full
    spot = [count_flops(SPoTViT(model), images, torch.rand(1, n, 2)) for n in (4, 16, N)]
    assert spot[0] < spot[1] < spot[2] == full


# -- errors ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny, vit_factory, split_factory, tmp_path):
    model, sparsifier, images = tiny
    for keep in (0, -1, N + 1):
        with pytest.raises(ValueError, match=r"keep must be in \[1, 49\]"):
            sparsifier(images, keep)
    with pytest.raises(TypeError, match=r"keep must be an int in \[1, 49\]"):
        sparsifier(images, 2.5)
    with pytest.raises(ValueError, match="class token"):
        TokenRelevanceSparsifier(vit_factory(**TINY, class_token=False, global_pool="avg"), prune_after=1)
    for prune_after in (-1, 3):
        with pytest.raises(ValueError, match=r"prune_after must be an int in \[0, 2\]"):
            TokenRelevanceSparsifier(model, prune_after=prune_after)
    with pytest.raises(TypeError, match="VisionTransformer"):
        TokenRelevanceSparsifier(torch.nn.Linear(2, 2), prune_after=0)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 28, 28\)"):
        sparsifier(torch.zeros(1, 3, 28, 28), 4)
    with pytest.raises(ValueError, match=r"need 1 <= min_keep <= max_keep, got 0, 20"):
        train_sparsifier(sparsifier, tiny_data(split_factory), config(min_keep=0), tmp_path)
    with pytest.raises(ValueError, match=r"1 <= min_keep <= max_keep <= 49"):
        train_sparsifier(sparsifier, tiny_data(split_factory), config(max_keep=50), tmp_path)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        SparsifyConfig(noise=-1)
    with pytest.raises(ValueError, match="unknown estimator 'gumbel'; valid choices: reinforce, straight_through"):
        SparsifyConfig(estimator="gumbel")
    with pytest.raises(ValueError, match="samples must be >= 2"):
        SparsifyConfig(samples=1)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 49\], got values in \[0, 3\]"):
        sparsifier.relaxed_forward(images, torch.tensor([0, 3, 3]))
    other = TokenRelevanceSparsifier(model, prune_after=0, hidden=16)
    sparsifier.save_predictor(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="prune_after=1, hidden=16"):
        other.load_predictor(tmp_path / "p.safetensors")
