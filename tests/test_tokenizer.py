"""spotlib.tokenizer: windows at continuous positions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed

from spotlib.tokenizer import PADDING_MODES, grid_positions, sample_windows

F32_EPS = torch.finfo(torch.float32).eps


def patchify(images: torch.Tensor, k: int) -> torch.Tensor:
    """Standard non-overlapping patches (B, gh * gw, C * k * k), raster order, each patch flattened (C, k, k)."""
    B, C, H, W = images.shape
    patches = images.unfold(2, k, k).unfold(3, k, k)  # (B, C, gh, gw, k, k)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // k) * (W // k), C * k * k)


def patchify_reshape(images: torch.Tensor, k: int) -> torch.Tensor:
    """The same patches by reshape/permute only (an independent second reference)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // k) * (W // k), C * k * k)


SHAPES = [
    pytest.param(1, 28, 28, 4, id="1ch-28px-k4"),
    pytest.param(3, 24, 24, 8, id="3ch-24px-k8"),
    pytest.param(3, 24, 40, 8, id="3ch-nonsquare-24x40-k8"),
    pytest.param(2, 15, 9, 3, id="2ch-nonsquare-15x9-k3-odd"),
]


# -- grid exactness --------------------------------------------------------
@pytest.mark.parametrize("C,H,W,k", SHAPES)
def test_grid_positions_reproduce_patches_float64(C, H, W, k):
    """Exact geometry: in float64 the grid windows are the standard patches to round-off."""
    images = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = grid_positions((H // k, W // k), batch_size=2, dtype=torch.float64)
    windows = sample_windows(images, pos, k)
    assert windows.shape == (2, (H // k) * (W // k), C * k * k)
    assert windows.dtype == torch.float64
    assert (windows - patchify(images, k)).abs().max().item() <= 1e-12
    assert (windows - patchify_reshape(images, k)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("C,H,W,k", SHAPES)
def test_grid_positions_reproduce_patches_float32(C, H, W, k):
    """float32: equal up to the round-off of float32 positions.

    A float32 position (i + 0.5) / gh is off by up to ~ulp/2, i.e. up to
    ~max(H, W) * eps / 2 pixels, which blends in that fraction of the
    neighbouring pixel. With images in [0, 1] the error is bounded by
    max(H, W) * eps (3.3e-6 at 28 px; measured up to 1.4e-6), far below the
    error of any geometric mistake (a sub-pixel shift or a transposition).
    """
    images = torch.rand(3, C, H, W, generator=torch.Generator().manual_seed(1))
    pos = grid_positions((H // k, W // k), batch_size=3)
    windows = sample_windows(images, pos, k)
    tol = max(H, W) * F32_EPS
    assert (windows - patchify(images, k)).abs().max().item() <= tol
    assert (windows - patchify_reshape(images, k)).abs().max().item() <= tol


def test_grid_positions_layout():
    pos = grid_positions((2, 3), batch_size=4)
    assert pos.shape == (4, 6, 2) and pos.dtype == torch.float32
    expected = torch.tensor([[1 / 4, 1 / 6], [1 / 4, 3 / 6], [1 / 4, 5 / 6],
                             [3 / 4, 1 / 6], [3 / 4, 3 / 6], [3 / 4, 5 / 6]])
    torch.testing.assert_close(pos, expected.expand(4, -1, -1), rtol=0, atol=1e-7)
    pos[0, 0, 0] = -1  # the batch copies are independent (clone, not a view)
    assert pos[1, 0, 0] == 0.25


@pytest.mark.parametrize("in_chans,img,k", [(1, (12, 12), 4), (3, (16, 24), 8)])
def test_flatten_order_matches_patch_embed_weight(in_chans, img, k):
    """linear(windows, conv.weight.flatten(1)) == timm PatchEmbed(images)."""
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=img, patch_size=k, in_chans=in_chans, embed_dim=10)
    images = torch.randn(2, in_chans, *img, dtype=torch.float64)
    embed = embed.double()
    pos = grid_positions(embed.grid_size, batch_size=2, dtype=torch.float64)
    windows = sample_windows(images, pos, k)
    ours = F.linear(windows, embed.proj.weight.flatten(1), embed.proj.bias)
    theirs = embed(images)  # (B, gh * gw, D)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# -- subpixel positions ----------------------------------------------------
def bilinear(image: torch.Tensor, u: float, v: float) -> float:
    """Hand-written bilinear read of a (H, W) image at continuous (u, v); pixel i covers [i, i + 1)."""
    y, x = u - 0.5, v - 0.5  # in pixel-centre index units
    y0, x0 = math.floor(y), math.floor(x)
    wy, wx = y - y0, x - x0
    val = 0.0
    for dy, fy in ((0, 1 - wy), (1, wy)):
        for dx, fx in ((0, 1 - wx), (1, wx)):
            val += fy * fx * image[y0 + dy, x0 + dx].item()
    return val


def test_non_integer_offset_matches_hand_bilinear():
    H, W, k = 10, 14, 4
    image = torch.rand(1, 2, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cy, cx = 5.3, 7.65  # window centre in pixel units
    pos = torch.tensor([[[cy / H, cx / W]]], dtype=torch.float64)
    win = sample_windows(image, pos, k).view(2, k, k)
    offsets = [j - (k - 1) / 2 for j in range(k)]  # sample points at pixel centres of the window
    for c in range(2):
        for a in (0, 2, 3):
            for b in (0, 1, 3):
                expected = bilinear(image[0, c], cy + offsets[a], cx + offsets[b])
                assert win[c, a, b].item() == pytest.approx(expected, abs=1e-12)
    # and it is a genuine interpolation, not a snap to the nearest patch
    nearest = image[0, 0, 4, 6].item()
    assert abs(win[0, 1, 1].item() - nearest) > 1e-4


def test_half_pixel_shift_is_average_of_neighbours():
    """A window shifted by half a pixel along x averages horizontally adjacent pixels."""
    H = W = 8
    k = 2
    image = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W) ** 1.5
    pos = torch.tensor([[[3.0 / H, 4.5 / W]]], dtype=torch.float64)  # centre (3, 4.5) px
    win = sample_windows(image, pos, k).view(k, k)
    # samples at y in {2.5, 3.5} -> rows 2, 3; x in {4.0, 5.0} -> mean of cols (3, 4) and (4, 5)
    img = image[0, 0]
    expected = torch.stack([
        torch.stack([(img[r, 3] + img[r, 4]) / 2, (img[r, 4] + img[r, 5]) / 2]) for r in (2, 3)
    ])
    torch.testing.assert_close(win, expected, rtol=0, atol=1e-9)


def test_batch_and_token_independence():
    """Each window depends only on its own image and position."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64)
    pos = torch.rand(3, 5, 2, generator=g, dtype=torch.float64)
    full = sample_windows(images, pos, 3)
    for b in range(3):
        for n in (0, 4):
            single = sample_windows(images[b : b + 1], pos[b : b + 1, n : n + 1], 3)
            torch.testing.assert_close(single[0, 0], full[b, n], rtol=0, atol=1e-12)


# -- gradients ---------------------------------------------------------------
def kink_free_positions(B, N, H, W, k, seed):
    """Positions whose sample points all sit >= 0.2 px away from pixel centres (bilinear kinks)."""
    g = torch.Generator().manual_seed(seed)
    cy = torch.randint(k, H - k, (B, N), generator=g).double()
    cx = torch.randint(k, W - k, (B, N), generator=g).double()
    # sample coordinate minus 0.5 is c + j - (k - 1) / 2 - 0.5 (+ integer); keep its fraction in [0.2, 0.8]
    shift = (k - 1) / 2 + 0.5
    fy = 0.2 + 0.6 * torch.rand(B, N, generator=g, dtype=torch.float64)
    fx = 0.2 + 0.6 * torch.rand(B, N, generator=g, dtype=torch.float64)
    cy = cy + (shift % 1) + fy
    cx = cx + (shift % 1) + fx
    return torch.stack([cy / H, cx / W], dim=-1)


@pytest.mark.parametrize("k", [3, 4])
def test_gradcheck_positions_and_images(k):
    H, W = 12, 10
    images = torch.rand(2, 2, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pos = kink_free_positions(2, 3, H, W, k, seed=k)
    images.requires_grad_(True)
    pos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: sample_windows(images.detach(), p, k), (pos,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda im: sample_windows(im, pos.detach(), k), (images,), eps=1e-6, atol=1e-6)
    # the position gradient is genuinely non-zero
    sample_windows(images.detach(), pos, k).sum().backward()
    assert pos.grad.abs().sum() > 0


def test_gradient_direction_on_a_ramp():
    """On an image that increases along x only, moving the window right raises every sample."""
    H, W, k = 8, 8, 2
    ramp = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W).clone()
    pos = torch.tensor([[[0.43, 0.41]]], dtype=torch.float64, requires_grad=True)
    sample_windows(ramp, pos, k).sum().backward()
    # d/dx of each sample = W (pixels per unit position) * slope 1; k*k samples
    assert pos.grad[0, 0, 1].item() == pytest.approx(k * k * W, rel=1e-9)
    assert pos.grad[0, 0, 0].item() == pytest.approx(0.0, abs=1e-9)


# -- padding ------------------------------------------------------------------
def corner_window(padding):
    H = W = 8
    k = 4
    image = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 1.0
    pos = torch.zeros(1, 1, 2, dtype=torch.float64)  # centre on the top-left corner: overhangs 2 px up and left
    return image[0, 0], sample_windows(image, pos, k, padding=padding).view(k, k)


def test_padding_zeros_reads_zeros_outside():
    img, win = corner_window("zeros")
    # sample rows/cols are at pixel indices -2, -1, 0, 1
    assert torch.all(win[:2, :] == 0) and torch.all(win[:, :2] == 0)
    torch.testing.assert_close(win[2:, 2:], img[:2, :2], rtol=0, atol=1e-12)


def test_padding_border_replicates_edges():
    img, win = corner_window("border")
    idx = torch.tensor([0, 0, 0, 1])  # -2, -1 clamp to 0
    torch.testing.assert_close(win, img[idx][:, idx], rtol=0, atol=1e-12)
    assert torch.all(win != 0)


def test_padding_reflection_mirrors_about_the_edge():
    img, win = corner_window("reflection")
    idx = torch.tensor([1, 0, 0, 1])  # -2 -> 1, -1 -> 0 (mirror about the outer pixel edge)
    torch.testing.assert_close(win, img[idx][:, idx], rtol=0, atol=1e-12)


def test_default_padding_is_zeros():
    image = torch.ones(1, 1, 8, 8)
    win = sample_windows(image, torch.tensor([[[1.0, 1.0]]]), 4)
    assert win.view(4, 4)[2:, 2:].eq(0).all() and win.view(4, 4)[:2, :2].eq(1).all()


# -- errors ----------------------------------------------------------------------
GOOD_IMAGES = torch.zeros(2, 1, 8, 8)
GOOD_POS = torch.full((2, 3, 2), 0.5)


@pytest.mark.parametrize(
    "images,positions,kwargs,exc,match",
    [
        (torch.zeros(1, 8, 8), GOOD_POS, {}, ValueError, r"images must have shape \(B, C, H, W\).*\(1, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), GOOD_POS, {}, TypeError, r"images must be a floating-point.*uint8"),
        (GOOD_IMAGES.numpy(), GOOD_POS, {}, TypeError, r"images must be a torch.Tensor"),
        (GOOD_IMAGES, torch.full((2, 3, 2), 1, dtype=torch.int64), {}, TypeError, r"positions must be a floating-point.*int64"),
        (GOOD_IMAGES, torch.zeros(2, 0, 2), {}, ValueError, r"N = 0"),
        (GOOD_IMAGES, torch.tensor([[[0.5, float("nan")]]]).expand(2, 1, 2), {}, ValueError, r"NaN"),
        (GOOD_IMAGES, torch.tensor([[[0.5, float("inf")]]]).expand(2, 1, 2), {}, ValueError, r"infinite"),
        (GOOD_IMAGES, torch.full((3, 3, 2), 0.5), {}, ValueError, r"positions are for 3 images but the batch holds 2"),
        (GOOD_IMAGES, torch.full((2, 3, 3), 0.5), {}, ValueError, r"positions must have shape \(B, N, 2\)"),
        (GOOD_IMAGES, torch.full((3, 2), 0.5), {}, ValueError, r"positions must have shape \(B, N, 2\)"),
        (GOOD_IMAGES, GOOD_POS, {"padding": "wrap"}, ValueError, r"unknown padding 'wrap'; valid choices: zeros, border, reflection"),
        (GOOD_IMAGES, GOOD_POS, {"window": 0}, ValueError, r"window must be an integer >= 1, got 0"),
        (GOOD_IMAGES, GOOD_POS, {"window": 2.5}, TypeError, r"window must be an integer >= 1, got float 2.5"),
    ],
)
def test_bad_input_raises_clear_errors(images, positions, kwargs, exc, match):
    kwargs = {"window": 4, **kwargs}
    with pytest.raises(exc, match=match):
        sample_windows(images, positions, **kwargs)


def test_padding_modes_constant():
    assert set(PADDING_MODES) == {"zeros", "border", "reflection"}


# -- helpers: snap_to_grid, sample_points ------------------------------------------------
def test_snap_to_grid():
    from spotlib.tokenizer import snap_to_grid

    grid = (3, 5)
    centres = grid_positions(grid, 2)
    torch.testing.assert_close(snap_to_grid(centres, grid), centres, rtol=0, atol=1e-7)
    pos = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.34, 0.41], [0.999, 0.2]]])
    expected = torch.tensor([[[1 / 6, 1 / 10], [5 / 6, 9 / 10], [3 / 6, 5 / 10], [5 / 6, 3 / 10]]])
    torch.testing.assert_close(snap_to_grid(pos, grid), expected, rtol=0, atol=1e-7)
    # every snapped point is the centre of the cell that contains the original point
    rand = torch.rand(4, 50, 2, generator=torch.Generator().manual_seed(0))
    snapped = snap_to_grid(rand, grid)
    size = torch.tensor(grid, dtype=torch.float32)
    assert torch.equal((snapped * size).floor(), (rand * size).floor())


def test_sample_points_matches_hand_bilinear():
    from spotlib.tokenizer import sample_points

    maps = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pts = torch.tensor([[[2.3 / 6, 4.6 / 9], [0.5 / 6, 0.5 / 9]], [[3.5 / 6, 7.5 / 9], [4.9 / 6, 1.2 / 9]]],
                       dtype=torch.float64)
    out = sample_points(maps, pts)
    assert out.shape == (2, 2)
    for b in range(2):
        for n in range(2):
            u, v = pts[b, n, 0].item() * 6, pts[b, n, 1].item() * 9
            assert out[b, n].item() == pytest.approx(bilinear(maps[b], u, v), abs=1e-12)
    # at a pixel centre: the pixel value; beyond the outer pixel centres: the edge value
    assert out[0, 1].item() == pytest.approx(maps[0, 0, 0].item(), abs=1e-12)
    corner = sample_points(maps, torch.zeros(2, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(corner[:, 0], maps[:, 0, 0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, W\)"):
        sample_points(maps[0], pts)
