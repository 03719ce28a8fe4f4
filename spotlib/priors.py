"""Spatial priors: where to put N tokens in an image.

Every prior returns a float tensor (B, N, 2) of token centres, (y, x)
normalised to [0, 1] (see :mod:`spotlib.tokenizer`), exactly N per image for
any N >= 1. Random priors draw from a ``torch.Generator`` (or an int seed), so
the same seed gives the same positions.

=========  ==============================================================
uniform    i.i.d. U[0, 1]^2.
gaussian   N(0.5, (1/pi)^2) per coordinate, clamped to [0, 1].
sobol      scrambled 2-D Sobol points, a fresh scramble per image.
isotropic  an even lattice, deterministic. Rows r = round(sqrt(N * H / W))
           (cells as square as the image allows); the N points are split
           over the rows as evenly as possible (row j gets
           floor((j+1)N/r) - floor(jN/r) points) and every row is spaced
           evenly, centres at (i + 0.5) / n. For N = gh * gw on an image of
           aspect gh : gw this is the standard patch grid; for N = r^2 on a
           square image the centred r x r lattice.
center     the isotropic lattice warped towards c = 0.5:
           c + d * (1 - exp(-(d / s)^2)), d = p - c, s = 0.2 per coordinate.
salient    pixels drawn without replacement from a per-image saliency map
           (density proportional to the map), jittered uniformly within the
           pixel. Needs ``saliency`` (B, H, W).
grid       a random subset of the standard patch grid centres, without
           replacement ("Patch Grid" baseline, PatchDropout semantics).
           Needs ``grid_size`` and N <= gh * gw.
=========  ==============================================================

Variants (controls and other conventions):

================  ==============================================================
isotropic_grid    the isotropic lattice moved onto grid cells: each point to the
center_grid       centre of the nearest free cell (distinct cells), so the same
                  structured layout with grid patches only. Needs ``grid_size``.
salient_spread    salient without overlap: pixels drawn one at a time from the
                  map, each draw suppressing the map within one window (Chebyshev
                  distance < k = H / gh pixels) of it, so windows do not overlap
                  while free salient pixels remain (then the free pixels, then
                  the whole map). Needs ``saliency`` and ``grid_size``.
isotropic_authors the lattice of the authors' public code (their ``grid_uniform``):
center_authors    s = sqrt(H W / N) px, centres at trunc(s / 2) + i round(s) px,
                  divided by H (W); ``center_authors`` warps it as ``center``.
                  In *their* pixel-index convention (no half-pixel offset), for
                  their published checkpoints; N must give a full lattice (e.g.
                  25, 49, 100, 196 at 224 px).
================  ==============================================================
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .tokenizer import check_size, grid_positions
from .utils import check_int

PriorFn = Callable[..., torch.Tensor]
PRIORS: dict[str, PriorFn] = {}

# Priors that read the image (through a saliency model): the paper marks their
# rows with the oracle flag.
USES_EXTERNAL_MODEL = frozenset({"salient", "salient_spread"})


def register_prior(name: str) -> Callable[[PriorFn], PriorFn]:
    """Decorator adding ``fn(batch_size, num_tokens, generator, **context)`` to the registry."""

    def add(fn: PriorFn) -> PriorFn:
        PRIORS[name] = fn
        return fn

    return add


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from an int seed (or the generator itself; None = seed 0)."""
    if isinstance(seed, torch.Generator):
        return seed
    # check_int, not int(): int() would silently truncate a float seed such as 1.5
    return torch.Generator().manual_seed(0 if seed is None else check_int(seed, "seed"))


def sample_positions(
    prior: str,
    batch_size: int,
    num_tokens: int,
    *,
    seed: int | torch.Generator | None = None,
    image_size: tuple[int, int] = (1, 1),
    grid_size: tuple[int, int] | None = None,
    saliency: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw token positions from a named prior.

    Args:
        prior: one of ``PRIORS`` (uniform, gaussian, sobol, isotropic, center, salient, grid).
        batch_size: B, number of images.
        num_tokens: N >= 1 tokens per image.
        seed: int seed or ``torch.Generator`` for the random priors.
        image_size: (H, W), positive ints; only the aspect ratio matters (isotropic, center).
        grid_size: (gh, gw) of the patch grid, positive ints; required by ``grid``.
        saliency: (B, H, W) non-negative maps; required by ``salient``.
        device: where the result goes (drawn on the CPU for reproducibility).

    Returns:
        (B, N, 2) float32 positions, (y, x) in [0, 1].
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; valid choices: {', '.join(sorted(PRIORS))}")
    num_tokens = check_int(num_tokens, "num_tokens", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    image_size = check_size(image_size, "image_size")
    if grid_size is not None:
        grid_size = check_size(grid_size, "grid_size")
    out = PRIORS[prior](
        batch_size, num_tokens, make_generator(seed), image_size=image_size, grid_size=grid_size, saliency=saliency
    )
    return out.to(device=device, dtype=torch.float32)


@register_prior("uniform")
def uniform(batch_size: int, num_tokens: int, generator: torch.Generator, **_) -> torch.Tensor:
    return torch.rand(batch_size, num_tokens, 2, generator=generator)


@register_prior("gaussian")
def gaussian(batch_size: int, num_tokens: int, generator: torch.Generator, **_) -> torch.Tensor:
    return (torch.randn(batch_size, num_tokens, 2, generator=generator) / math.pi + 0.5).clamp(0, 1)


@register_prior("sobol")
def sobol(batch_size: int, num_tokens: int, generator: torch.Generator, **_) -> torch.Tensor:
    seeds = torch.randint(0, 2**31 - 1, (batch_size,), generator=generator).tolist()
    return torch.stack(
        [torch.quasirandom.SobolEngine(2, scramble=True, seed=s).draw(num_tokens) for s in seeds]
    ).float()


def isotropic_lattice(num_tokens: int, image_size: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """The deterministic even lattice of the ``isotropic`` prior, (N, 2)."""
    num_tokens = check_int(num_tokens, "num_tokens", 1)
    H, W = check_size(image_size, "image_size")
    rows = min(num_tokens, max(1, round(math.sqrt(num_tokens * H / W))))
    bounds = [(j * num_tokens) // rows for j in range(rows + 1)]
    points = []
    for j in range(rows):
        n = bounds[j + 1] - bounds[j]
        y = (j + 0.5) / rows
        points += [(y, (i + 0.5) / n) for i in range(n)]
    return torch.tensor(points, dtype=torch.float32)


@register_prior("isotropic")
def isotropic(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1), **_) -> torch.Tensor:
    return isotropic_lattice(num_tokens, image_size).expand(batch_size, -1, -1).clone()


def warp_to_center(positions: torch.Tensor, scale: float = 0.2) -> torch.Tensor:
    """c + d * (1 - exp(-(d / scale)^2)) with d = p - 0.5: pulls points near the centre inwards."""
    d = positions - 0.5
    return 0.5 + d * (1 - torch.exp(-((d / scale) ** 2)))


@register_prior("center")
def center(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1), **_) -> torch.Tensor:
    return warp_to_center(isotropic_lattice(num_tokens, image_size)).expand(batch_size, -1, -1).clone()


@register_prior("salient")
def salient(
    batch_size: int, num_tokens: int, generator: torch.Generator, *, saliency: torch.Tensor | None = None, **_
) -> torch.Tensor:
    if saliency is None:
        raise ValueError("the 'salient' prior needs saliency maps: pass saliency=(B, H, W) tensor")
    if saliency.ndim != 3 or saliency.shape[0] != batch_size:
        raise ValueError(f"saliency must have shape (B={batch_size}, H, W), got {tuple(saliency.shape)}")
    if not torch.isfinite(saliency).all() or (saliency < 0).any():
        raise ValueError("saliency maps must be finite and non-negative")
    B, H, W = saliency.shape
    if num_tokens > H * W:
        raise ValueError(f"cannot draw {num_tokens} distinct pixels from a {H}x{W} saliency map")
    density = saliency.detach().float().cpu().reshape(B, H * W)
    # A small floor keeps every pixel reachable, so N distinct pixels always exist.
    density = density + 1e-6 * density.mean(dim=1, keepdim=True).clamp_min(1e-12)
    index = torch.multinomial(density, num_tokens, replacement=False, generator=generator)
    pixel = torch.stack([index // W, index % W], dim=-1).float()
    jitter = torch.rand(B, num_tokens, 2, generator=generator)
    return (pixel + jitter) / torch.tensor([H, W], dtype=torch.float32)


@register_prior("grid")
def grid(
    batch_size: int, num_tokens: int, generator: torch.Generator, *, grid_size: tuple[int, int] | None = None, **_
) -> torch.Tensor:
    if grid_size is None:
        raise ValueError("the 'grid' prior needs grid_size=(gh, gw) of the model's patch grid")
    gh, gw = check_size(grid_size, "grid_size")
    if num_tokens > gh * gw:
        raise ValueError(f"the 'grid' prior keeps at most gh * gw = {gh * gw} patches, asked for {num_tokens}")
    centres = grid_positions((gh, gw))[0]  # (G, 2)
    keep = torch.rand(batch_size, gh * gw, generator=generator).argsort(dim=1)[:, :num_tokens]
    return centres[keep]


# -- variants ------------------------------------------------------------------------------------
def _need_grid(prior: str, grid_size) -> tuple[int, int]:
    if grid_size is None:
        raise ValueError(f"the {prior!r} prior needs grid_size=(gh, gw) of the model's patch grid")
    return check_size(grid_size, "grid_size")


def onto_distinct_cells(points: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Move each of N points (N, 2) to the centre of a grid cell, distinct cells, nearest first:
    repeatedly the closest (point, free cell) pair is matched. (N, 2); N <= gh * gw."""
    gh, gw = check_size(grid_size, "grid_size")
    if len(points) > gh * gw:
        raise ValueError(f"cannot put {len(points)} points on distinct cells of a {gh}x{gw} grid")
    centres = grid_positions((gh, gw))[0]
    scale = torch.tensor([gh, gw], dtype=torch.float32)  # distances in cells
    dist = torch.cdist(points.float() * scale, centres * scale)
    out = torch.empty_like(points, dtype=torch.float32)
    for _ in range(len(points)):
        flat = int(dist.argmin())
        i, j = divmod(flat, dist.shape[1])
        out[i] = centres[j]
        dist[i, :] = float("inf")
        dist[:, j] = float("inf")
    return out


@register_prior("isotropic_grid")
def isotropic_grid(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1),
                   grid_size=None, **_) -> torch.Tensor:
    cells = onto_distinct_cells(isotropic_lattice(num_tokens, image_size), _need_grid("isotropic_grid", grid_size))
    return cells.expand(batch_size, -1, -1).clone()


@register_prior("center_grid")
def center_grid(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1),
                grid_size=None, **_) -> torch.Tensor:
    lattice = warp_to_center(isotropic_lattice(num_tokens, image_size))
    return onto_distinct_cells(lattice, _need_grid("center_grid", grid_size)).expand(batch_size, -1, -1).clone()


@register_prior("salient_spread")
def salient_spread(batch_size: int, num_tokens: int, generator: torch.Generator, *, saliency=None, grid_size=None,
                   **_) -> torch.Tensor:
    gh, gw = _need_grid("salient_spread", grid_size)
    salient(batch_size, 1, torch.Generator(), saliency=saliency)  # the same checks of the maps
    B, H, W = saliency.shape
    if num_tokens > H * W:
        raise ValueError(f"cannot draw {num_tokens} distinct pixels from a {H}x{W} saliency map")
    density = saliency.detach().float().cpu().reshape(B, H * W)
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    reach = (H / gh, W / gw)  # one window, in pixels
    free = torch.ones(B, H * W, dtype=torch.bool)
    taken = torch.zeros(B, H * W, dtype=torch.bool)
    picks = []
    for _ in range(num_tokens):
        # the map on free pixels; else any free pixel; else any pixel not taken yet (the plain salient draw)
        weights = density * free
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (free & ~taken).float())
        fallback = density * ~taken + 1e-6 * density.mean(1, keepdim=True).clamp_min(1e-12) * ~taken
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, fallback)
        index = torch.multinomial(weights, 1, generator=generator)[:, 0]
        picks.append(index)
        taken[torch.arange(B), index] = True
        near = ((rows[None] - rows[index][:, None]).abs() < reach[0]) & ((cols[None] - cols[index][:, None]).abs() < reach[1])
        free &= ~near
    index = torch.stack(picks, dim=1)
    pixel = torch.stack([index // W, index % W], dim=-1).float()
    jitter = torch.rand(B, num_tokens, 2, generator=generator)
    return (pixel + jitter) / torch.tensor([H, W], dtype=torch.float32)


def authors_lattice(num_tokens: int, image_size: tuple[int, int]) -> torch.Tensor:
    """The lattice of the authors' ``grid_uniform`` prior, (N, 2), in their pixel-index convention."""
    num_tokens = check_int(num_tokens, "num_tokens", 1)
    H, W = check_size(image_size, "image_size")
    s = math.sqrt(H * W / num_tokens)
    start, step = math.trunc(s / 2), round(s)
    ys, xs = torch.arange(start, H, step), torch.arange(start, W, step)
    if len(ys) * len(xs) != num_tokens:
        raise ValueError(f"the authors' lattice has {len(ys)}x{len(xs)} points for N = {num_tokens} at {H}x{W} px, "
                         f"not N; use a budget it fills (a square number such as 25, 49, 100, 196 at 224 px) or "
                         f"the 'isotropic' prior")
    yy, xx = torch.meshgrid(ys / H, xs / W, indexing="ij")
    return torch.stack([yy, xx], dim=-1).reshape(-1, 2).float()


@register_prior("isotropic_authors")
def isotropic_authors(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1),
                      **_) -> torch.Tensor:
    return authors_lattice(num_tokens, image_size).expand(batch_size, -1, -1).clone()


@register_prior("center_authors")
def center_authors(batch_size: int, num_tokens: int, generator: torch.Generator, *, image_size=(1, 1),
                   **_) -> torch.Tensor:
    return warp_to_center(authors_lattice(num_tokens, image_size)).expand(batch_size, -1, -1).clone()
