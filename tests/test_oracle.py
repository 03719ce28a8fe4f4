"""spotlib.oracle: SPoT-ON, per-image gradient search of token positions."""

from __future__ import annotations

import pytest
import torch

from spotlib.oracle import OracleResult, one_at_a_time, spot_on
from spotlib.utils import frozen
from spotlib.vit import SPoTViT

N_TOKENS = 3
STEPS = 15
LR = 1e-2


def init_positions(batch, seed=5):
    # slightly outside [0, 1] on purpose for some tokens: the oracle clamps its start
    pos = torch.rand(batch, N_TOKENS, 2, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.1
    return pos


@pytest.fixture(scope="module")
def oracle_run(trained_blob_model):
    spot, images, labels = trained_blob_model
    init = init_positions(len(labels))
    result = spot_on(spot, images, labels, init, steps=STEPS, lr=LR)
    return spot, images, labels, init, result


def test_shapes_and_types(oracle_run):
    _, images, _, _, r = oracle_run
    B = images.shape[0]
    assert isinstance(r, OracleResult)
    assert r.positions.shape == (B, N_TOKENS, 2)
    assert r.trajectory.shape == (B, STEPS + 1, N_TOKENS, 2)
    assert r.loss.shape == (B, STEPS + 1)
    assert r.correct_before.shape == (B,) and r.correct_before.dtype == torch.bool
    assert r.correct_after.shape == (B,) and r.correct_after.dtype == torch.bool
    assert not r.positions.requires_grad and not r.trajectory.requires_grad
    torch.testing.assert_close(r.loss_before, r.loss[:, 0])
    torch.testing.assert_close(r.loss_after, r.loss[:, -1])


def test_trajectory_starts_at_clamped_init_and_ends_at_result(oracle_run):
    _, _, _, init, r = oracle_run
    assert (init < 0).any() and (init > 1).any()  # the clamp is exercised
    assert torch.equal(r.trajectory[:, 0], init.clamp(0, 1))
    assert torch.equal(r.trajectory[:, -1], r.positions)
    # positions actually moved
    assert (r.positions - r.trajectory[:, 0]).abs().max() > 1e-3


def test_positions_stay_in_unit_square(oracle_run):
    r = oracle_run[-1]
    assert r.trajectory.min() >= 0 and r.trajectory.max() <= 1


def test_oracle_lowers_the_loss(oracle_run):
    spot, images, labels, _, r = oracle_run
    assert r.loss_after.mean() < 0.8 * r.loss_before.mean()
    assert (r.loss_after < r.loss_before).float().mean() >= 0.75
    assert r.correct_after.float().mean() >= r.correct_before.float().mean()


def test_recorded_losses_match_the_model(oracle_run):
    """loss[:, t] is the cross-entropy at trajectory[:, t]; correct_* match the logits there."""
    spot, images, labels, _, r = oracle_run
    with torch.no_grad():
        for t in (0, STEPS // 2, STEPS):
            logits = spot(images, r.trajectory[:, t])
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            torch.testing.assert_close(r.loss[:, t], loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(evaluate_positions(spot, images, labels, r.trajectory[:, 0]), r.correct_before)


def evaluate_positions(spot, images, labels, positions):
    with torch.no_grad(), frozen(spot):
        return spot(images, positions).argmax(-1) == labels


def test_correct_after_matches_the_model(oracle_run):
    spot, images, labels, _, r = oracle_run
    assert torch.equal(evaluate_positions(spot, images, labels, r.positions), r.correct_after)


def test_one_at_a_time_is_each_tokens_own_search(oracle_run):
    """Token j ends where a search moving only j puts it; with one token it is the joint search."""
    spot, images, labels, init, _ = oracle_run
    images, labels, init = images[:4], labels[:4], init[:4, :3]
    solo = one_at_a_time(spot, images, labels, init, steps=5, lr=LR)
    for j in range(3):
        movable = torch.arange(3) == j
        alone = spot_on(spot, images, labels, init, steps=5, lr=LR, movable=movable).positions
        torch.testing.assert_close(solo[:, j], alone[:, j], rtol=0, atol=0)
        assert not torch.equal(solo[:, j], init[:, j])  # it moved
    single = spot_on(spot, images, labels, init[:, :1], steps=5, lr=LR).positions
    torch.testing.assert_close(one_at_a_time(spot, images, labels, init[:, :1], steps=5, lr=LR), single, rtol=0, atol=0)


def test_batch_independence(oracle_run):
    """An image's search does not depend on its batch mates."""
    spot, images, labels, init, r = oracle_run
    for i in (0, 5, 11):
        single = spot_on(spot, images[i : i + 1], labels[i : i + 1], init[i : i + 1], steps=STEPS, lr=LR)
        torch.testing.assert_close(single.positions[0], r.positions[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(single.loss[0], r.loss[i], rtol=1e-4, atol=1e-5)
    # and a different batch split gives the same answer
    half = spot_on(spot, images[:8], labels[:8], init[:8], steps=STEPS, lr=LR)
    torch.testing.assert_close(half.positions, r.positions[:8], rtol=0, atol=1e-5)


def test_model_untouched_and_flags_restored(trained_blob_model):
    spot, images, labels = trained_blob_model
    model = spot.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # a mixed state: some parameters frozen by the caller, the view in train mode
    model.pos_embed.requires_grad_(False)
    flags_mixed = {n: p.requires_grad for n, p in model.named_parameters()}
    spot.train()
    try:
        spot_on(spot, images[:4], labels[:4], init_positions(4), steps=3, lr=LR)
        assert spot.training and model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_mixed
        assert all(p.grad is None for p in model.parameters())
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        spot.eval()


@pytest.mark.parametrize("call", ["spot_on", "one_at_a_time"])
def test_eval_mode_of_the_wrapped_model_is_restored(vit_factory, call):
    """The common pattern ``model.eval(); spot = SPoTViT(model)`` leaves the view's own
    flag at True (nn.Module default) while the timm model is in eval mode. After the
    oracle, every submodule must be back in the mode it was in, not switched to train."""
    model = vit_factory(img_size=16, patch_size=4, num_classes=2).eval()
    spot = SPoTViT(model)
    x = torch.randn(2, 1, 16, 16)
    y = torch.tensor([0, 1])
    pos = torch.rand(2, 3, 2)
    modes = {name: m.training for name, m in spot.named_modules()}
    if call == "spot_on":
        spot_on(spot, x, y, pos, steps=1)
    else:
        one_at_a_time(spot, x, y, pos, steps=1)
    assert {name: m.training for name, m in spot.named_modules()} == modes
    assert not model.training


def test_frozen_restores_on_error(vit_factory):
    model = vit_factory().train()
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_zero_steps_evaluates_the_start(trained_blob_model):
    spot, images, labels = trained_blob_model
    init = init_positions(4)
    r = spot_on(spot, images[:4], labels[:4], init, steps=0)
    assert r.trajectory.shape == (4, 1, N_TOKENS, 2)
    assert torch.equal(r.positions, init.clamp(0, 1))
    assert torch.equal(r.correct_before, r.correct_after)


def test_does_not_modify_init_positions(trained_blob_model):
    spot, images, labels = trained_blob_model
    init = init_positions(2)
    copy = init.clone()
    spot_on(spot, images[:2], labels[:2], init, steps=2)
    assert torch.equal(init, copy)


def test_concatenation_of_results(oracle_run):
    r = oracle_run[-1]
    parts = [OracleResult(*(getattr(r, f)[sl] for f in OracleResult.__dataclass_fields__))
             for sl in (slice(0, 5), slice(5, None))]
    joined = OracleResult.cat(parts)
    for f in OracleResult.__dataclass_fields__:
        assert torch.equal(getattr(joined, f), getattr(r, f))


def test_argument_errors(trained_blob_model):
    spot, images, labels = trained_blob_model
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
        spot_on(spot, images[:2], labels[:3], init_positions(2))
    with pytest.raises(ValueError, match=r"steps must be an integer >= 0, got -1"):
        spot_on(spot, images[:2], labels[:2], init_positions(2), steps=-1)


# -- movable tokens, whole splits ----------------------------------------------------------
@pytest.mark.parametrize("mask_shape", ["N", "BN"])
def test_movable_mask_keeps_frozen_tokens_in_place(trained_blob_model, mask_shape):
    spot, images, labels = trained_blob_model
    B = 4
    init = 0.1 + 0.8 * torch.rand(B, N_TOKENS, 2, generator=torch.Generator().manual_seed(9))  # away from the clamp
    if mask_shape == "N":
        movable = torch.tensor([False, True, True])
    else:
        movable = torch.tensor([[False, True, True], [True, False, True], [True, True, False], [False, False, True]])
    r = spot_on(spot, images[:B], labels[:B], init, steps=5, lr=LR, movable=movable)
    still = ~movable.expand(B, N_TOKENS)
    start = init.clamp(0, 1)
    for t in range(6):
        assert torch.equal(r.trajectory[:, t][still], start[still])
    assert ((r.positions - start).abs().amax(-1)[~still] > 0).all()


def test_spot_on_split_equals_spot_on(vit_factory, split_factory):
    from spotlib.oracle import spot_on_split

    spot = SPoTViT(vit_factory(img_size=8, patch_size=4, num_classes=2)).eval()
    split = split_factory(n=7, size=(8, 8))
    init = torch.rand(7, 2, 2, generator=torch.Generator().manual_seed(0))
    whole = spot_on(spot, split.normalise(split.images), split.labels, init, steps=4, lr=LR)
    batched = spot_on_split(spot, split, init, steps=4, lr=LR, batch_size=3, desc=None)
    assert batched.positions.shape == (7, 2, 2) and batched.trajectory.shape == (7, 5, 2, 2)
    torch.testing.assert_close(batched.positions, whole.positions, rtol=0, atol=1e-5)
    assert torch.equal(batched.correct_after, whole.correct_after)
    with pytest.raises(ValueError, match="init_positions hold 6 images, the split 7"):
        spot_on_split(spot, split, init[:6], steps=1, desc=None)


def test_correct_holds_every_step(oracle_run):
    """correct[:, t] is top-1 at trajectory[:, t]: the saturation curve reads it without re-evaluating."""
    spot, images, labels, _, r = oracle_run
    assert r.correct.shape == (images.shape[0], STEPS + 1) and r.correct.dtype == torch.bool
    for t in (0, 1, STEPS // 2):
        with torch.no_grad():
            hit = spot(images, r.trajectory[:, t]).argmax(-1) == labels
        assert torch.equal(r.correct[:, t], hit)
    assert torch.equal(r.correct[:, 0], r.correct_before) and torch.equal(r.correct[:, -1], r.correct_after)


# -- the grid-constrained oracle (misalignment control) ---------------------------------
def cell_losses(spot, images, labels, cells):
    """Cross-entropy per image with tokens at ``cells`` (B, n, 2)."""
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(spot(images, cells), labels, reduction="none")


def test_grid_oracle_picks_distinct_cells_greedily(trained_blob_model):
    from spotlib.oracle import grid_oracle

    spot, images, labels = trained_blob_model
    images, labels = images[:6], labels[:6]
    centres = spot.grid_positions(1)[0]  # (G, 2), G = 16
    G = len(centres)
    cells = grid_oracle(spot, images, labels, 3)
    assert cells.shape == (6, 3, 2)
    index = torch.cdist(cells.reshape(-1, 2), centres).argmin(-1).view(6, 3)
    assert torch.allclose(centres[index], cells)  # on cell centres ...
    assert all(len(set(row.tolist())) == 3 for row in index)  # ... each cell at most once
    # step 1 is the best single cell (brute force), step 2 the best partner of it
    singles = torch.stack([cell_losses(spot, images, labels, centres[[g]].expand(6, 1, 2)) for g in range(G)], 1)
    assert torch.equal(index[:, 0], singles.argmin(1))
    pairs = torch.stack([cell_losses(spot, images, labels, torch.stack([centres[index[:, 0]], centres[g].expand(6, 2)], 1))
                         for g in range(G)], 1)
    pairs[torch.arange(6), index[:, 0]] = float("inf")
    assert torch.equal(index[:, 1], pairs.argmin(1))
    # chunking is an implementation detail; N = G is the whole grid; N beyond G is an error
    assert torch.equal(grid_oracle(spot, images, labels, 3, chunk=5), cells)
    full = grid_oracle(spot, images, labels, G)
    assert {tuple(p) for p in full[0].tolist()} == {tuple(p) for p in centres.tolist()}
    with pytest.raises(ValueError, match="num_tokens"):
        grid_oracle(spot, images, labels, G + 1)


def test_grid_oracle_beats_random_cells_on_its_objective(trained_blob_model):
    from spotlib.oracle import grid_oracle
    from spotlib.priors import sample_positions

    spot, images, labels = trained_blob_model
    searched = cell_losses(spot, images, labels, grid_oracle(spot, images, labels, 2))
    random = cell_losses(spot, images, labels, sample_positions("grid", len(labels), 2, seed=0, grid_size=spot.grid_size))
    assert (searched <= random + 1e-5).float().mean() >= 0.9 and searched.mean() < random.mean()
