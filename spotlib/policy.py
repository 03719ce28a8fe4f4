"""Learned token placement: where to put N tokens, learned on training images, label-free at test time.

Two placers, both ``nn.Module``s mapping images to positions::

    placer(images) -> positions        # (B, C, H, W) -> (B, N, 2), (y, x) in (0, 1)

``images`` are the SPoT model's inputs (normalised as it expects, see :func:`spotlib.data.for_model`);
positions follow :mod:`spotlib.tokenizer` (token centres, normalised, (y, x)). A placer never sees a
label: its forward takes images only, and it has no randomness, so in eval mode the same images give
the same positions.

* :class:`LearnedPrior` (image-independent): the N positions themselves are the parameters, stored as
  logits (``positions = sigmoid(logits)``, so they stay inside the image), initialised from a fixed
  prior (by default the isotropic lattice); every image gets the same N positions.
* :class:`PlacementPolicy` (image-dependent): a small CNN reads a cheap view of the image (average-pooled
  to ``view_size`` x ``view_size``) and predicts one offset per coordinate in logit space:
  ``positions = sigmoid(logit(init) + offsets(image))``. The last layer starts at zero, so an untrained
  policy places the tokens exactly at ``init``; its cost (a few hundred kFLOPs at ``view_size`` 14) is
  counted with the model's wherever FLOPs are reported.

Both are trained through the frozen SPoT model and the differentiable tokenizer
(:func:`spotlib.paper.placement.train_placer`): the gradient of a task or distillation loss reaches
the positions through the bilinear sampling and the interpolated positional embedding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Split, for_model
from .priors import sample_positions
from .tokenizer import check_images
from .utils import check_int

EDGE = 1e-3  # initial positions are clamped to [EDGE, 1 - EDGE] before the logit (finite logits)


def initial_positions(num_tokens: int, prior: str = "isotropic", image_size: Sequence[int] = (1, 1),
                      grid_size: Sequence[int] | None = None) -> torch.Tensor:
    """(N, 2) starting positions of a placer: a deterministic prior's positions for one image."""
    return sample_positions(prior, 1, num_tokens, seed=0, image_size=tuple(image_size),
                            grid_size=None if grid_size is None else tuple(grid_size))[0]


def _logits(positions: torch.Tensor) -> torch.Tensor:
    if positions.ndim != 2 or positions.shape[-1] != 2 or positions.shape[0] < 1:
        raise ValueError(f"init positions must have shape (N, 2) with N >= 1, got {tuple(positions.shape)}")
    if not torch.isfinite(positions).all():
        raise ValueError("init positions must be finite, (y, x) in [0, 1]")
    return torch.logit(positions.detach().float().clamp(EDGE, 1 - EDGE))


class LearnedPrior(nn.Module):
    """N image-independent positions as parameters.

    Args:
        init: (N, 2) starting positions, (y, x) in [0, 1] (e.g. :func:`initial_positions`).

    ``forward(images)`` -> (B, N, 2): the same positions for each of the B images.
    """

    kind = "learned prior"

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(_logits(init))

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    def positions(self) -> torch.Tensor:
        """(N, 2) the learned positions."""
        return torch.sigmoid(self.logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.positions().to(images.dtype).expand(images.shape[0], -1, -1)

    def arch(self) -> dict:
        """What :func:`build_placer` needs to rebuild this module (saved as metadata with the weights)."""
        return {"kind": self.kind, "num_tokens": self.num_tokens}


class PlacementPolicy(nn.Module):
    """An image-dependent placement: a small CNN on a downsampled copy of the image -> N positions.

    Args:
        init: (N, 2) positions the untrained policy returns (and around which it places tokens).
        in_chans: image channels.
        view_size: side of the cheap view the CNN reads (the image is average-pooled to it; any (H, W)).
        width: channels of the first convolution (the next two have ``2 * width``).
        hidden: width of the fully connected layer.
        seed: seeds the initial weights (the global RNG is left untouched).

    ``forward(images)`` -> (B, N, 2), (y, x) in (0, 1), deterministic (no dropout, no sampling).
    """

    kind = "learned policy"

    def __init__(self, init: torch.Tensor, in_chans: int, view_size: int = 14, width: int = 16, hidden: int = 128,
                 seed: int = 0):
        super().__init__()
        self.in_chans = check_int(in_chans, "in_chans", 1)
        self.view_size = check_int(view_size, "view_size", 4)
        self.width = check_int(width, "width", 1)
        self.hidden = check_int(hidden, "hidden", 1)
        self.base = nn.Parameter(_logits(init))
        w = width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_int(seed, "seed", 0))
            self._build(in_chans, w, hidden)

    def _build(self, in_chans: int, w: int, hidden: int) -> None:
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, hidden), nn.ReLU(),
        )
        self.offsets = nn.Linear(hidden, 2 * self.num_tokens)
        nn.init.zeros_(self.offsets.weight)  # start exactly at init
        nn.init.zeros_(self.offsets.bias)

    @property
    def num_tokens(self) -> int:
        return self.base.shape[0]

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """The cheap view the policy reads: (B, C, view_size, view_size)."""
        check_images(images)
        if images.shape[1] != self.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels, the policy was built for {self.in_chans}")
        return F.adaptive_avg_pool2d(images, self.view_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        offsets = self.offsets(self.features(self.view(images))).view(-1, self.num_tokens, 2)
        return torch.sigmoid(self.base + offsets)

    def arch(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "in_chans": self.in_chans,
                "view_size": self.view_size, "width": self.width, "hidden": self.hidden}


PLACERS = {LearnedPrior.kind: LearnedPrior, PlacementPolicy.kind: PlacementPolicy}


def build_placer(arch: dict) -> nn.Module:
    """A placer from its ``arch()`` (untrained; load its weights after), at its initial positions."""
    arch = dict(arch)
    kind = arch.pop("kind", None)
    if kind not in PLACERS:
        raise ValueError(f"unknown placer kind {kind!r}; valid choices: {', '.join(PLACERS)}")
    init = torch.full((check_int(arch.pop("num_tokens"), "num_tokens", 1), 2), 0.5)
    return PLACERS[kind](init, **arch)


@torch.no_grad()
def place(placer: nn.Module, split: Split, model, batch_size: int = 500, device=None) -> torch.Tensor:
    """Positions (n, N, 2) float32 on the CPU that ``placer`` chooses for every image of ``split``.

    Images are normalised as ``model`` (the SPoT view the placer serves) expects; only images are
    read, never ``split.labels``. The placer runs in eval mode (restored after).
    """
    split = for_model(split, model)
    device = device or next(placer.parameters()).device
    mode, out = placer.training, []
    placer.eval()
    try:
        for start in range(0, len(split), check_int(batch_size, "batch_size", 1)):
            images = split.normalise(split.images[start:start + batch_size].to(device))
            out.append(placer(images).float().cpu())
    finally:
        placer.train(mode)
    return torch.cat(out)
