"""Re-execute the stored notebooks in place with their default (smoke) parameters, in pipeline order.

    .venv/bin/python scripts/refresh_notebooks.py            # every stage
    .venv/bin/python scripts/refresh_notebooks.py oracle     # one stage (earlier stages' smoke outputs must exist)

Each notebook runs through papermill exactly as nbval will re-run it (defaults, outputs under
build/smoke), then is cleaned so that a rerun only changes what the code changed: no widget state,
no execution timestamps or papermill metadata, progress-bar widgets replaced by their text.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spotlib.paper.pipeline import clean_notebook, notebook_for, stage_names  # noqa: E402
from spotlib.utils import PROGRESS_ENV  # noqa: E402

os.environ.setdefault(PROGRESS_ENV, "text")  # text progress in the stored outputs, as in pipeline runs

def refresh(stage: str) -> None:
    path = notebook_for(stage, ROOT)
    print(f"{path.name}: executing", flush=True)
    executed = papermill.execute_notebook(str(path), None, cwd=str(ROOT), progress_bar=False)
    nbformat.write(clean_notebook(executed), str(path))
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB", flush=True)


if __name__ == "__main__":
    for stage in sys.argv[1:] or stage_names(ROOT):
        refresh(stage)
