"""params.yaml profiles and the papermill runner behind ``dvc.yaml``.

``params.yaml`` holds one section per stage (the values of the default,
embedded profile) and ``profiles: {name: {stage: overrides}}``. The active
profile is the top-level ``profile`` key (``dvc exp run -S profile=smoke``);
its overrides are deep-merged over the stage sections (a ``null`` in place of
a mapping removes it: ``models: {A: null}`` drops model A).

A stage runs ``python -m spotlib.paper.pipeline <stage>``: it executes
``notebooks/<NN>_<stage>.ipynb`` with papermill, injecting every key of the
resolved stage section plus ``profile`` and ``out_root`` as parameters.

Configuration is strict: every section must name a stage of ``dvc.yaml``, and
the resolved section of a stage must set exactly the parameters its notebook
declares (its ``parameters`` cell), so a typo'd key or section is an error that
lists the valid ones, never a silent fall-back to the notebook's smoke
defaults. Values are checked (sizes, budgets, priors, ...) before any stage
runs: ``python -m spotlib.paper.pipeline check`` checks every profile.

The executed notebook, ``results/notebooks/<NN>_<stage>.ipynb``, is the stage's
completion record: it is removed when the stage starts and written (atomically)
only when every cell has run, so a killed stage never leaves an old complete
notebook beside half-rewritten results. Resumable training state lives in
``results/<stage>/resume/``, outside the stage's DVC outputs (DVC deletes those
before a rerun), and is removed when the stage completes.

``python -m spotlib.paper.pipeline all --profile natural --out-root build/natural``
runs every stage in order without DVC, writing under another root, so a second
profile's results can sit beside the workspace's own; ``-S stage.key=value``
overrides a value as ``dvc exp run -S`` would.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..utils import PROGRESS_ENV

PARAMS_FILE = "params.yaml"
RUNNER_PARAMETERS = ("profile", "out_root")  # every notebook declares these; the runner sets them


class ConfigError(ValueError):
    """A params.yaml value, key or section that the pipeline cannot run."""


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding dvc.yaml."""
    here = Path(start or os.getcwd()).resolve()
    for path in (here, *here.parents):
        if (path / "dvc.yaml").exists():
            return path
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run from inside the SPoT workspace")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in: dicts recursively, everything else replaced,
    and a ``null`` override of a dict removes it (so a profile can drop the default's models)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_names(root: Path | None = None) -> list[str]:
    """The stages of dvc.yaml, in pipeline order."""
    root = root or repo_root()
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def _check_sections(sections: Mapping, stages: list[str], where: str) -> None:
    unknown = [name for name in sections if name not in stages]
    if unknown:
        raise ConfigError(f"{where}: unknown stage section(s) {', '.join(map(repr, unknown))}; "
                          f"valid choices: {', '.join(stages)}")


def load_params(profile: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> dict:
    """All stage sections of params.yaml resolved for ``profile`` (default: the file's ``profile``).

    ``overrides``: ``"stage.key.sub=value"`` strings (the value is read as YAML), applied after the
    profile, like ``dvc exp run -S``. Unknown profiles and sections are errors naming the valid ones.
    """
    path = Path(path) if path else repo_root() / PARAMS_FILE
    params = yaml.safe_load(path.read_text())
    stages = stage_names(path.parent)
    profiles = params.pop("profiles", {}) or {}
    overrides = list(overrides or [])
    for item in [o for o in overrides if o.split("=", 1)[0].strip() == "profile"]:
        profile = item.split("=", 1)[1].strip()
        overrides.remove(item)
    profile = profile or params.get("profile", "embedded")
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; valid choices: {', '.join(profiles)}")
    params.pop("profile", None)
    _check_sections(params, stages, f"{path.name}")
    for name, sections in profiles.items():
        _check_sections(sections or {}, stages, f"{path.name}: profiles.{name}")
    resolved = deep_merge(params, profiles[profile] or {})
    for item in overrides:
        resolved = apply_override(resolved, item, stages)
    resolved["profile"] = profile
    return resolved


def apply_override(params: dict, item: str, stages: list[str]) -> dict:
    """``params`` with one ``"stage.key.sub=value"`` override applied (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like stage.key=value, e.g. oracle.test_size=100")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    if keys[0] not in stages or len(keys) < 2:
        raise ConfigError(f"override {item!r}: the key must start with a stage and name a key in it "
                          f"(stage.key=value); stages: {', '.join(stages)}")
    patch: Any = yaml.safe_load(value)
    for key in reversed(keys):
        patch = {key: patch}
    return deep_merge(params, patch)


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


# -- values ------------------------------------------------------------------------------------
def _integer(value, minimum: int, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"an integer >= {minimum}" + (" or null" if allow_none else "")
    return None


def _positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return None if ok else "a number > 0"


def _budgets(value) -> str | None:
    ok = isinstance(value, list) and value and all(_integer(v, 1) is None for v in value) and len(set(value)) == len(value)
    return None if ok else "a non-empty list of distinct integers >= 1 (token counts)"


def _prior_names(value) -> str | None:
    from ..priors import PRIORS

    if not isinstance(value, list) or not value:
        return f"a non-empty list of priors from: {', '.join(PRIORS)}"
    bad = [v for v in value if v not in PRIORS]
    return f"a list of priors from: {', '.join(PRIORS)} (unknown: {', '.join(map(repr, bad))})" if bad else None


def _choice(choices: Callable[[], Any]) -> Callable[[Any], str | None]:
    def check(value):
        valid = list(choices())
        return None if value in valid else f"one of: {', '.join(valid)}"

    return check


def _data_sources():
    from .datasets import SOURCES

    return SOURCES


def _saliency_sources():
    from .saliency import SALIENCY_SOURCES

    return sorted(SALIENCY_SOURCES)


def _backbone_specs(value) -> str | None:
    from .backbones import check_backbone_spec

    if not isinstance(value, dict) or not value:
        return "a mapping {name: backbone spec} with at least one backbone"
    for name, spec in value.items():
        check_backbone_spec(name, spec)  # raises with its own message
    return None


def _sparsifier_train(value) -> str | None:
    from .sparsify import SparsifyConfig

    if not isinstance(value, dict):
        return "a mapping of SparsifyConfig fields"
    SparsifyConfig.from_spec(value)  # raises with its own message
    return None


# Checks by key name (any stage), then by (stage, key); each returns None or what the value must be.
KEY_RULES: dict[str, Callable[[Any], str | None]] = {
    **{key: functools.partial(_integer, minimum=1, allow_none=True)
       for key in ("train_size", "test_size", "bank_size", "eval_size", "train_per_class")},
    **{key: functools.partial(_integer, minimum=1)
       for key in ("batch_size", "throughput_batch", "image_size", "knn_k", "workers", "interdependence_size",
                   "interdependence_budget", "hidden")},
    "seed": functools.partial(_integer, minimum=0),
    "steps": functools.partial(_integer, minimum=0),
    "prune_after": functools.partial(_integer, minimum=0),
    "channels": lambda v: None if v in (1, 3) else "1 or 3",
    "resize": functools.partial(_integer, minimum=1, allow_none=True),
    "lr": _positive_number,
    "knn_temperature": _positive_number,
    "budgets": _budgets,
    "priors": _prior_names,
    "init_priors": _prior_names,
}
STAGE_RULES: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("data", "source"): _choice(_data_sources),
    ("saliency", "source"): _choice(_saliency_sources),
    ("backbones", "models"): _backbone_specs,
    ("sparsification", "train"): _sparsifier_train,
}


def check_stage(stage: str, section: Mapping, root: Path | None = None) -> None:
    """Raise :class:`ConfigError` unless ``section`` sets exactly the stage notebook's parameters,
    each with a valid value."""
    root = root or repo_root()
    declared = [p for p in notebook_parameters(stage, root) if p not in RUNNER_PARAMETERS]
    if not isinstance(section, Mapping):
        raise ConfigError(f"params for stage {stage!r} must be a mapping of its parameters: {', '.join(declared)}")
    unknown = [k for k in section if k not in declared]
    if unknown:
        raise ConfigError(f"stage {stage!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(declared)}")
    missing = [k for k in declared if k not in section]
    if missing:
        raise ConfigError(f"stage {stage!r}: params.yaml does not set {', '.join(map(repr, missing))} (its notebook "
                          f"would fall back to the smoke defaults); set every key: {', '.join(declared)}")
    for key, value in section.items():
        rule = STAGE_RULES.get((stage, key)) or KEY_RULES.get(key)
        try:
            problem = rule(value) if rule else None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"stage {stage!r}, key {key!r}: {err}") from err
        if problem:
            raise ConfigError(f"stage {stage!r}, key {key!r} must be {problem}; got {value!r}")


def check_params(params: Mapping, stages: list[str] | None = None, root: Path | None = None) -> None:
    """Check every stage section of resolved ``params`` (see :func:`check_stage`)."""
    root = root or repo_root()
    for stage in stages or stage_names(root):
        if stage not in params:
            raise ConfigError(f"params.yaml has no section for stage {stage!r}")
        check_stage(stage, params[stage], root)


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


def enter_stage(stage: str, namespace: Mapping) -> Path:
    """The first line of a stage notebook's setup cell: work from the repository root (the notebooks'
    paths are relative to it) and refuse unknown injected parameters. Returns the root."""
    root = repo_root()
    os.chdir(root)
    check_parameters(stage, namespace)
    return root


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


def resume_dir(stage: str, out_root: str | Path = ".") -> Path:
    """The stage's resumable scratch state (outside its DVC outputs; removed when the stage completes)."""
    return Path(out_root) / "results" / stage / "resume"


def run_stage(stage: str, profile: str | None = None, out_root: str = ".",
              overrides: list[str] | None = None) -> Path:
    """Execute the stage's notebook with its resolved, checked parameters; returns the executed copy's path."""
    import papermill

    root = repo_root()
    notebook = notebook_for(stage, root)
    params = load_params(profile, root / PARAMS_FILE, overrides)
    check_stage(stage, params.get(stage, {}), root)
    check_upstream(stage, out_root, root)
    parameters = {**params[stage], "profile": params["profile"], "out_root": out_root}
    target = executed_notebook(stage, out_root, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # no stale completion record while the stage's outputs are rewritten
    tmp = target.with_name(".tmp." + target.name)
    # text progress bars: papermill logs each cell's output as it comes (the terminal, DVC's output), and
    # the executed notebook keeps readable text instead of widget placeholders
    os.environ.setdefault(PROGRESS_ENV, "text")
    papermill.execute_notebook(str(notebook), str(tmp), parameters=parameters, cwd=str(root), progress_bar=False,
                               log_output=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    shutil.rmtree(root / resume_dir(stage, out_root), ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run pipeline stages' notebooks with papermill, or check params.yaml.",
        epilog="examples: python -m spotlib.paper.pipeline backbones | "
               "python -m spotlib.paper.pipeline all --profile smoke --out-root build/try -S oracle.test_size=20 | "
               "python -m spotlib.paper.pipeline check")
    parser.add_argument("stage", help="a stage of dvc.yaml (runs notebooks/NN_<stage>.ipynb), 'all' (every stage "
                                      "in order), or 'check' (validate every profile, run nothing)")
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's 'profile')")
    parser.add_argument("--out-root", default=".", help="where results/ and figures/ go (default: the repo root)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a value for this run (YAML value), like dvc exp run -S; repeatable")
    args = parser.parse_args(argv)
    # papermill logs the notebook's outputs (progress, prints) at INFO: show them, without its own chatter
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    papermill_log = logging.getLogger("papermill")
    papermill_log.setLevel(logging.INFO)
    papermill_log.addFilter(lambda record: not str(record.msg).startswith(("Executing", "Ending Cell", "Input Notebook",
                                                                            "Output Notebook")))
    root = repo_root()
    stages = stage_names(root)
    try:
        if args.stage == "check":
            profiles = yaml.safe_load((root / PARAMS_FILE).read_text()).get("profiles", {})
            for name in ([args.profile] if args.profile else profiles):
                check_params(load_params(name, root / PARAMS_FILE, args.overrides), stages, root)
                print(f"profile {name}: every stage's parameters are valid", flush=True)
            return 0
        selected = stages if args.stage == "all" else [args.stage]
        if args.stage != "all":
            notebook_for(args.stage, root)  # unknown stage: the error lists the valid ones
            check_upstream(args.stage, args.out_root, root)
        # check every selected stage before running the first, so a typo never costs a training run
        check_params(load_params(args.profile, root / PARAMS_FILE, args.overrides), selected, root)
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for stage in selected:
        print(f"stage {stage}: running {notebook_for(stage, root).name}", flush=True)
        print(run_stage(stage, args.profile, args.out_root, args.overrides), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
