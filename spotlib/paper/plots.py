"""Figures shared by the notebooks (matplotlib / seaborn)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.patches import Rectangle

from ..data import Split
from .io import atomic_path

PRIOR_ORDER = ["Patch Grid", "grid", "uniform", "gaussian", "sobol", "isotropic", "center", "salient", "SPoT-ON"]
METRIC_LABELS = {"acc1": "Acc@1 (%)", "knn": "kNN (%)"}


def save_figure(fig: plt.Figure, stem: str | Path, pdf: bool = True) -> list[Path]:
    """Save ``stem``.png (and .pdf) atomically; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".pdf") if pdf else (".png",):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=suffix[1:],
                        metadata={"Software": None} if suffix == ".png" else {"CreationDate": None, "Producer": None})
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
    present = list(dict.fromkeys(data[hue]))
    order = [p for p in PRIOR_ORDER if p in present] + [p for p in present if p not in PRIOR_ORDER]
    grid = sns.relplot(data=data, x="tokens", y="value", hue=hue, hue_order=order, style=style, col=col,
                       kind="line", marker="o", height=3.2, aspect=1.1, facet_kws=dict(sharey=True))
    grid.set(xscale="log", xticks=sorted(data.tokens.unique()))
    grid.set_xticklabels(sorted(data.tokens.unique()))
    grid.set_axis_labels("tokens", METRIC_LABELS.get(metric, metric))
    for ax in grid.axes.flat:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    return grid


def show_trajectories(split: Split, trajectory: torch.Tensor, window: int, indices=range(6),
                      labels: list[str] | None = None) -> plt.Figure:
    """The paper's teaser: start positions (dots), paths and final windows for some images.

    trajectory: (n, S + 1, N, 2) positions of the split's images at every oracle step.
    """
    indices = list(indices)
    fig, axes = plt.subplots(1, len(indices), figsize=(2.2 * len(indices), 2.4), squeeze=False)
    H, W = split.image_size
    colors = plt.cm.tab10.colors
    for ax, i in zip(axes[0], indices):
        ax.imshow(image_for_display(split, i), cmap="gray")
        path = trajectory[i]  # (S + 1, N, 2)
        for t in range(path.shape[1]):
            c = colors[t % len(colors)]
            ax.plot(path[:, t, 1] * W - 0.5, path[:, t, 0] * H - 0.5, color=c, lw=0.8, alpha=0.9)
            ax.scatter(path[0, t, 1] * W - 0.5, path[0, t, 0] * H - 0.5, s=6, color=c)
            draw_windows(ax, path[-1, t : t + 1], window, (H, W), color=c, lw=0.9, centres=False)
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_title(labels[i] if labels else split.classes[int(split.labels[i])], fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def saliency_distributions(token_saliency: pd.DataFrame) -> sns.FacetGrid:
    """Saliency under each token (columns backbone, tokens, positions, saliency) as box plots."""
    grid = sns.catplot(data=token_saliency, x="tokens", y="saliency", hue="positions", col="backbone", kind="box",
                       hue_order=["random", "initial", "final"], fliersize=0.5, height=3.2, aspect=1.2)
    grid.set_axis_labels("tokens", "saliency under the token")
    return grid


def transfer_matrices(transfer: pd.DataFrame) -> plt.Figure:
    """One heatmap per budget: rows = where positions come from (a source backbone's oracle or the
    target's prior), columns = target backbone, cells = target's Acc@1 (%)."""
    budgets = sorted(transfer.tokens.unique())
    fig, axes = plt.subplots(1, len(budgets), figsize=(2.6 * len(budgets), 2.6), squeeze=False)
    for ax, n in zip(axes[0], budgets):
        m = transfer[transfer.tokens == n].pivot_table(index="source", columns="target", values="acc1")
        order = [r for r in m.index if r != "prior"] + ["prior"]
        sns.heatmap(m.loc[order], annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", cbar=False, ax=ax)
        ax.set_title(f"{n} tokens", fontsize=9)
        ax.set_xlabel("target")
        ax.set_ylabel("positions from" if n == budgets[0] else "")
    fig.tight_layout()
    return fig


def compare_saliency(split: Split, maps: Mapping[str, torch.Tensor], show: int = 8) -> plt.Figure:
    """Rows: the first ``show`` images, then each source's maps (n, H, W) in [0, 1]."""
    fig, axes = plt.subplots(1 + len(maps), show, figsize=(1.3 * show, 1.4 * (1 + len(maps))), squeeze=False)
    rows = [("image", None)] + list(maps.items())
    for r, (name, m) in enumerate(rows):
        for j in range(show):
            ax = axes[r, j]
            ax.imshow(image_for_display(split, j) if m is None else m[j], cmap="gray" if m is None else "magma",
                      vmin=0, vmax=1)
            ax.axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def compare_placements(split: Split, placements: Mapping[str, torch.Tensor], window: int) -> plt.Figure:
    """One row per method, one column per image: its windows at positions (n, N, 2) on the image."""
    n = len(split)
    fig, axes = plt.subplots(len(placements), n, figsize=(1.9 * n, 2.0 * len(placements)), squeeze=False)
    for r, (label, positions) in enumerate(placements.items()):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(image_for_display(split, i), cmap="gray")
            draw_windows(ax, positions[i], window, split.image_size)
            ax.set_xlim(-0.5, split.image_size[1] - 0.5)
            ax.set_ylim(split.image_size[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_flops(points: pd.DataFrame) -> sns.FacetGrid:
    """Acc@1 against FLOPs per image (columns backbone, method, tokens, mflops, acc1), one line per method."""
    grid = sns.relplot(data=points, x="mflops", y="acc1", hue="method", col="backbone", kind="line", marker="o",
                       height=3.2, aspect=1.1)
    grid.set(xscale="log")
    grid.set_axis_labels("MFLOPs per image (forward)", "Acc@1 (%)")
    for ax in grid.axes.flat:
        ax.grid(alpha=0.3)
    return grid
