"""Learned token placement for the paper's study: training, evaluation, costs, the oracle's gap.

The placers themselves (:class:`spotlib.policy.LearnedPrior`, :class:`spotlib.policy.PlacementPolicy`)
live in the core; this module trains them through a frozen SPoT model and scores them as the other
stages score priors.

Training (:func:`train_placer`): the SPoT model is frozen; only the placer trains, with AdamW and a
one-cycle schedule on :func:`spotlib.paper.train.fit` (seeded, resumable after each epoch). Loss
``"distill"`` (default): KL(teacher || student), the teacher being the full-grid ViT's logits on the
same image (computed once, :func:`teacher_logits`), the student the SPoT model at the placer's N
positions; ``"ce"``: cross-entropy with the training labels. ``noise`` > 0 adds Gaussian jitter of
that standard deviation (normalised units) to the positions while training (a smoothed objective;
never at test time). The training labels are read only by the ``"ce"`` loss; at test time a placer
reads images only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Split, for_model
from ..evaluate import embed, outcomes
from ..policy import LearnedPrior, PlacementPolicy, build_placer, initial_positions, place
from ..utils import frozen, images_per_second, mixed_precision
from ..vit import SPoTViT
from .io import check_choice, config_from_spec, load_safetensors, read_safetensors_metadata, save_safetensors
from .sparsify import count_flops, distillation_loss
from .train import fit, write_log

LOSSES = ("distill", "ce")
PLACER_FILE = "placer.safetensors"
STATE_FILE = "state.pt"


@dataclass
class PlacementConfig:
    """Placer training: AdamW with a one-cycle schedule over the first ``train_size`` training images."""

    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup: float = 0.1  # one-cycle pct_start
    seed: int = 0
    loss: str = "distill"
    noise: float = 0.0  # std of the Gaussian jitter on positions while training (0: none)
    train_size: int | None = None  # first n training images (None = all)

    def __post_init__(self):
        check_choice(self.loss, "placement loss", LOSSES)
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.train_size is not None and (isinstance(self.train_size, bool) or not isinstance(self.train_size, int)
                                            or self.train_size < 1):
            raise ValueError(f"train_size must be null or an integer >= 1, got {self.train_size!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("weight_decay", "noise"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")

    @classmethod
    def from_spec(cls, spec: dict, **changes) -> "PlacementConfig":
        """A config from a params.yaml mapping (unknown keys are errors), with ``changes`` applied."""
        return config_from_spec(cls, {**spec, **changes}, "placement training spec")


@torch.no_grad()
def teacher_logits(teacher: SPoTViT, data: Split, batch_size: int = 500, device=None) -> torch.Tensor:
    """(n, K) float32 logits of ``teacher`` at its full patch grid on every image of ``data``."""
    return embed(teacher, data, teacher.grid_positions(len(data)), batch_size, device)[0]


def train_placer(placer: nn.Module, spot: SPoTViT, data: Split, config: PlacementConfig, out_dir: str | Path,
                 device: str | torch.device = "cpu", state_dir: str | Path | None = None,
                 teacher: torch.Tensor | None = None, desc: str = "placer") -> pd.DataFrame:
    """Train ``placer`` in place through the frozen ``spot`` on the first ``config.train_size`` images
    of ``data``; resume from ``state_dir`` (default ``out_dir``) if a checkpoint is there.

    ``teacher``: (n, K) logits for those images (:func:`teacher_logits`), required by the ``"distill"``
    loss. Writes ``placer.safetensors`` (weights, with ``arch`` as metadata) to ``out_dir`` and the
    resumable ``state.pt`` to ``state_dir`` after each epoch, ``log.csv``/``log.json`` at the end.

    Returns the per-epoch log: epoch, loss, agree (% student top-1 == teacher's, or == label for
    ``"ce"``), lr, seconds, images_per_s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir) if state_dir is not None else out_dir
    data = for_model(data.head(config.train_size), spot)
    if config.loss == "distill":
        if teacher is None or teacher.shape[0] < len(data):
            raise ValueError(f"the distill loss needs teacher logits for the {len(data)} training images "
                             "(teacher_logits(grid_view, train_split)); or use loss: ce")
        teacher = teacher[:len(data)]
    placer.to(device)

    def step(idx: torch.Tensor, gen: torch.Generator, epoch: int):
        images = data.normalise(data.images[idx].to(device))
        positions = placer(images)
        if config.noise > 0:
            positions = positions + config.noise * torch.randn(positions.shape, generator=gen).to(positions)
        logits = spot(images, positions)
        if config.loss == "distill":
            target = teacher[idx].to(device)
            loss = distillation_loss(logits, target)
            agree = (logits.argmax(1) == target.argmax(1)).sum().item()
        else:
            labels = data.labels[idx].to(device)
            loss = F.cross_entropy(logits, labels)
            agree = (logits.argmax(1) == labels).sum().item()
        return loss, dict(loss=loss.item() * len(idx), agree=100 * agree, seen=len(idx))

    arch = placer.arch()
    with frozen(spot):
        log = fit(placer, config, len(data), step, lambda: save_placer(placer, out_dir / PLACER_FILE),
                  state_dir / STATE_FILE, dict(config=asdict(config), arch=arch), desc, device)
    return write_log(log, out_dir)


def save_placer(placer: nn.Module, path: str | Path) -> None:
    """The placer's weights as safetensors, its ``arch()`` as metadata (atomic)."""
    save_safetensors(placer.state_dict(), path, metadata={"arch": placer.arch()})


def load_placer(path: str | Path, device="cpu") -> nn.Module:
    """A placer saved by :func:`save_placer`, in eval mode."""
    meta = read_safetensors_metadata(path, "train it with train_placer (the placement stage)")
    if "arch" not in meta:
        raise ValueError(f"{path} has no placer arch metadata; it was not written by save_placer")
    placer = build_placer(meta["arch"])
    placer.load_state_dict(load_safetensors(path, device=device))
    return placer.to(device).eval()


# -- evaluation --------------------------------------------------------------------------------
def evaluate_placer(placer: nn.Module, spot: SPoTViT, test: Split, bank: Split | None, *, k: int = 20,
                    temperature: float = 0.07, batch_size: int = 500, device=None) -> dict[str, torch.Tensor]:
    """Per-image outcomes {"acc1": (n,) bool, "knn": (n,) bool} of ``spot`` at the positions ``placer``
    chooses for each image (test and kNN bank alike), as :func:`spotlib.evaluate.evaluate_outcomes`."""
    logits, feats = embed(spot, test, place(placer, test, spot, batch_size, device), batch_size, device)
    bank_feats = None
    if bank is not None:
        bank_feats = embed(spot, bank, place(placer, bank, spot, batch_size, device), batch_size, device)[1]
    return outcomes(logits, feats, test, bank, bank_feats, k, temperature)


def placer_costs(backbone: str, method: str, placer: nn.Module, spot: SPoTViT, test: Split, throughput_batch: int,
                 device) -> dict:
    """FLOPs per image of placing *and* classifying (the placer's own cost included) and images/s."""
    test = for_model(test, spot)
    x = test.normalise(test.images[:1].to(device))
    repeat = -(-throughput_batch // len(test))
    xb = test.normalise(test.images[:throughput_batch].repeat(repeat, 1, 1, 1)[:throughput_batch].to(device))
    with torch.no_grad(), mixed_precision(device):
        flops = count_flops(lambda im: spot(im, placer(im)), x)
        placer_flops = count_flops(placer, x)
        speed = images_per_second(lambda: spot(xb, placer(xb)), len(xb))
    return dict(backbone=backbone, method=method, tokens=placer.num_tokens, flops=flops, placer_flops=placer_flops,
                images_per_s=speed)


def gap_closed(learned, baseline, ceiling, n_resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Share of the ceiling's gap a method closes, ``(learned - baseline) / (ceiling - baseline)``, from
    per-image outcomes of the three on the same images (each (n,), 0/1), in percent, with a 95 %
    percentile bootstrap interval (images resampled jointly; replicates with no gap are dropped)."""
    a, b, c = (np.asarray(v, dtype=np.float64).ravel() for v in (learned, baseline, ceiling))
    if not a.size == b.size == c.size or a.size == 0:
        raise ValueError(f"gap_closed needs outcomes on the same images, got {a.size}, {b.size}, {c.size}")
    gap = c.mean() - b.mean()
    value = float(100 * (a.mean() - b.mean()) / gap) if gap > 0 else float("nan")
    rng = np.random.default_rng(seed)
    shares = []
    for start in range(0, n_resamples, 500):
        idx = rng.integers(0, a.size, (min(500, n_resamples - start), a.size))
        num, den = (a[idx] - b[idx]).mean(1), (c[idx] - b[idx]).mean(1)
        shares.append(100 * num[den > 0] / den[den > 0])
    shares = np.concatenate(shares)
    low, high = (np.quantile(shares, [0.025, 0.975]) if shares.size else (np.nan, np.nan))
    return {"gap_closed": value, "ci_low": float(low), "ci_high": float(high), "n": int(a.size)}


def at_equal_flops(points: pd.DataFrame, method: str, against: str) -> pd.DataFrame:
    """For each budget of ``against`` (e.g. token relevance): ``method``'s accuracy interpolated linearly
    in FLOPs at that cost (None outside ``method``'s range), and whether some ``method`` point is both
    cheaper and more accurate (``dominated``). ``points``: backbone, method, tokens, mflops, acc1."""
    rows = []
    for backbone, group in points.groupby("backbone", sort=False):
        mine = group[group.method == method].sort_values("mflops")
        for r in group[group.method == against].itertuples():
            inside = len(mine) and mine.mflops.iloc[0] <= r.mflops <= mine.mflops.iloc[-1]
            cheaper = mine[(mine.mflops <= r.mflops) & (mine.acc1 > r.acc1)]
            rows.append(dict(backbone=backbone, tokens=r.tokens, against=against, against_mflops=r.mflops,
                             against_acc1=r.acc1, method=method,
                             acc1_at_equal_flops=float(np.interp(r.mflops, mine.mflops, mine.acc1)) if inside else None,
                             dominated=bool(len(cheaper)),
                             dominated_by=", ".join(f"{int(t)} tokens" for t in cheaper.tokens) or None))
    return pd.DataFrame(rows)


KINDS = ("learned prior", "learned policy")


def make_placer(kind: str, num_tokens: int, split: Split, spot: SPoTViT, init_prior: str = "isotropic",
                arch: dict | None = None, seed: int = 0) -> nn.Module:
    """An untrained placer of ``kind`` (one of :data:`KINDS`) for ``split``'s images, starting at
    ``init_prior``'s positions; ``arch``: :class:`spotlib.policy.PlacementPolicy` keywords
    (view_size, width, hidden) for the policy."""
    check_choice(kind, "placer kind", KINDS)
    init = initial_positions(num_tokens, init_prior, split.image_size, spot.grid_size)
    if kind == "learned prior":
        return LearnedPrior(init)
    return PlacementPolicy(init, split.channels, seed=seed, **(arch or {}))


def validation_split(train: Split, fit_size: int, val_size: int) -> tuple[Split, Split]:
    """(first ``fit_size`` training images, last ``val_size``): disjoint, or an error naming the sizes."""
    if fit_size + val_size > len(train):
        raise ValueError(f"train_size {fit_size} + val_size {val_size} exceed the {len(train)} training images; "
                         "lower one of them (the validation images must not be fit)")
    return train.head(fit_size), train.subset(torch.arange(len(train) - val_size, len(train)))
