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
from .io import atomic_path, write_text

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


def _ordered(levels, order=PRIOR_ORDER) -> list:
    present = list(dict.fromkeys(levels))
    return [p for p in order if p in present] + [p for p in present if p not in order]


def lines_with_intervals(data: pd.DataFrame, x: str, y: str = "value", hue: str = "prior", style: str | None = None,
                         col: str | None = None, row: str | None = None, low: str = "ci_low", high: str = "ci_high",
                         hue_title: str | None = None, style_title: str | None = None, logx: bool = True, height: float = 3.2) -> sns.FacetGrid:
    """One line per ``hue`` (dashes per ``style``) with its interval as error bars (``low``/``high``),
    one panel per ``col`` (and ``row``); the legend titles name what the lines are (``hue_title``, ``style_title``)."""
    hues = _ordered(data[hue])
    palette = dict(zip(hues, sns.color_palette("tab10" if len(hues) <= 10 else "husl", len(hues))))
    styles = list(dict.fromkeys(data[style])) if style else [None]
    markers, dashes = ["o", "s", "^", "D", "v"], ["-", "--", ":", "-."]
    grid = sns.FacetGrid(data, col=col, row=row, height=height, aspect=1.15, sharey=True, margin_titles=row is not None)

    def draw(*_, data: pd.DataFrame, **__):  # FacetGrid.map_dataframe passes each panel's rows as data=
        frame, ax = data, plt.gca()
        for j, level in enumerate(styles):
            part = frame if level is None else frame[frame[style] == level]
            for h in hues:
                line = part[part[hue] == h].sort_values(x)
                if line.empty:
                    continue
                err = None
                if low in line and line[low].notna().all():
                    err = [line[y] - line[low], line[high] - line[y]]
                ax.errorbar(line[x], line[y], yerr=err, color=palette[h], ls=dashes[j % len(dashes)],
                            marker=markers[j % len(markers)], ms=4, lw=1.3, capsize=2.5, elinewidth=0.9)

    grid.map_dataframe(draw)
    values = sorted(data[x].unique())
    for ax in grid.axes.flat:
        if logx:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=palette[h], marker="o", ms=4, lw=1.3) for h in hues]
    labels = list(map(str, hues))
    if style:
        handles += [plt.Line2D([], [], color="none")] + [plt.Line2D([], [], color="0.3", ls=dashes[j % len(dashes)],
                                                                    marker=markers[j % len(markers)], ms=4)
                                                         for j in range(len(styles))]
        labels += [style_title or style] + list(map(str, styles))
    grid.figure.legend(handles, labels, title=hue_title or hue, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       frameon=False, fontsize=8, title_fontsize=9)
    return grid


def accuracy_vs_tokens(tidy: pd.DataFrame, metric: str = "acc1", hue: str = "prior", style: str | None = "model",
                       col: str | None = "backbone", hue_title: str = "token placement (prior)",
                       style_title: str = "model") -> sns.FacetGrid:
    """Accuracy (with its 95 % interval over test images) against the token budget, one line per
    ``hue`` (and ``style``), one panel per ``col``."""
    data = tidy[tidy.metric == metric]
    grid = lines_with_intervals(data, "tokens", hue=hue, style=style, col=col, hue_title=hue_title,
                                style_title=style_title)
    grid.set_axis_labels("tokens", METRIC_LABELS.get(metric, metric))
    grid.set_titles(col_template="{col_name}" if col else "")
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
    """Saliency under each token (columns source, backbone, tokens, positions, saliency) as box plots,
    one row of panels per saliency source."""
    grid = sns.catplot(data=token_saliency, x="tokens", y="saliency", hue="positions", col="backbone", row="source",
                       kind="box", hue_order=["random", "initial", "final"], fliersize=0.5, height=2.8, aspect=1.2,
                       margin_titles=True)
    grid.set_axis_labels("tokens", "saliency under the token")
    grid.legend.set_title("token positions")
    return grid


def oracle_saturation(saturation: pd.DataFrame, prior: str) -> plt.Figure:
    """SPoT-ON against its step count, from ``prior``: top-1 (with intervals) and the mean distance the
    tokens moved from their start (px), one line per budget, one column per backbone."""
    data = saturation[saturation.prior == prior]
    names = list(dict.fromkeys(data.backbone))
    budgets = sorted(data.tokens.unique())
    colors = dict(zip(budgets, sns.color_palette("viridis", len(budgets))))
    fig, axes = plt.subplots(2, len(names), figsize=(3.4 * len(names), 5.2), squeeze=False, sharex=True, sharey="row")
    for j, name in enumerate(names):
        for n in budgets:
            line = data[(data.backbone == name) & (data.tokens == n)].sort_values("step")
            axes[0, j].errorbar(line.step, line.value, yerr=[line.value - line.ci_low, line.ci_high - line.value],
                                color=colors[n], marker="o", ms=3, lw=1.2, capsize=2, label=f"{n}")
            axes[1, j].plot(line.step, line.displacement_px, color=colors[n], marker="o", ms=3, lw=1.2)
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].set_xlabel("SPoT-ON steps")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("Acc@1 (%)")
    axes[1, 0].set_ylabel("mean token displacement (px)")
    axes[0, -1].legend(title="tokens", fontsize=8, title_fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


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
    """Acc@1 (with intervals where ``ci_low``/``ci_high`` are given) against FLOPs per image (columns
    backbone, method, tokens, mflops, acc1), one line per method, on a log axis with readable ticks."""
    grid = lines_with_intervals(points, "mflops", y="acc1", hue="method", col="backbone", hue_title="method",
                                logx=False)
    for ax in grid.axes.flat:
        ax.set_xscale("log")
        ax.minorticks_off()
        lo, hi = points.mflops.min(), points.mflops.max()
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
                 if lo / 1.5 <= t <= hi * 1.5]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    grid.set_axis_labels("MFLOPs per image (forward)", "Acc@1 (%)")
    return grid


# -- data for `dvc plots` ----------------------------------------------------------------------
FLOPS_METHODS = ("Patch Grid", "SPoT (best prior)", "Token relevance", "SPoT, learned prior",  # dvc.yaml names
                 "SPoT, learned policy")                                                 # one file for each


def dvc_plot_data(curves: pd.DataFrame, points: pd.DataFrame, out_dir: str | Path,
                  replicates: Mapping[str, list[str]] | None = None) -> list[Path]:
    """The accuracy curves as the flat files ``dvc plots show/diff`` draws (see the plots in dvc.yaml):

    - ``acc1_vs_tokens.csv``: one row per budget, one Acc@1 column per method / prior of ``curves``
      (columns backbone, prior, tokens, metric, value; ``prior`` already names the method), for the
      first seed-replicate group's mean if there is one, else the first backbone (column ``backbone``);
      an empty field where a method was not measured at that budget;
    - ``flops_<method>.csv`` for each of :data:`FLOPS_METHODS`: backbone, tokens, mflops, acc1 from
      ``points`` (as :func:`accuracy_vs_flops` takes them).
    """
    from .tables import file_stem

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = next(iter(replicates or {}), None) or curves.backbone.iloc[0]
    acc = curves[(curves.metric == "acc1") & (curves.backbone == shown)]
    wide = acc.pivot_table(index="tokens", columns="prior", values="value", aggfunc="first", sort=False)
    paths = [out_dir / "acc1_vs_tokens.csv"]
    write_text(paths[0], wide.round(2).reset_index().assign(backbone=shown).to_csv(index=False))
    for method in FLOPS_METHODS:
        path = out_dir / f"flops_{file_stem(method).lower()}.csv"
        rows = points[points.method == method][["backbone", "tokens", "mflops", "acc1"]]
        write_text(path, rows.round(3).to_csv(index=False))
        paths.append(path)
    return paths
