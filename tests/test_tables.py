"""spotlib.paper.tables: the paper-layout results tables (intervals, cost-aware bold, CSV/Markdown/LaTeX)."""

from __future__ import annotations

import pandas as pd
import pytest

from spotlib.paper.tables import best_mask, flat_csv, results_table, save_table, to_latex, to_markdown


def row(model, prior, oracle, tokens, metric, value, mflops=None, n=100):
    return dict(backbone="A", model=model, prior=prior, oracle=oracle, tokens=tokens, metric=metric, value=value,
                ci_low=value - 2, ci_high=value + 4, n=n, mflops=mflops)


@pytest.fixture
def tidy():
    rows = []
    for t, cheap, relevance in ((6, 0.4, 2.4), (25, 1.5, 2.9)):
        rows += [row("ViT", "grid", False, t, "acc1", 40 + t, cheap),
                 row("Token relevance", "learned", False, t, "acc1", 60 + t, relevance),  # best, but costs more
                 row("SPoT", "isotropic", False, t, "acc1", 50 + t, cheap),
                 row("SPoT", "salient", True, t, "acc1", 90, cheap, n=30)]  # oracle flag: never bold
    return pd.DataFrame(rows)


def test_rows_are_the_tidy_rows_with_their_flags(tidy):
    table = results_table(tidy, [("ViT", "grid"), ("Token relevance", "learned"), ("SPoT", "isotropic"),
                                 ("SPoT", "salient")])
    assert list(table.index) == [("ViT", "grid", False), ("Token relevance", "learned", False),
                                 ("SPoT", "isotropic", False), ("SPoT", "salient", True)]
    assert table.loc[("SPoT", "isotropic", False), (25, "acc1", "value")] == 75
    assert table.loc[("SPoT", "salient", True), (6, "acc1", "ci_high")] == 94
    assert table[("n", "", "")].tolist() == [100, 100, 100, 30]
    with pytest.raises(ValueError, match="one backbone"):
        results_table(pd.concat([tidy, tidy.assign(backbone="B")]))


def test_bold_only_among_plain_rows_of_comparable_cost(tidy):
    mask = best_mask(results_table(tidy))
    best = {t: mask.index[mask[(t, "acc1")]].tolist() for t in (6, 25)}
    # Token relevance is more accurate but costs 6x (2x) more: SPoT isotropic is the bold row; salient has the flag
    assert best == {6: [("SPoT", "isotropic", False)], 25: [("SPoT", "isotropic", False)]}
    no_costs = best_mask(results_table(tidy.drop(columns="mflops")))
    assert no_costs.index[no_costs[(6, "acc1")]].tolist() == [("Token relevance", "learned", False)]


def test_formats_show_the_interval_costs_and_sizes(tidy, tmp_path):
    table = results_table(tidy)
    lines = {tuple(c.strip() for c in line.strip("|").split("|")) for line in to_markdown(table).splitlines()[2:]}
    assert ("SPoT", "isotropic", "", "**56.0 ±3.0**", "**75.0 ±3.0**", "0.4/1.5", "100") in lines
    assert ("SPoT", "salient", "✓", "90.0 ±3.0", "90.0 ±3.0", "0.4/1.5", "30") in lines
    assert r"$\pm$" in to_latex(table, "acc (95% CI)") and r"95\% CI" in to_latex(table, "acc (95% CI)")
    header = flat_csv(table).splitlines()[0].split(",")
    assert {"6 T Acc@1", "6 T Acc@1 low", "6 T Acc@1 high", "6 T Acc@1 MFLOPs", "n"} <= set(header)
    paths = save_table(table, tmp_path / "results_A", caption="Results on 100 images.")
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]
    assert paths[1].read_text().startswith("Results on 100 images.")
