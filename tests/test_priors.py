"""spotlib.priors: where to put N tokens."""

from __future__ import annotations

import pytest
import torch

from spotlib.priors import PRIORS, USES_EXTERNAL_MODEL, isotropic_lattice, sample_positions, warp_to_center
from spotlib.tokenizer import grid_positions

RANDOM_PRIORS = ("uniform", "gaussian", "sobol", "salient", "grid")
DETERMINISTIC_PRIORS = ("isotropic", "center")
GRID = (7, 7)
B = 3


def draw(prior, num_tokens, seed=0, batch_size=B, **kw):
    context = {}
    if prior == "salient":
        context["saliency"] = torch.rand(batch_size, 12, 12, generator=torch.Generator().manual_seed(99))
    if prior == "grid":
        context["grid_size"] = GRID
    context.update(kw)
    return sample_positions(prior, batch_size, num_tokens, seed=seed, **context)


def test_registry_holds_the_paper_priors():
    assert set(PRIORS) >= {"uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid"}
    assert set(RANDOM_PRIORS) | set(DETERMINISTIC_PRIORS) == set(PRIORS)


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 7, 10, 25, 49])
def test_exact_count_range_dtype(prior, num_tokens):
    pos = draw(prior, num_tokens)
    assert pos.shape == (B, num_tokens, 2)
    assert pos.dtype == torch.float32
    assert torch.isfinite(pos).all()
    assert pos.min() >= 0 and pos.max() <= 1


@pytest.mark.parametrize("prior", sorted(PRIORS))
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


@pytest.mark.parametrize("prior", ("uniform", "gaussian", "sobol", "salient", "grid"))
def test_random_priors_differ_between_images(prior):
    pos = draw(prior, 10)
    assert not torch.equal(pos[0], pos[1])


@pytest.mark.parametrize("prior", DETERMINISTIC_PRIORS)
def test_deterministic_priors_ignore_seed_and_repeat_per_image(prior):
    a, b = draw(prior, 10, seed=1), draw(prior, 10, seed=2)
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
    assert "salient" in USES_EXTERNAL_MODEL
    assert not ({"uniform", "gaussian", "sobol", "isotropic", "center", "grid"} & USES_EXTERNAL_MODEL)


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
