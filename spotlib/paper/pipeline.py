"""The papermill runner behind ``dvc.yaml``: one stage = one notebook.

A stage runs ``python -m spotlib.paper.pipeline <stage>``: it executes
``notebooks/<NN>_<stage>.ipynb`` with papermill, passing only ``profile``,
``out_root`` and ``overrides``; the notebook's first setup line,
:class:`spotlib.paper.stage.Stage`, reads its own section of params.yaml
(:mod:`spotlib.paper.config`), so no value is copied into a notebook.

The executed notebook, ``results/notebooks/<NN>_<stage>.ipynb``, is the stage's
completion record: it is removed when the stage starts and written (atomically)
only when every cell has run, so a killed stage never leaves an old complete
notebook beside half-rewritten results. Resumable training state lives in
``results/<stage>/resume/``, outside the stage's DVC outputs (DVC deletes those
before a rerun), and is removed when the stage completes.

``python -m spotlib.paper.pipeline all --profile natural --out-root build/natural``
runs every stage in order without DVC, writing under another root, so a second
profile's results can sit beside the workspace's own; ``-S stage.key=value``
overrides a value as ``dvc exp run -S`` would. ``... exp --profile smoke`` runs
the DVC pipeline on a profile as a temporary experiment (``make repro PROFILE=smoke``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import nbformat
import yaml
from traitlets.config import Config

from ..utils import PROGRESS_ENV
from .io import atomic_path
from .config import (PARAMS_FILE, ConfigError, check_params, check_stage, dvc_overrides, load_params, profile_names,
                     repo_root)

RUNNER_PARAMETERS = ("profile", "out_root", "overrides")  # every stage notebook declares exactly these


def stage_names(root: Path | None = None) -> list[str]:
    """The stages of dvc.yaml, in pipeline order."""
    root = root or repo_root()
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def notebook_for(stage: str, root: Path) -> Path:
    matches = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(matches) != 1:
        names = sorted(p.stem.split("_", 1)[1] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"unknown stage {stage!r}; valid choices: {', '.join(names)}")
    return matches[0]


@functools.lru_cache(maxsize=None)
def _declared_parameters(notebook: Path, mtime: float) -> tuple[str, ...]:
    import papermill

    return tuple(papermill.inspect_notebook(str(notebook)))


def notebook_parameters(stage: str, root: Path | None = None) -> list[str]:
    """The parameter names the stage's notebook declares in its ``parameters`` cell (papermill's view)."""
    notebook = notebook_for(stage, root or repo_root())
    return list(_declared_parameters(notebook, notebook.stat().st_mtime))


def check_parameters(stage: str, namespace: Mapping) -> None:
    """Inside a stage notebook: refuse parameters injected by papermill (``-p name value``) that the
    notebook does not declare (papermill itself only warns). Call it after the parameters cell."""
    declared = set(notebook_parameters(stage))
    history = namespace.get("In") or []
    injected = next((cell for cell in reversed(history) if cell.lstrip().startswith("# Parameters")), None)
    if injected is None:
        return
    import ast

    names = [t.id for node in ast.parse(injected).body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)]
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise ConfigError(f"stage {stage!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"valid parameters: {', '.join(sorted(declared))}")


# -- executed notebooks ------------------------------------------------------------------------
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
IGNORE_OUTPUT = "# NBVAL_IGNORE_OUTPUT"


def output_is_compared(cell) -> bool:
    """Whether ``pytest --nbval`` compares this code cell's outputs (no ``# NBVAL_IGNORE_OUTPUT``/``SKIP`` line).
    Such a cell must not show a progress bar: its text changes on every run."""
    lines = {line.strip() for line in cell.source.splitlines()}
    return not lines & {IGNORE_OUTPUT, "# NBVAL_SKIP"}


def clean_notebook(notebook):
    """An executed notebook as it is stored: no widget state, no execution timestamps or papermill
    metadata, progress-bar widgets reduced to their text."""
    for key in ("widgets", "papermill"):
        notebook.metadata.pop(key, None)
    for cell in notebook.cells:
        for key in ("execution", "papermill"):
            cell.metadata.pop(key, None)
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_VIEW, None)
    return notebook


# -- running -----------------------------------------------------------------------------------
def executed_notebook(stage: str, out_root: str | Path = ".", root: Path | None = None) -> Path:
    """Where the stage's executed notebook (its completion record) goes."""
    root = root or repo_root()
    return root / out_root / "results" / "notebooks" / notebook_for(stage, root).name


def upstream_stages(stage: str, root: Path | None = None) -> list[str]:
    """The stages whose outputs ``stage`` reads (its non-code deps in dvc.yaml), in pipeline order."""
    root = root or repo_root()
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    producer = {}
    for name, spec in stages.items():
        for out in spec.get("outs", []) + spec.get("metrics", []):
            producer[next(iter(out)) if isinstance(out, dict) else out] = name
    needed = {producer[dep] for dep in stages[stage].get("deps", []) if dep in producer}
    return [name for name in stages if name in needed]


def check_upstream(stage: str, out_root: str | Path = ".", root: Path | None = None) -> None:
    """Refuse to run ``stage`` on the outputs of a stage that did not complete (a killed run leaves
    no executed notebook): outside DVC nothing else would notice half-rewritten inputs."""
    root = root or repo_root()
    for name in upstream_stages(stage, root):
        record = executed_notebook(name, out_root, root)
        if not record.exists():
            raise ConfigError(
                f"stage {stage!r} reads the outputs of stage {name!r}, which has not completed under "
                f"{Path(out_root) / 'results'} (no {record}); run `python -m spotlib.paper.pipeline {name} --out-root "
                f"{out_root}` first (or `dvc repro {stage}` for the workspace)")


def stage_outputs(stage: str, root: Path | None = None) -> list[str]:
    """The paths ``stage`` writes (its outs and metrics in dvc.yaml), relative to an out_root."""
    root = root or repo_root()
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    return [next(iter(out)) if isinstance(out, dict) else out for out in spec.get("outs", []) + spec.get("metrics", [])]


def missing_upstream(stage: str, out_root: str | Path = ".", root: Path | None = None) -> list[str]:
    """The stages ``stage`` needs, directly or through another, that have left no outputs under
    ``out_root`` (pipeline order): what a notebook opened on its own must build first. The executed
    notebook (a pipeline run's completion record) is not required, as an in-place run writes none."""
    root = root or repo_root()
    needed, frontier = set(), [stage]
    while frontier:
        for name in upstream_stages(frontier.pop(), root):
            if name not in needed:
                needed.add(name)
                frontier.append(name)
    record = "results/notebooks/"
    return [name for name in stage_names(root) if name in needed and not all(
        (root / out_root / out).exists() for out in stage_outputs(name, root) if not out.startswith(record))]


def resume_dir(stage: str, out_root: str | Path = ".") -> Path:
    """The stage's resumable scratch state (outside its DVC outputs; removed when the stage completes)."""
    return Path(out_root) / "results" / stage / "resume"


def run_stage(stage: str, profile: str | None = None, out_root: str = ".",
              overrides: list[str] | None = None, require_upstream: bool = True) -> Path:
    """Execute the stage's notebook with its resolved, checked parameters; returns the executed copy's path.
    ``require_upstream=False`` skips the completion-record check (upstream outputs built in place)."""
    import papermill

    root = repo_root()
    notebook = notebook_for(stage, root)
    params = load_params(profile, root / PARAMS_FILE, overrides)
    check_stage(stage, params.get(stage, {}))
    if require_upstream:
        check_upstream(stage, out_root, root)
    parameters = {"profile": params["profile"], "out_root": out_root, "overrides": list(overrides or [])}
    target = executed_notebook(stage, out_root, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # no stale completion record while the stage's outputs are rewritten
    # text progress bars: papermill logs each cell's output as it comes (the terminal, DVC's output), and
    # the executed notebook keeps readable text instead of widget placeholders
    progress_mode = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "text"
    try:
        with atomic_path(target) as tmp:
            # the kernel talks over local IPC sockets, not TCP: nothing listens on a port, and ipykernel's
            # "running over TCP without encryption" warning no longer opens every stage's log
            executed = papermill.execute_notebook(str(notebook), str(tmp), parameters=parameters, cwd=str(root),
                                                  progress_bar=False, log_output=True,
                                                  config=Config({"KernelManager": {"transport": "ipc"}}))
            nbformat.write(clean_notebook(executed), str(tmp))  # small, diffable, readable in JupyterLab
    finally:  # a notebook that built its upstream through run_stage keeps its own progress bars
        if progress_mode is None:
            os.environ.pop(PROGRESS_ENV)
        else:
            os.environ[PROGRESS_ENV] = progress_mode
    shutil.rmtree(root / resume_dir(stage, out_root), ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run pipeline stages' notebooks with papermill, or check params.yaml.",
        epilog="examples: python -m spotlib.paper.pipeline backbones | "
               "python -m spotlib.paper.pipeline all --profile smoke --out-root build/try -S oracle.test_size=20 | "
               "python -m spotlib.paper.pipeline check | python -m spotlib.paper.pipeline exp --profile smoke")
    parser.add_argument("stage", help="a stage of dvc.yaml (runs notebooks/NN_<stage>.ipynb), 'all' (every stage "
                                      "in order), 'check' (validate every profile, run nothing) or 'exp' (dvc exp "
                                      "run --temp of the whole pipeline with --profile applied to params.yaml)")
    parser.add_argument("--profile", default=None, help="embedded (params.yaml) or profiles/<name>.yaml (default: params.yaml's 'profile')")
    parser.add_argument("--out-root", default=".", help="where results/ and figures/ go (default: the repo root)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a value for this run (YAML value), like dvc exp run -S; repeatable")
    args = parser.parse_args(argv)
    # papermill logs the notebook's outputs (progress, prints) at INFO: show them, without its own chatter
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    papermill_log = logging.getLogger("papermill")
    papermill_log.setLevel(logging.INFO)
    papermill_log.addFilter(lambda record: not str(record.msg).startswith((
        "Executing", "Ending Cell", "Input Notebook", "Output Notebook", "Working directory")))
    root = repo_root()
    stages = stage_names(root)
    try:
        if args.stage == "check":
            for name in ([args.profile] if args.profile else profile_names(root)):
                check_params(load_params(name, root / PARAMS_FILE, args.overrides), stages)
                print(f"profile {name}: every stage's parameters are valid", flush=True)
            return 0
        if args.stage == "exp":  # the DVC pipeline on a profile, as a temporary experiment
            profile = args.profile or "embedded"
            check_params(load_params(profile, root / PARAMS_FILE, args.overrides), stages)
            sets = [*dvc_overrides(profile, root), *(f"++{o}" for o in args.overrides)]
            return subprocess.call(["dvc", "exp", "run", "--temp", *(a for s in sets for a in ("-S", s))], cwd=root)
        selected = stages if args.stage == "all" else [args.stage]
        if args.stage != "all":
            notebook_for(args.stage, root)  # unknown stage: the error lists the valid ones
        # check every selected stage before running the first, so a typo never costs a training run
        check_params(load_params(args.profile, root / PARAMS_FILE, args.overrides), selected)
        if args.stage != "all":
            check_upstream(args.stage, args.out_root, root)
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for stage in selected:
        started, place = time.monotonic(), f"{stages.index(stage) + 1}/{len(stages)}"  # its place in dvc.yaml
        print(f"stage {place} {stage}: running {notebook_for(stage, root).name}", flush=True)
        executed = run_stage(stage, args.profile, args.out_root, args.overrides)
        print(f"stage {place} {stage}: done in {time.monotonic() - started:.0f} s -> {executed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
