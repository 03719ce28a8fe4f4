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

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 300_000
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_clean(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size:,} bytes (limit {MAX_BYTES:,})"
    notebook = nbformat.read(path, as_version=4)
    assert "widgets" not in notebook.metadata and "papermill" not in notebook.metadata
    for index, cell in enumerate(notebook.cells):
        assert not {"execution", "papermill"} & set(cell.metadata), f"{path.name} cell {index}: run metadata"
        for output in cell.get("outputs", []):
            assert WIDGET_VIEW not in output.get("data", {}), f"{path.name} cell {index}: a progress widget"
