"""The stored notebooks stay clean: small, no widget state, no timestamps, text progress only.

A stored notebook is what a reader opens first and what every rerun diffs against, so it holds
only what a rerun reproduces: its outputs (smoke profile), without widget state or per-cell
execution metadata, and without the figures that the figures stage writes to ``figures/``.
``scripts/refresh_notebooks.py`` re-executes and cleans them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))  # the pipeline's; explore.ipynb is not a stage
# the embedded run's executed copies, committed (dvc.yaml: cache: false) so the real run opens in JupyterLab
EXECUTED = sorted((ROOT / "results" / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 300_000
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS + EXECUTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_stored_notebook_is_clean(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size:,} bytes (limit {MAX_BYTES:,})"
    notebook = nbformat.read(path, as_version=4)
    assert "widgets" not in notebook.metadata and "papermill" not in notebook.metadata
    for index, cell in enumerate(notebook.cells):
        assert not {"execution", "papermill"} & set(cell.metadata), f"{path.name} cell {index}: run metadata"
        for output in cell.get("outputs", []):
            assert WIDGET_VIEW not in output.get("data", {}), f"{path.name} cell {index}: a progress widget"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_ones_nbval_reads(path):
    """nbval only honours a marker that is the whole comment: ``# NBVAL_IGNORE_OUTPUT: why`` is silently
    a compared cell (whose measured values then fail on another CPU)."""
    from nbval.plugin import comment_markers

    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for line in cell.source.splitlines() if cell.cell_type == "code" else []:
            if line.lstrip("# ").startswith("NBVAL"):
                assert line.lstrip("#").strip() in comment_markers, f"{path.name} cell {index}: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_compared_cells_hold_no_progress_text(path):
    """A progress bar's text (stderr) differs on every run (rates, or widgets in a kernel): a cell whose
    outputs nbval compares must not store it, or nbval fails with 'Missing output fields: stderr'."""
    from spotlib.paper.pipeline import output_is_compared

    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type == "code" and output_is_compared(cell):
            streams = {output.get("name") for output in cell.outputs}
            assert "stderr" not in streams, f"{path.name} cell {index}: stored stderr in a compared cell"


def test_every_stage_has_its_executed_copy_committed():
    """The executed embedded-profile notebooks are part of the repository, one per stored notebook."""
    import yaml

    assert [p.name for p in EXECUTED] == [p.name for p in STAGES]
    outs = [out for spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
            for out in spec["outs"] if isinstance(out, dict) and next(iter(out)).startswith("results/notebooks/")]
    assert len(outs) == len(STAGES) and all(next(iter(o.values())) == {"cache": False} for o in outs)


def test_the_explorer_notebook_is_stored_without_outputs():
    """Its outputs are a live widget (and depend on the machine's models): stored empty, run by nbval."""
    cells = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4).cells
    assert all(not c.get("outputs") for c in cells if c.cell_type == "code")
    assert any("explorer.widget()" in c.source for c in cells)


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_notebook_says_which_run_it_holds_and_ends_with_a_conclusion(path):
    """A reader sees first which profile the stored outputs come from and where the real run is, and
    last a conclusion computed by code (a code cell under the heading, not typed numbers)."""
    cells = nbformat.read(path, as_version=4).cells
    banner = next(c for c in cells if "banner" in c.metadata.get("tags", []))
    assert "**smoke**" in banner.source and f"../results/notebooks/{path.name}" in banner.source
    assert cells[-2].cell_type == "markdown" and cells[-2].source.startswith("## Conclusion (computed")
    assert cells[-1].cell_type == "code" and "print(" in cells[-1].source
