"""dvc.yaml declares, for every stage, exactly the spotlib files its notebook runs, and only its own params.

A stage runs ``python -m spotlib.paper.pipeline STAGE``, which executes its notebook:
the code it runs is the notebook's spotlib imports, the package ``__init__`` files
(imported with any submodule) and the runner, with everything they import in turn
(relative imports, also inside functions). A missing dep lets ``dvc repro`` skip a
stage whose code changed; an extra one reruns it for nothing.

The runner and the notebooks' setup (``paper/pipeline.py``, ``paper/config.py``,
``paper/stage.py``) count with their module-level imports only: the value checks
import, inside functions, the module of the stage they check (which that stage's
notebook imports anyway), and :class:`Stage` imports the backbones and saliency
modules only when a notebook calls ``stage.backbones()`` / ``stage.saliency()``,
which is counted from the notebook's text.
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
MODULE_LEVEL_ONLY = {"paper/pipeline", "paper/config", "paper/stage"}
LAZY_LOADERS = {"stage.backbones(": "paper/backbones", "stage.saliency(": "paper/saliency"}


def module_file(module: str) -> Path | None:
    """``spotlib/<module>.py`` or ``spotlib/<module>/__init__.py`` (module: a path like "paper/study")."""
    for path in (PACKAGE / f"{module}.py", PACKAGE / module / "__init__.py"):
        if path.exists():
            return path
    return None


def resolve(package: list[str], dotted: str | None, names: list[str]) -> set[str]:
    """Modules an ``from <package>.<dotted> import <names>`` reaches (names that are modules count)."""
    base = package + (dotted.split(".") if dotted else [])
    found = {"/".join(base)} if base and module_file("/".join(base)) else set()
    found |= {m for m in ("/".join(base + [n]) for n in names) if module_file(m)}
    for depth in range(1, len(base)):  # importing a submodule runs its packages' __init__
        found.add("/".join(base[:depth]))
    return found | {"__init__"}


def relative_imports(module: str) -> set[str]:
    """spotlib modules that ``module`` imports (``from .x import``, ``from ..x import``, ``from . import x``)."""
    path = module_file(module)
    tree = ast.parse(path.read_text())
    package = module.split("/")[:-1] if path.name != "__init__.py" else module.split("/")
    package = [] if module == "__init__" else package
    nodes = tree.body if module in MODULE_LEVEL_ONLY else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            up = package[: len(package) - (node.level - 1)]
            found |= resolve(up, node.module, [a.name for a in node.names])
    return {m for m in found if module_file(m)}


def notebook_imports(stage: str) -> set[str]:
    notebook = next((ROOT / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    found = set()
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        found |= {module for call, module in LAZY_LOADERS.items() if call in source}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in (a.name.split(".") for a in node.names if a.name.split(".")[0] == "spotlib"):
                    found |= resolve(alias[1:-1], alias[-1] if len(alias) > 1 else None, [])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spotlib":
                found |= resolve([], ".".join(node.module.split(".")[1:]) or None, [a.name for a in node.names])
    return {m for m in found if module_file(m)}


def code_of(stage: str) -> set[str]:
    """spotlib files a stage's run executes (see the module docstring)."""
    todo, seen = ["__init__", "paper/__init__", "paper/pipeline", *notebook_imports(stage)], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(relative_imports(module))
    return {module_file(m).relative_to(ROOT).as_posix() for m in seen}


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


def test_each_stage_tracks_only_its_own_params():
    """A stage's params are the profile's name and its own section: editing another stage's values, or a
    profile that is not running (profiles/*.yaml), reruns nothing else."""
    for stage, spec in STAGES.items():
        assert spec.get("params") == ["profile", stage], f"{stage}: params {spec.get('params')}"


if __name__ == "__main__":  # python tests/test_stage_deps.py: rewrite dvc.yaml's code deps from the imports
    import re

    text = (ROOT / "dvc.yaml").read_text()
    blocks = re.split(r"(?m)^(?=  \w+:\n    cmd:)", text)
    for i, block in enumerate(blocks[1:], 1):
        stage = block.split(":", 1)[0].strip()
        deps = [d for d in STAGES[stage]["deps"] if not d.startswith("spotlib/")] + sorted(code_of(stage))
        blocks[i] = re.sub(r"    deps:\n(      - .*\n)+", "    deps:\n" + "".join(f"      - {d}\n" for d in deps), block)
    (ROOT / "dvc.yaml").write_text("".join(blocks))
    print("dvc.yaml: code deps rewritten from the stages' imports")
