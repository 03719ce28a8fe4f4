"""Subpixel tokenizer: k x k windows sampled bilinearly at continuous positions.

Coordinate convention (used throughout spotlib)
------------------------------------------------
Positions are float tensors of shape (B, N, 2) holding token *centres* in
normalised image coordinates, order (y, x), each in [0, 1]. Pixel i covers the
interval [i, i + 1) of the continuous axis, so a position p maps to the pixel
coordinate p * H (resp. p * W), and the standard patch grid of window k has its
centres at (i + 0.5) * k / H. At those centres every sample point falls on a
pixel centre, so the tokenizer returns the standard patches exactly.

A window whose centre lies within k / 2 of the border overhangs the image. What
it sees there is chosen by ``padding``: ``"zeros"`` (default; like the zero
padding of a convolution, i.e. value 0 in the model's normalised input space),
``"border"`` (edge pixels replicated) or ``"reflection"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .utils import check_int

PADDING_MODES = ("zeros", "border", "reflection")


def check_positions(positions: torch.Tensor, batch_size: int | None = None, name: str = "positions") -> None:
    """Raise a clear error unless ``positions`` is a finite float (B, N, 2) tensor with N >= 1
    (and B = ``batch_size`` if given); ``name`` is the argument the messages name."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, 2), got {type(positions).__name__}")
    if positions.ndim != 3 or positions.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (B, N, 2) with (y, x) in [0, 1], got {tuple(positions.shape)}")
    if not positions.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {positions.dtype}")
    if positions.shape[1] == 0:
        raise ValueError(f"{name} hold N = 0 tokens; at least one token per image is required")
    if batch_size is not None and positions.shape[0] != batch_size:
        raise ValueError(f"{name} are for {positions.shape[0]} images but the batch holds {batch_size}")
    if not torch.isfinite(positions).all():
        raise ValueError(f"{name} contain NaN or infinite values; token positions must be finite, (y, x) in [0, 1]")


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is a float (B, C, H, W) tensor with H, W >= 1."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalise uint8 first), got dtype {images.dtype}")
    if images.shape[-2] < 1 or images.shape[-1] < 1:
        raise ValueError(f"images must be at least 1 x 1 pixels, got shape {tuple(images.shape)}")


def check_size(size: Any, name: str) -> tuple[int, int]:
    """``size`` (an image size or a patch grid) as a pair of Python ints (height, width), each >= 1.

    NumPy and torch integers are accepted (as by :func:`spotlib.utils.check_int`); a zero
    side would divide by zero downstream (aspect ratios, cell sizes), so it is refused here.
    """
    message = f"{name} must be a pair (height, width) of integers >= 1, got {size!r}"
    try:
        pair = tuple(size)
    except TypeError:
        raise TypeError(message) from None
    if len(pair) != 2:
        raise ValueError(message)
    try:
        return check_int(pair[0], name, 1), check_int(pair[1], name, 1)
    except (TypeError, ValueError) as err:
        raise type(err)(message) from None


def sample_windows(
    images: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    padding: str = "zeros",
) -> torch.Tensor:
    """Extract N windows of size ``window`` x ``window`` per image by bilinear sampling.

    Args:
        images: (B, C, H, W) float tensor.
        positions: (B, N, 2) window centres, (y, x) normalised to [0, 1]
            (values outside are allowed; the window then reads padding).
        window: window side k in pixels.
        padding: what an overhanging window reads, one of ``PADDING_MODES``.

    Returns:
        (B, N, C * k * k) tensor, each window flattened in (C, k, k) order,
        which is the order of a timm ``PatchEmbed`` convolution weight
        flattened to (D, C * k * k). Differentiable with respect to both
        ``images`` and ``positions`` (bilinear: not at pixel-boundary kinks).
    """
    check_images(images)
    check_positions(positions, images.shape[0])
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown padding {padding!r}; valid choices: {', '.join(PADDING_MODES)}")
    window = check_int(window, "window", 1)
    B, C, H, W = images.shape
    N, k = positions.shape[1], window
    positions = positions.to(images.dtype)

    # Offsets of the k sample points from the window centre, in pixels: the
    # samples sit at pixel centres of the window, -k/2 + 0.5, ..., k/2 - 0.5.
    offsets = torch.arange(k, device=images.device, dtype=images.dtype) - (k - 1) / 2
    size = torch.tensor([H, W], device=images.device, dtype=images.dtype)
    centres = positions * size  # (B, N, 2), pixel units
    ys = centres[..., 0, None] + offsets  # (B, N, k)
    xs = centres[..., 1, None] + offsets
    # grid_sample with align_corners=False maps -1 / +1 to the outer pixel
    # edges, i.e. continuous coordinate u in [0, H] -> 2u / H - 1.
    gy = (2 * ys / H - 1)[..., :, None].expand(B, N, k, k)
    gx = (2 * xs / W - 1)[..., None, :].expand(B, N, k, k)
    grid = torch.stack([gx, gy], dim=-1).reshape(B, N * k, k, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    # (B, C, N*k, k) -> (B, N, C, k, k) -> (B, N, C*k*k)
    return out.view(B, C, N, k, k).permute(0, 2, 1, 3, 4).reshape(B, N, C * k * k)


def grid_positions(grid_size: tuple[int, int], batch_size: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of the standard (gh, gw) patch grid in raster order, shape (batch_size, gh * gw, 2).

    Raster order (row-major, y then x) is the order of timm's flattened patch
    tokens, so these positions reproduce ``timm_model(images)`` exactly.
    """
    gh, gw = check_size(grid_size, "grid_size")
    batch_size = check_int(batch_size, "batch_size", 0)  # 0: an empty batch; negative would broadcast silently
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pos = torch.stack([yy, xx], dim=-1).reshape(1, gh * gw, 2)
    return pos.expand(batch_size, -1, -1).clone()


def snap_to_grid(positions: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Move each position to the centre of the grid cell containing it: (..., 2) -> (..., 2).

    The grid-quantised counterpart of a subpixel placement (the paper's
    misalignment argument): same budget, but every window is a grid patch.
    """
    grid_size = check_size(grid_size, "grid_size")
    size = torch.tensor(grid_size, dtype=positions.dtype, device=positions.device)
    cell = (positions * size).floor().clamp(min=torch.zeros_like(size), max=size - 1)
    return (cell + 0.5) / size


def sample_points(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear value of per-pixel maps (B, H, W) at positions (B, N, 2): (B, N).

    Same convention as the windows (pixel i covers [i, i + 1)); beyond the
    outermost pixel centres the edge value is held. Used e.g. to read the
    saliency under each token centre.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, H, W), got {tuple(maps.shape)}")
    check_positions(positions, maps.shape[0])
    grid = (positions.to(maps.dtype).flip(-1) * 2 - 1)[:, :, None, :]  # (B, N, 1, 2) as (x, y)
    out = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0, :, 0]
