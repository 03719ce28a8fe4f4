"""spotlib.priors: where to put N tokens."""

from __future__ import annotations

import pytest
import torch

from spotlib.priors import (PRIORS, USES_EXTERNAL_MODEL, authors_lattice, isotropic_lattice, onto_distinct_cells,
                            sample_positions, warp_to_center)
from spotlib.tokenizer import grid_positions

RANDOM_PRIORS = ("uniform", "gaussian", "sobol", "salient", "salient_spread", "grid")
DETERMINISTIC_PRIORS = ("isotropic", "center", "isotropic_grid", "center_grid", "isotropic_authors", "center_authors")
AUTHORS_PRIORS = ("isotropic_authors", "center_authors")  # a pixel lattice: only budgets that fill it
GENERAL_PRIORS = sorted(set(PRIORS) - set(AUTHORS_PRIORS))
NEEDS_GRID = ("grid", "isotropic_grid", "center_grid", "salient_spread")
GRID = (7, 7)
B = 3


def draw(prior, num_tokens, seed=0, batch_size=B, **kw):
    context = {}
    if prior in USES_EXTERNAL_MODEL:
        context["saliency"] = torch.rand(batch_size, 12, 12, generator=torch.Generator().manual_seed(99))
    if prior in NEEDS_GRID:
        context["grid_size"] = GRID
    if prior in AUTHORS_PRIORS:
        context["image_size"] = (28, 28)
    context.update(kw)
    return sample_positions(prior, batch_size, num_tokens, seed=seed, **context)


def test_registry_holds_the_paper_priors():
    assert set(PRIORS) >= {"uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid"}
    assert set(RANDOM_PRIORS) | set(DETERMINISTIC_PRIORS) == set(PRIORS)


@pytest.mark.parametrize("prior", GENERAL_PRIORS)
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 7, 10, 25, 49])
def test_exact_count_range_dtype(prior, num_tokens):
    pos = draw(prior, num_tokens)
    assert pos.shape == (B, num_tokens, 2)
    assert pos.dtype == torch.float32
    assert torch.isfinite(pos).all()
    assert pos.min() >= 0 and pos.max() <= 1


@pytest.mark.parametrize("prior", GENERAL_PRIORS)
def test_non_square_image(prior):
    pos = draw(prior, 6, image_size=(24, 40))
    assert pos.shape == (B, 6, 2) and pos.min() >= 0 and pos.max() <= 1


@pytest.mark.parametrize("prior", RANDOM_PRIORS)
def test_random_priors_are_seeded(prior):
    a, b = draw(prior, 10, seed=1), draw(prior, 10, seed=1)
    c = draw(prior, 10, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a Generator works as well as an int seed, and advances
    g = torch.Generator().manual_seed(1)
    assert torch.equal(draw(prior, 10, seed=g), a)
    assert not torch.equal(draw(prior, 10, seed=g), a)


@pytest.mark.parametrize("prior", RANDOM_PRIORS)
def test_random_priors_differ_between_images(prior):
    pos = draw(prior, 10)
    assert not torch.equal(pos[0], pos[1])


@pytest.mark.parametrize("prior", DETERMINISTIC_PRIORS)
def test_deterministic_priors_ignore_seed_and_repeat_per_image(prior):
    n = 16 if prior in AUTHORS_PRIORS else 10  # 4 x 4 fills the authors' lattice at 28 px
    a, b = draw(prior, n, seed=1), draw(prior, n, seed=2)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])


@pytest.mark.parametrize("image_size,grid", [((28, 28), (7, 7)), ((24, 40), (3, 5)), ((40, 24), (5, 3)), ((16, 32), (2, 4))])
def test_isotropic_equals_patch_grid_at_full_budget(image_size, grid):
    pos = sample_positions("isotropic", 2, grid[0] * grid[1], image_size=image_size)
    torch.testing.assert_close(pos, grid_positions(grid, 2), rtol=0, atol=1e-6)


def test_isotropic_square_numbers_give_centred_lattice():
    for r in (1, 2, 3, 5):
        pos = isotropic_lattice(r * r)
        torch.testing.assert_close(pos, grid_positions((r, r))[0], rtol=0, atol=1e-6)
    assert isotropic_lattice(1).tolist() == [[0.5, 0.5]]


def test_isotropic_non_square_count_is_spread_over_rows():
    pos = isotropic_lattice(5)  # rows = round(sqrt 5) = 2 -> 2 + 3 points
    ys = sorted(set(pos[:, 0].tolist()))
    assert ys == pytest.approx([0.25, 0.75])
    assert sorted(pos[pos[:, 0] == 0.25][:, 1].tolist()) == pytest.approx([0.25, 0.75])
    assert sorted(pos[pos[:, 0] == 0.75][:, 1].tolist()) == pytest.approx([1 / 6, 0.5, 5 / 6])
    assert len({tuple(p) for p in pos.tolist()}) == 5


def mean_distance_to_centre(pos):
    return (pos - 0.5).norm(dim=-1).mean().item()


@pytest.mark.parametrize("num_tokens", [16, 25, 49])
def test_centre_bias(num_tokens):
    """gaussian and center sit closer to (0.5, 0.5) on average than uniform and isotropic.

    N(0.5, (1/pi)^2) is only mildly centred (mean distance ~0.370 against ~0.382
    for uniform and 0.374-0.379 for the lattice), so the random priors are
    averaged over many images (standard error < 0.001).
    """
    uniform = mean_distance_to_centre(sample_positions("uniform", 2048, num_tokens, seed=0))
    isotropic = mean_distance_to_centre(sample_positions("isotropic", 1, num_tokens))
    gaussian = mean_distance_to_centre(sample_positions("gaussian", 2048, num_tokens, seed=0))
    center = mean_distance_to_centre(sample_positions("center", 1, num_tokens))
    assert uniform == pytest.approx(0.3826, abs=0.004)  # E|U - c| for U uniform on the square
    for biased in (gaussian, center):
        assert biased < uniform - 0.003
        assert biased < isotropic - 0.003
    assert center < 0.95 * isotropic  # the warp pulls the lattice visibly inwards


def test_gaussian_statistics():
    pos = sample_positions("gaussian", 200, 50, seed=0)
    inside = pos[(pos > 0) & (pos < 1)]
    assert pos.mean().item() == pytest.approx(0.5, abs=0.01)
    # std of N(0.5, 1/pi^2) clamped to [0, 1] (~11% clamped) is a bit below 1/pi
    assert 0.27 < pos.std().item() < 1 / torch.pi + 0.01
    assert inside.numel() < pos.numel()  # clamping happened: values sit at exactly 0 or 1


def test_warp_to_center_formula():
    p = torch.tensor([[0.0, 0.5], [0.3, 0.9]])
    d = p - 0.5
    expected = 0.5 + d * (1 - torch.exp(-((d / 0.2) ** 2)))
    torch.testing.assert_close(warp_to_center(p), expected)
    assert warp_to_center(torch.tensor([0.5])).item() == 0.5
    # monotone and inward
    x = torch.linspace(0, 1, 101)
    w = warp_to_center(x)
    assert torch.all(w[1:] >= w[:-1]) and torch.all((w - 0.5).abs() <= (x - 0.5).abs() + 1e-7)
    torch.testing.assert_close(sample_positions("center", 1, 9)[0], warp_to_center(isotropic_lattice(9)))


def test_sobol_fresh_scramble_per_image_and_low_discrepancy():
    pos = sample_positions("sobol", 4, 64, seed=0)
    assert not torch.equal(pos[0], pos[1])
    # 64 scrambled Sobol points fill each of the 8 x 8 cells exactly once
    cells = (pos[0] * 8).floor().long()
    assert len({tuple(c) for c in cells.tolist()}) == 64


# -- grid prior -------------------------------------------------------------------
def test_grid_prior_uses_grid_centres_without_duplicates():
    gh, gw = 3, 5
    centres = {tuple(p) for p in grid_positions((gh, gw))[0].tolist()}
    for n in (1, 7, 15):
        pos = sample_positions("grid", 6, n, seed=n, grid_size=(gh, gw))
        for image in pos.tolist():
            points = [tuple(p) for p in image]
            assert set(points) <= centres
            assert len(set(points)) == n
    full = sample_positions("grid", 2, 15, seed=0, grid_size=(gh, gw))
    assert {tuple(p) for p in full[0].tolist()} == centres


def test_grid_prior_errors():
    with pytest.raises(ValueError, match=r"at most gh \* gw = 49.*50"):
        sample_positions("grid", 1, 50, grid_size=(7, 7))
    with pytest.raises(ValueError, match=r"grid_size"):
        sample_positions("grid", 1, 5)


# -- salient prior --------------------------------------------------------------
def test_salient_concentrates_on_the_map():
    H = W = 16
    saliency = torch.zeros(4, H, W)
    saliency[:, H // 2 :, : W // 2] = torch.rand(4, H // 2, W // 2, generator=torch.Generator().manual_seed(0)) + 0.1
    pos = sample_positions("salient", 4, 30, seed=0, saliency=saliency)
    in_quadrant = (pos[..., 0] >= 0.5) & (pos[..., 1] < 0.5)
    assert in_quadrant.all()


def test_salient_follows_the_density():
    """Pixel mass 9:1 between two halves -> the token share follows."""
    saliency = torch.ones(200, 10, 10)
    saliency[:, :, :5] = 9.0
    pos = sample_positions("salient", 200, 5, seed=0, saliency=saliency)
    share_left = (pos[..., 1] < 0.5).float().mean().item()
    assert 0.8 < share_left < 0.97


def test_salient_distinct_pixels_and_jitter_within_pixel():
    H, W = 6, 8
    saliency = torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))
    pos = sample_positions("salient", 3, H * W, seed=0, saliency=saliency)
    for image in pos:
        pixels = {(int(y * H), int(x * W)) for y, x in image.tolist()}
        assert len(pixels) == H * W  # without replacement: every pixel exactly once
    frac = torch.frac(pos * torch.tensor([H, W]))
    assert frac.std() > 0.1  # jittered within the pixel, not snapped to its corner or centre


def test_salient_errors():
    with pytest.raises(ValueError, match="saliency"):
        sample_positions("salient", 2, 3)
    with pytest.raises(ValueError, match=r"shape \(B=2, H, W\)"):
        sample_positions("salient", 2, 3, saliency=torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        sample_positions("salient", 1, 3, saliency=-torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="distinct pixels"):
        sample_positions("salient", 1, 17, saliency=torch.ones(1, 4, 4))


def test_salient_is_flagged_as_using_an_external_model():
    assert USES_EXTERNAL_MODEL == {"salient", "salient_spread"}


# -- structured layouts on grid cells (case study 1's control) -------------------------
@pytest.mark.parametrize("prior, lattice", [("isotropic_grid", lambda n: isotropic_lattice(n)),
                                            ("center_grid", lambda n: warp_to_center(isotropic_lattice(n)))])
@pytest.mark.parametrize("grid", [(7, 7), (3, 5)])
def test_lattice_on_grid_cells_is_distinct_cells_near_the_lattice(prior, lattice, grid):
    gh, gw = grid
    centres = {tuple(p) for p in grid_positions(grid)[0].tolist()}
    cell = torch.tensor([1 / gh, 1 / gw])
    for n in range(1, gh * gw + 1):
        pos = sample_positions(prior, 2, n, grid_size=grid)
        points = [tuple(p) for p in pos[0].tolist()]
        assert set(points) <= centres and len(set(points)) == n  # grid cells, each at most once
        assert torch.equal(pos[0], pos[1])
        if n in (1, 4, 9) and prior == "isotropic_grid" and grid == (7, 7):
            # r x r lattices whose points lie in distinct cells: each point goes to the cell that holds it
            holding = ((lattice(n) / cell).floor() + 0.5) * cell
            torch.testing.assert_close(pos[0], holding, rtol=0, atol=1e-6)
    full = sample_positions(prior, 1, gh * gw, grid_size=grid)[0]
    assert {tuple(p) for p in full.tolist()} == centres  # at N = G: the whole grid


def test_onto_distinct_cells_resolves_collisions_nearest_first():
    grid = (4, 4)
    points = torch.tensor([[0.30, 0.30], [0.32, 0.32], [0.90, 0.10]])  # the first two share cell (1, 1)
    cells = onto_distinct_cells(points, grid)
    assert cells[0].tolist() == [0.375, 0.375] or cells[1].tolist() == [0.375, 0.375]
    assert len({tuple(c) for c in cells.tolist()}) == 3
    assert cells[2].tolist() == [0.875, 0.125]
    with pytest.raises(ValueError, match="distinct cells of a 4x4 grid"):
        onto_distinct_cells(torch.rand(17, 2), grid)


def test_structured_grid_priors_need_the_grid():
    for prior in ("isotropic_grid", "center_grid", "salient_spread"):
        with pytest.raises(ValueError, match=rf"{prior}.*needs grid_size"):
            sample_positions(prior, 1, 4, saliency=torch.ones(1, 8, 8))


# -- non-overlapping salient draws ---------------------------------------------------
def test_salient_spread_keeps_windows_apart_while_room_remains():
    H = W = 28
    grid = (7, 7)  # windows of 4 px: picks at least 4 px apart (Chebyshev) while free pixels remain
    saliency = torch.rand(5, H, W, generator=torch.Generator().manual_seed(0))
    pos = sample_positions("salient_spread", 5, 25, seed=0, saliency=saliency, grid_size=grid)
    pixels = (pos * torch.tensor([H, W])).floor()
    for image in pixels:
        gap = (image[:, None] - image[None]).abs().amax(-1) + torch.eye(len(image)) * 99
        assert gap.min() >= 4
    plain = sample_positions("salient", 5, 25, seed=0, saliency=saliency)
    gap = lambda p: ((p[:, :, None] - p[:, None]).abs().amax(-1) + torch.eye(25) * 99).amin((1, 2))
    assert (gap((plain * H).floor()) < 4).any()  # the i.i.d. draw bunches on the same maps


def test_salient_spread_stays_on_the_map_and_falls_back_when_full():
    H = W = 16
    saliency = torch.zeros(2, H, W)
    saliency[:, 8:, :8] = 1.0  # one quadrant: 8 x 8 px, room for 4 windows of 4 px (grid 4x4)
    few = sample_positions("salient_spread", 2, 4, seed=0, saliency=saliency, grid_size=(4, 4))
    assert ((few[..., 0] >= 0.5) & (few[..., 1] < 0.5)).all()
    many = sample_positions("salient_spread", 2, 20, seed=0, saliency=saliency, grid_size=(4, 4))
    pixels = [{tuple(p) for p in (img * H).floor().tolist()} for img in many]
    assert all(len(p) == 20 for p in pixels)  # still distinct pixels once the map is covered


# -- the authors' lattice (published checkpoints) -----------------------------------------
def test_authors_lattice_matches_their_pixel_arithmetic():
    """s = sqrt(H W / N); start trunc(s / 2) px, step round(s) px; positions = px / H (their convention)."""
    px = authors_lattice(100, (224, 224)) * 224
    assert sorted(set(px[:, 0].round().int().tolist())) == [11 + 22 * i for i in range(10)]  # not centred
    for n, r in ((49, 7), (196, 14)):  # here it is the centred lattice, as isotropic
        torch.testing.assert_close(authors_lattice(n, (224, 224)), isotropic_lattice(n), rtol=0, atol=1e-6)
    assert sorted(set((authors_lattice(25, (224, 224))[:, 1] * 224).round().int().tolist())) == [22, 67, 112, 157, 202]
    torch.testing.assert_close(sample_positions("center_authors", 1, 100, image_size=(224, 224))[0],
                               warp_to_center(authors_lattice(100, (224, 224))))
    with pytest.raises(ValueError, match="authors' lattice has .* not N"):
        sample_positions("isotropic_authors", 1, 10, image_size=(224, 224))


# -- generic errors ----------------------------------------------------------------
def test_unknown_prior_lists_choices():
    with pytest.raises(ValueError, match=r"unknown prior 'poisson'; valid choices: .*center.*gaussian.*uniform"):
        sample_positions("poisson", 1, 4)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_bad_token_count(bad, error):
    with pytest.raises(error, match=r"num_tokens must be an integer >= 1"):
        sample_positions("uniform", 1, bad)


def test_bad_batch_size():
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        sample_positions("uniform", 0, 4)
