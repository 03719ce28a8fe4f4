"""Two layers: the core (``spotlib/*.py``: tokenizer, priors, ViT view, oracle, evaluation, the data
``Split``, small utils) imports nothing from the paper layer (``spotlib/paper/``: the pipeline, its
stages and analyses), and stays small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spotlib"
CORE = sorted(PACKAGE.glob("*.py"))
CORE_MAX_LINES = 1800  # the method and its learned placers (policy.py); the README's layout section gives the count
TOOLS = sorted((PACKAGE / "explore").glob("*.py"))  # the explorer: on the core, not the paper layer either


def paper_imports(path: Path) -> list[str]:
    """Every import of ``path`` (module level or inside functions) that reaches spotlib.paper."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            relative_hit = node.level == 1 and (module.split(".")[0] == "paper"
                                                or (not module and any(a.name == "paper" for a in node.names)))
            if relative_hit or module.startswith("spotlib.paper"):
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("spotlib.paper")]
    return found


@pytest.mark.parametrize("path", CORE + TOOLS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_nothing_from_the_paper_layer(path):
    assert not paper_imports(path), f"{path.name} imports the paper layer: {paper_imports(path)}"


def test_the_check_catches_a_paper_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from .paper.study import grid_gaps\n    from . import paper\n    import spotlib.paper.io\n")
    assert len(paper_imports(bad)) == 3


def test_core_stays_small():
    lines = sum(len(path.read_text().splitlines()) for path in CORE)
    assert lines <= CORE_MAX_LINES, f"the core has {lines} lines (> {CORE_MAX_LINES}): move what is not the method out"
