"""SPoT-ON: per-image gradient search of token positions with the true label.

The model is frozen; only the positions move. Each image's loss is summed (not
averaged) over the batch and AdamW's update is element-wise, so an image's
trajectory does not depend on its batch mates or on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokenizer import check_images, check_positions
from .utils import check_int, check_positive, frozen, mixed_precision, progress
from .vit import SPoTViT


@dataclass
class OracleResult:
    """Outcome of :func:`spot_on` for B images with N tokens and S steps.

    positions: (B, N, 2) final positions, (y, x) in [0, 1].
    trajectory: (B, S + 1, N, 2) positions before each step and after the last.
    loss: (B, S + 1) cross-entropy at each trajectory point.
    correct: (B, S + 1) bool, top-1 correct at each trajectory point (how fast the search saturates);
    ``correct_before`` / ``correct_after``: its first and last columns.
    """

    positions: torch.Tensor
    trajectory: torch.Tensor
    loss: torch.Tensor
    correct: torch.Tensor

    @property
    def correct_before(self) -> torch.Tensor:
        return self.correct[:, 0]

    @property
    def correct_after(self) -> torch.Tensor:
        return self.correct[:, -1]

    @property
    def loss_before(self) -> torch.Tensor:
        return self.loss[:, 0]

    @property
    def loss_after(self) -> torch.Tensor:
        return self.loss[:, -1]

    @staticmethod
    def cat(results: list["OracleResult"]) -> "OracleResult":
        """Concatenate results of consecutive batches along the image axis."""
        return OracleResult(*(torch.cat([getattr(r, f) for r in results]) for f in OracleResult.__dataclass_fields__))


def check_labels(labels: torch.Tensor, batch_size: int) -> None:
    """Raise a clear error unless ``labels`` is an integer tensor of shape (batch_size,)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, shape (B,), got {type(labels).__name__}")
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape (B,) = ({batch_size},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer (int64) tensor of class indices, got dtype {labels.dtype}")


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise unless every label is a class index in [0, num_classes - 1].

    Cross-entropy would silently ignore -100 (its ``ignore_index``: loss 0, the positions of
    that image never move) and fail obscurely on other out-of-range values (a device assert on CUDA).
    """
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = sorted(set(labels[bad].tolist()))
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}] (the model has {num_classes} "
                         f"classes), got {values[:5]}{' ...' if len(values) > 5 else ''}")


def spot_on(
    model: SPoTViT,
    images: torch.Tensor,
    labels: torch.Tensor,
    init_positions: torch.Tensor,
    steps: int = 50,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    movable: torch.Tensor | None = None,
    amp: bool | None = None,
) -> OracleResult:
    """Optimise token positions per image by AdamW on cross-entropy with the true label.

    Args:
        model: SPoT view of a trained ViT (frozen during the search).
        images: (B, C, H, W) model-ready float images.
        labels: (B,) int64 true labels, each in [0, num_classes - 1] (checked against the logits).
        init_positions: (B, N, 2) finite starting positions (e.g. a prior's draw); values
            outside [0, 1] are clamped into it.
        steps: number of AdamW steps, an int >= 0 (0 evaluates the start only).
        lr: step size in normalised coordinates, > 0 (3e-3 at 224 px ~ 0.7 px/step).
        weight_decay: AdamW decay on the positions (default 0: decay would
            pull positions towards the (0, 0) corner).
        movable: optional bool mask (N,) or (B, N) of the tokens allowed to
            move; the others stay at their initial positions (used to optimise
            one token at a time and measure token interdependence).
        amp: bfloat16 autocast of the forward (default: on CUDA only); positions and their
            optimiser stay float32.

    Positions are clamped to [0, 1] after every step.
    """
    check_images(images)
    check_labels(labels, images.shape[0])
    # Before the clamp below: clamping would turn +-inf into a corner and NaN into who knows what.
    check_positions(init_positions, images.shape[0], name="init_positions")
    steps = check_int(steps, "steps", 0)
    check_positive(lr, "lr")
    start = init_positions.detach().float().clamp(0, 1)
    positions = start.clone().requires_grad_(True)
    if movable is not None:
        frozen_tokens = ~movable.to(device=start.device, dtype=torch.bool).expand(start.shape[:2])[..., None]
    optimiser = torch.optim.AdamW([positions], lr=lr, weight_decay=weight_decay)
    trajectory, losses, correct = [], [], []
    with frozen(model):
        for step in range(steps + 1):
            with mixed_precision(images.device, amp):
                logits = model(images, positions).float()
            if step == 0:  # the logits give the class count whatever the model; one check per call
                check_label_range(labels, logits.shape[-1])
            loss = F.cross_entropy(logits, labels, reduction="none")
            trajectory.append(positions.detach().clone())
            losses.append(loss.detach())
            correct.append(logits.detach().argmax(-1) == labels)
            if step == steps:
                break
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
            with torch.no_grad():
                positions.clamp_(0, 1)
                if movable is not None:
                    positions.copy_(torch.where(frozen_tokens, start, positions))
    return OracleResult(
        positions=positions.detach(),
        trajectory=torch.stack(trajectory, dim=1),
        loss=torch.stack(losses, dim=1),
        correct=torch.stack(correct, dim=1),
    )


def one_at_a_time(model: SPoTViT, images: torch.Tensor, labels: torch.Tensor, init_positions: torch.Tensor,
                  steps: int = 50, lr: float = 3e-3, **kwargs) -> torch.Tensor:
    """The interdependence control: each token searched alone (:func:`spot_on` with only it movable, the
    others held at ``init_positions``); returns (B, N, 2) positions, each token at its own optimum."""
    solo = init_positions.clone()
    num_tokens = init_positions.shape[1]
    for j in range(num_tokens):
        movable = torch.zeros(num_tokens, dtype=torch.bool)
        movable[j] = True
        solo[:, j] = spot_on(model, images, labels, init_positions, steps, lr, movable=movable, **kwargs).positions[:, j]
    return solo


@torch.no_grad()
def grid_oracle(model: SPoTViT, images: torch.Tensor, labels: torch.Tensor, num_tokens: int,
                chunk: int = 4096, amp: bool | None = None) -> torch.Tensor:
    """The grid-constrained oracle: N distinct grid cells per image, chosen greedily with the true label.

    Forward selection: starting from no token, each step adds the free cell whose patch, with the
    cells chosen so far, gives the lowest cross-entropy with ``labels`` (every free cell is tried;
    G = gh * gw forwards per image and step, in chunks of ``chunk`` (image, cell) pairs). The
    counterpart of SPoT-ON restricted to the patch grid (a search, unlike snapping SPoT-ON's end
    points to cells, which can put two tokens in one cell). images (B, C, H, W) model-ready,
    labels (B,), 1 <= N <= G. Returns (B, N, 2) cell centres, (y, x) in [0, 1], in the order chosen.
    """
    check_images(images)
    check_labels(labels, images.shape[0])
    centres = model.grid_positions(1, images.device)[0]  # (G, 2)
    G, B = len(centres), images.shape[0]
    num_tokens = check_int(num_tokens, "num_tokens", 1, G)
    chunk = check_int(chunk, "chunk", 1)
    if num_tokens == G:  # every cell: the full grid, whatever the order (nothing to search)
        return centres.expand(B, G, 2).clone()
    chosen = torch.zeros(B, 0, dtype=torch.long, device=images.device)
    with frozen(model):
        for _ in range(num_tokens):
            trial = torch.cat([chosen[:, None, :].expand(B, G, -1),
                               torch.arange(G, device=images.device).view(1, G, 1).expand(B, G, 1)], dim=2)
            trial = trial.reshape(B * G, -1)  # (image, candidate cell) pairs, image-major
            owner = torch.arange(B, device=images.device).repeat_interleave(G)
            losses = torch.empty(B * G, device=images.device)
            for start in range(0, B * G, chunk):
                sl = slice(start, start + chunk)
                with mixed_precision(images.device, amp):
                    logits = model(images[owner[sl]], centres[trial[sl]]).float()
                check_label_range(labels, logits.shape[-1])
                losses[sl] = F.cross_entropy(logits, labels[owner[sl]], reduction="none")
            losses = losses.view(B, G).scatter(1, chosen, float("inf"))  # a cell is used once
            chosen = torch.cat([chosen, losses.argmin(1, keepdim=True)], dim=1)
    return centres[chosen]


def spot_on_split(
    model: SPoTViT,
    split,
    init_positions: torch.Tensor,
    steps: int = 50,
    lr: float = 3e-3,
    batch_size: int = 256,
    device=None,
    desc: str | None = "SPoT-ON",
    **kwargs,
) -> OracleResult:
    """:func:`spot_on` over a whole :class:`spotlib.data.Split` in batches (tqdm progress).

    ``init_positions`` is (n, N, 2) for the n images of the split (n >= 1); results are on the CPU.
    Images are normalised as the model expects (:func:`spotlib.data.for_model`).
    """
    from .data import for_model

    if len(split) == 0:
        raise ValueError("the split is empty (0 images); SPoT-ON needs at least one image")
    split = for_model(split, model)
    check_positions(init_positions, name="init_positions")
    if init_positions.shape[0] != len(split):
        raise ValueError(f"init_positions hold {init_positions.shape[0]} images, the split {len(split)}")
    results = []
    bar = progress(total=len(split), desc=desc, unit="img", disable=desc is None)
    for sl, images, labels in split.batches(batch_size, device):
        result = spot_on(model, images, labels, init_positions[sl].to(images.device), steps, lr, **kwargs)
        results.append(OracleResult(*(getattr(result, f).cpu() for f in OracleResult.__dataclass_fields__)))
        bar.update(len(images))
    bar.close()
    return OracleResult.cat(results)
