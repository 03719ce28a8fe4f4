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
USES_EXTERNAL_MODEL = frozenset({"salient"})


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
