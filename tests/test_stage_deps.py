"""dvc.yaml declares, for every stage, exactly the spotlib files its notebook runs.

A stage runs ``python -m spotlib.paper.pipeline STAGE``, which executes its notebook: the
code it runs is the notebook's spotlib imports, ``spotlib/__init__.py`` (imported
with any submodule) and ``spotlib/pipeline.py``, with everything they import in
turn (relative imports, also inside functions). A missing dep lets ``dvc repro``
skip a stage whose code changed; an extra one reruns it for nothing.

``pipeline.py`` counts with its module-level imports only: its value checks import,
inside functions, the module of the stage they check (backbones for the backbones
stage, sparsify for sparsification, ...), which that stage's notebook imports anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spotlib"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def relative_imports(module: str) -> set[str]:
    """spotlib modules that ``spotlib/<module>.py`` imports (``from .x import``, ``from . import x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    nodes = tree.body if module == "pipeline" else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def notebook_imports(stage: str) -> set[str]:
    notebook = next((ROOT / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    found = set()
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spotlib."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spotlib":
                parts = node.module.split(".")
                found.update(parts[1:2] if len(parts) > 1 else [a.name for a in node.names])
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def code_of(stage: str) -> set[str]:
    """spotlib files a stage's run executes (see the module docstring)."""
    todo, seen = ["__init__", "pipeline", *notebook_imports(stage)], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(relative_imports(module))
    return {f"spotlib/{m}.py" for m in seen}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_are_the_code_it_runs(stage):
    declared = {d for d in STAGES[stage]["deps"] if d.startswith("spotlib/")}
    needed = code_of(stage)
    assert not needed - declared, f"dvc.yaml stage {stage} lacks deps {sorted(needed - declared)}"
    assert not declared - needed, f"dvc.yaml stage {stage} declares deps it never runs: {sorted(declared - needed)}"


def test_stage_reads_only_its_own_notebook_and_earlier_outputs():
    """Each stage depends on its own notebook, and every non-code dep is an earlier stage's output."""
    produced: set[str] = set()
    for stage, spec in STAGES.items():
        notebooks = [d for d in spec["deps"] if d.startswith("notebooks/")]
        assert notebooks == [next((ROOT / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb")).relative_to(ROOT).as_posix()]
        data = [d for d in spec["deps"] if not d.startswith(("notebooks/", "spotlib/"))]
        assert set(data) <= produced, f"{stage} reads {sorted(set(data) - produced)}, which no earlier stage writes"
        for out in spec.get("outs", []) + spec.get("metrics", []):
            produced.add(next(iter(out)) if isinstance(out, dict) else out)
