"""params.yaml profiles and the papermill runner behind ``dvc.yaml``.

``params.yaml`` holds one section per stage (the values of the default,
embedded profile) and ``profiles: {name: {stage: overrides}}``. The active
profile is the top-level ``profile`` key (``dvc exp run -S profile=smoke``);
its overrides are deep-merged over the stage sections (a ``null`` in place of
a mapping removes it: ``models: {A: null}`` drops model A).

A stage runs ``python -m spotlib.pipeline <stage>``: it executes
``notebooks/<NN>_<stage>.ipynb`` with papermill, injecting every key of the
resolved stage section plus ``profile`` and ``out_root`` as parameters, and
writes the executed copy to ``results/notebooks/`` (atomically, so a killed
run leaves no half-written notebook behind).

``python -m spotlib.pipeline all --profile natural --out-root build/natural``
runs every stage in order without DVC, writing under another root, so a second
profile's results can sit beside the workspace's own.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"


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


def load_params(profile: str | None = None, path: str | Path | None = None) -> dict:
    """All stage sections of params.yaml resolved for ``profile`` (default: the file's ``profile``)."""
    path = Path(path) if path else repo_root() / PARAMS_FILE
    params = yaml.safe_load(path.read_text())
    profiles = params.pop("profiles", {}) or {}
    profile = profile or params.get("profile", "embedded")
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; valid choices: {', '.join(profiles)}")
    params["profile"] = profile
    return deep_merge(params, profiles[profile] or {})


def notebook_for(stage: str, root: Path) -> Path:
    matches = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(matches) != 1:
        names = sorted(p.stem.split("_", 1)[1] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"unknown stage {stage!r}; valid choices: {', '.join(names)}")
    return matches[0]


def run_stage(stage: str, profile: str | None = None, out_root: str = ".") -> Path:
    """Execute the stage's notebook with its resolved parameters; returns the executed copy's path."""
    import papermill

    root = repo_root()
    notebook = notebook_for(stage, root)
    params = load_params(profile, root / PARAMS_FILE)
    parameters = {**params.get(stage, {}), "profile": params["profile"], "out_root": out_root}
    out_dir = root / out_root / "results" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / notebook.name
    tmp = target.with_name(".tmp." + target.name)
    papermill.execute_notebook(str(notebook), str(tmp), parameters=parameters, cwd=str(root), progress_bar=False,
                               log_output=True)
    os.replace(tmp, target)
    return target


def stage_names(root: Path | None = None) -> list[str]:
    """The stages of dvc.yaml, in pipeline order."""
    root = root or repo_root()
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one pipeline stage's notebook with papermill.")
    parser.add_argument("stage", help="stage name, e.g. backbones (runs notebooks/NN_backbones.ipynb), or 'all'")
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's 'profile')")
    parser.add_argument("--out-root", default=".", help="where results/ and figures/ go (default: the repo root)")
    args = parser.parse_args(argv)
    # 'all' runs every stage in order, outside DVC: for a second profile beside the workspace's own results
    for stage in stage_names() if args.stage == "all" else [args.stage]:
        print(run_stage(stage, args.profile, args.out_root), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
