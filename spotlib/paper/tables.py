"""Results tables in the paper's layout, saved as CSV, Markdown and LaTeX.

Rows: (model, prior, oracle flag); columns: tokens x {Acc@1, kNN}. Every cell is an accuracy with
its 95 % bootstrap interval over test images (``ci_low``/``ci_high`` in the tidy frame): Markdown
and LaTeX show ``value ± half-width`` (and, for a mean over seed replicates, the standard deviation
over seeds), the CSV the value and both bounds. Each row also gives its test images (``n``) and,
when costs are known, its MFLOPs per image at each budget. The best value of a column is bold among
the rows without the oracle flag (rows with it use the label or an external model) *and* of
comparable cost: at most ``COST_SLACK`` times the cheapest such row at that budget (the learned
token-relevance sparsifier runs its first blocks on the full grid, so at a small budget it costs
several times more than the tokens it keeps).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .io import write_text

METRIC_NAMES = {"acc1": "Acc@1", "knn": "kNN"}
COST_SLACK = 1.1
INDEX = ["Model", "Prior", "Oracle"]


def results_table(tidy: pd.DataFrame, row_order: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Pivot a tidy frame (one backbone or replicate mean) to rows (Model, Prior, Oracle) x columns
    (tokens, metric, field), fields value, ci_low, ci_high (and spread, mflops where the frame has them),
    plus a column ("n", "", "") of test images per row (the largest, if they differ by cell).

    ``row_order``: optional [(model, prior), ...] giving the row order.
    """
    if tidy["backbone"].nunique() > 1:
        raise ValueError(f"results_table takes one backbone, got {sorted(tidy['backbone'].unique())}")
    fields = [f for f in ("value", "ci_low", "ci_high", "spread", "mflops") if f in tidy and tidy[f].notna().any()]
    table = tidy.pivot_table(index=["model", "prior", "oracle"], columns=["tokens", "metric"], values=fields,
                             aggfunc="first", dropna=False)
    table = table.dropna(how="all")  # dropna=False keeps NaN cells but also forms (model, prior, oracle) pairs absent from tidy
    table = table.reorder_levels([1, 2, 0], axis=1)
    metric_rank = {m: i for i, m in enumerate(METRIC_NAMES)}
    table = table[sorted(table.columns, key=lambda c: (c[0], metric_rank.get(c[1], 99), fields.index(c[2])))]
    table[("n", "", "")] = tidy.groupby(["model", "prior", "oracle"]).n.max()
    if row_order is not None:
        keys = {(m, p): (m, p, o) for m, p, o in table.index}
        table = table.loc[[keys[r] for r in row_order if r in keys]]
    table.index.names = INDEX
    return table


def budgets_and_metrics(table: pd.DataFrame) -> list[tuple[int, str]]:
    return list(dict.fromkeys((t, m) for t, m, f in table.columns if f == "value"))


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """(rows x (tokens, metric)) True where a cell is its column's best among rows without the oracle flag
    and of comparable cost (see the module docstring)."""
    plain = ~table.index.get_level_values("Oracle").astype(bool)
    mask = {}
    for t, m in budgets_and_metrics(table):
        values = table[(t, m, "value")]
        eligible = pd.Series(plain, index=table.index) & values.notna()
        if (t, m, "mflops") in table:
            cost = table[(t, m, "mflops")]
            cheapest = cost[eligible].min()
            eligible &= cost.isna() | (cost <= COST_SLACK * cheapest)
        mask[(t, m)] = eligible & values.eq(values[eligible].max())
    return pd.DataFrame(mask, index=table.index)


def _cell(row: pd.Series, t: int, m: str) -> str:
    value = row.get((t, m, "value"))
    if value is None or pd.isna(value):
        return ""
    text = f"{value:.1f} ±{(row[(t, m, 'ci_high')] - row[(t, m, 'ci_low')]) / 2:.1f}"
    spread = row.get((t, m, "spread"))
    return text + (f" (sd {spread:.1f})" if spread is not None and not pd.isna(spread) else "")


def _formatted(table: pd.DataFrame, bold: str, check: str) -> pd.DataFrame:
    mask = best_mask(table)
    columns = {}
    for t, m in budgets_and_metrics(table):
        cells = [(_cell(row, t, m)) for _, row in table.iterrows()]
        columns[f"{t} T {METRIC_NAMES.get(m, m)}"] = [bold.format(c) if hit and c else c
                                                      for c, hit in zip(cells, mask[(t, m)])]
    out = pd.DataFrame(columns, index=table.index).reset_index()
    out["Oracle"] = out["Oracle"].map({True: check, False: ""})
    costs = [(t, m) for t, m in budgets_and_metrics(table) if m == "acc1" and (t, m, "mflops") in table]
    if costs:
        out["MFLOPs"] = ["/".join("–" if pd.isna(row[(t, m, "mflops")]) else f"{row[(t, m, 'mflops')]:.1f}"
                                  for t, m in costs) if row[[(t, m, "mflops") for t, m in costs]].notna().any()
                         else "" for _, row in table.iterrows()]
    out["n"] = [f"{int(v):,}" if not pd.isna(v) else "" for v in table[("n", "", "")]]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    cells = _formatted(table, "**{}**", "✓")
    return cells.to_markdown(index=False, colalign=["left", "left", "center"] + ["right"] * (cells.shape[1] - 3))


def latex_caption(caption: str) -> str | None:
    """A plain-text caption (``%``, ``_``, ``&`` as written) escaped for LaTeX."""
    for char in "\\%_&#":
        caption = caption.replace(char, "\\" + char) if char != "\\" else caption.replace("\\", r"\textbackslash{}")
    return caption or None


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    cells = _formatted(table, r"\textbf{{{}}}", r"\checkmark")
    cells = cells.map(lambda c: c.replace("±", r"$\pm$").replace("%", r"\%") if isinstance(c, str) else c)
    return cells.to_latex(index=False, escape=False, caption=latex_caption(caption),
                          column_format="llc" + "r" * (cells.shape[1] - 3))


def flat_csv(table: pd.DataFrame) -> str:
    """The table with one column per (tokens, metric, field): ``6 T Acc@1``, ``6 T Acc@1 low``, ``... high``."""
    names = {"value": "", "ci_low": " low", "ci_high": " high", "spread": " sd over seeds", "mflops": " MFLOPs"}
    flat = table.copy()
    flat.columns = ["n" if t == "n" else f"{t} T {METRIC_NAMES.get(m, m)}{names[f]}" for t, m, f in table.columns]
    return flat.reset_index().to_csv(index=False, float_format="%.2f")


def file_stem(name: str) -> str:
    """A backbone or replicate-group name as a file name: ``mean(A,B)`` -> ``mean_A_B``, ``CLS-IN21k`` -> ``CLS_IN21k``
    (no shell metacharacters in the tables' file names)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def save_table(table: pd.DataFrame, stem: str | Path, caption: str = "") -> list[Path]:
    """Write ``stem``.csv, ``stem``.md and ``stem``.tex; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_text(paths[0], flat_csv(table))
    write_text(paths[1], (f"{caption}\n\n" if caption else "") + to_markdown(table) + "\n")
    write_text(paths[2], to_latex(table, caption))
    return paths


def save_frame(frame: pd.DataFrame, stem: str | Path, caption: str = "", floatfmt: str = ".2f") -> list[Path]:
    """Write any DataFrame as ``stem``.csv, .md and .tex (no highlighting; the caption heads the
    Markdown too); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_text(paths[0], frame.to_csv(index=False))
    # a cell nothing measured (NaN) reads as a dash in the rendered tables, as an empty field in the CSV
    shown = frame.astype(object).where(frame.notna(), None)
    write_text(paths[1], (f"{caption}\n\n" if caption else "")
               + shown.to_markdown(index=False, floatfmt=floatfmt, missingval="–") + "\n")
    write_text(paths[2], frame.to_latex(index=False, float_format=lambda v: format(v, floatfmt), na_rep="--",
                                        caption=latex_caption(caption), escape=True))
    return paths


__all__ = ["COST_SLACK", "best_mask", "flat_csv", "results_table", "save_frame", "save_table", "to_latex", "to_markdown"]
