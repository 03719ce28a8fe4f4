"""Results tables in the paper's layout, saved as CSV, Markdown and LaTeX.

Rows: (model, prior, oracle flag); columns: tokens x {Acc@1, kNN}; the best
value of each column among rows without the oracle flag is marked in bold, as
in the paper (rows with the flag use the label or an external model).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .io import write_text

METRIC_NAMES = {"acc1": "Acc@1", "knn": "kNN"}


def results_table(tidy: pd.DataFrame, row_order: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Pivot a tidy sweep (one backbone) to rows (Model, Prior, Oracle) x columns (tokens, metric).

    ``row_order``: optional [(model, prior), ...] giving the row order.
    """
    if tidy["backbone"].nunique() > 1:
        raise ValueError(f"results_table takes one backbone, got {sorted(tidy['backbone'].unique())}")
    table = tidy.pivot_table(index=["model", "prior", "oracle"], columns=["tokens", "metric"], values="value",
                             aggfunc="first")
    table = table.reindex(columns=sorted(table.columns, key=lambda c: (c[0], list(METRIC_NAMES).index(c[1]))))
    if row_order is not None:
        keys = {(m, p): (m, p, o) for m, p, o in table.index}
        table = table.loc[[keys[r] for r in row_order if r in keys]]
    table.index.names = ["Model", "Prior", "Oracle"]
    table.columns = pd.MultiIndex.from_tuples([(f"{t} T", METRIC_NAMES.get(m, m)) for t, m in table.columns])
    return table


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a cell is its column's best among rows without the oracle flag."""
    plain = ~table.index.get_level_values("Oracle").astype(bool)
    best = table[plain].max()
    return table.eq(best) & pd.Series(plain, index=table.index).values[:, None]


def _formatted(table: pd.DataFrame, bold: str) -> pd.DataFrame:
    mask = best_mask(table)
    cells = table.map(lambda v: f"{v:.2f}")
    cells = cells.where(~mask, cells.map(lambda s: bold.format(s)))
    cells = cells.reset_index()
    cells["Oracle"] = cells["Oracle"].map({True: "✓", False: ""})
    return cells


def to_markdown(table: pd.DataFrame) -> str:
    cells = _formatted(table, "**{}**")
    cells.columns = [" ".join(c).strip() if isinstance(c, tuple) else c for c in cells.columns]
    return cells.to_markdown(index=False, colalign=["left", "left", "center"] + ["right"] * (cells.shape[1] - 3))


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    cells = _formatted(table, r"\textbf{{{}}}")
    cells["Oracle"] = cells["Oracle"].map({"✓": r"\checkmark", "": ""})
    cells.columns = [" ".join(c).strip() if isinstance(c, tuple) else c for c in cells.columns]
    return cells.to_latex(index=False, escape=False, caption=caption or None, column_format="llc" + "r" * (cells.shape[1] - 3))


def save_table(table: pd.DataFrame, stem: str | Path, caption: str = "") -> list[Path]:
    """Write ``stem``.csv, ``stem``.md and ``stem``.tex; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = table.copy()
    flat.columns = [" ".join(c) for c in flat.columns]
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_text(paths[0], flat.reset_index().to_csv(index=False, float_format="%.2f"))
    write_text(paths[1], to_markdown(table) + "\n")
    write_text(paths[2], to_latex(table, caption))
    return paths


def save_frame(frame: pd.DataFrame, stem: str | Path, caption: str = "", floatfmt: str = ".2f") -> list[Path]:
    """Write any DataFrame as ``stem``.csv, .md and .tex (no highlighting); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_text(paths[0], frame.to_csv(index=False))
    write_text(paths[1], frame.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    write_text(paths[2], frame.to_latex(index=False, float_format=lambda v: format(v, floatfmt), caption=caption or None))
    return paths
