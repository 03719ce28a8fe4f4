"""Figures shared by the notebooks (matplotlib / seaborn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.patches import Rectangle

from .data import Split

PRIOR_ORDER = ["grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient"]
METRIC_LABELS = {"acc1": "Acc@1 (%)", "knn": "kNN (%)"}


def save_figure(fig: plt.Figure, stem: str | Path, pdf: bool = True) -> list[Path]:
    """Save ``stem``.png (and .pdf) atomically; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".pdf") if pdf else (".png",):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(".tmp" + path.name)
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=suffix[1:],
                    metadata={"Software": None} if suffix == ".png" else {"CreationDate": None, "Producer": None})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def image_for_display(split: Split, index: int) -> torch.Tensor:
    """(H, W) or (H, W, 3) float image in [0, 1] for imshow."""
    image = split.images[index].float() / 255
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)


def show_samples(split: Split, per_class: int = 8) -> plt.Figure:
    """A grid of the first ``per_class`` images of each class."""
    classes = range(len(split.classes))
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.8, len(classes) * 0.85))
    for c in classes:
        idx = (split.labels == c).nonzero().flatten()[:per_class]
        for j, ax in enumerate(axes[c]):
            ax.axis("off")
            if j < len(idx):
                ax.imshow(image_for_display(split, int(idx[j])), cmap="gray")
        axes[c][0].set_title(split.classes[c], fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def draw_windows(ax: plt.Axes, positions: torch.Tensor, window: int, image_size: tuple[int, int],
                 color="tab:orange", lw: float = 1.0, centres: bool = True) -> None:
    """Draw k x k windows centred at ``positions`` (N, 2), (y, x) in [0, 1], on an imshow axis."""
    H, W = image_size
    for y, x in positions.tolist():
        cy, cx = y * H - 0.5, x * W - 0.5  # imshow puts pixel i's centre at i
        ax.add_patch(Rectangle((cx - window / 2, cy - window / 2), window, window, fill=False, ec=color, lw=lw))
    if centres:
        ax.scatter(positions[:, 1] * W - 0.5, positions[:, 0] * H - 0.5, s=4, c=color, zorder=3)


def show_priors(image: torch.Tensor, positions: Mapping[str, torch.Tensor], window: int) -> plt.Figure:
    """The paper's Figure 2: one image, one panel per prior with its windows.

    image: (H, W) or (H, W, 3) in [0, 1]; positions: {prior: (N, 2)}.
    """
    fig, axes = plt.subplots(1, len(positions), figsize=(2.2 * len(positions), 2.4))
    for ax, (name, pos) in zip(axes, positions.items()):
        ax.imshow(image, cmap="gray")
        draw_windows(ax, pos, window, image.shape[:2])
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        ax.axis("off")
    fig.tight_layout()
    return fig


def accuracy_vs_tokens(tidy: pd.DataFrame, metric: str = "acc1", hue: str = "prior", style: str | None = "model",
                       col: str | None = "backbone") -> sns.FacetGrid:
    """Accuracy against token budget, one line per ``hue`` (and ``style``), one panel per ``col``."""
    data = tidy[tidy.metric == metric]
    order = [p for p in PRIOR_ORDER if p in set(data[hue])] if hue == "prior" else None
    grid = sns.relplot(data=data, x="tokens", y="value", hue=hue, hue_order=order, style=style, col=col,
                       kind="line", marker="o", height=3.2, aspect=1.1, facet_kws=dict(sharey=True))
    grid.set(xscale="log", xticks=sorted(data.tokens.unique()))
    grid.set_xticklabels(sorted(data.tokens.unique()))
    grid.set_axis_labels("tokens", METRIC_LABELS.get(metric, metric))
    for ax in grid.axes.flat:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    return grid
