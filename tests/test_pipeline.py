"""params.yaml profiles, the notebooks' parameter cells, and the DVC pipeline end to end (smoke)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from spotlib.pipeline import deep_merge, load_params, notebook_for, repo_root

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_deep_merge_overrides_leaves_and_keeps_siblings():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    merged = deep_merge(base, {"a": {"c": [9]}, "e": 4})
    assert merged == {"a": {"b": 1, "c": [9]}, "d": 3, "e": 4}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 3}  # not mutated


def test_load_params_resolves_profiles_and_rejects_unknown():
    smoke = load_params("smoke", ROOT / "params.yaml")
    embedded = load_params("embedded", ROOT / "params.yaml")
    assert smoke["profile"] == "smoke" and "profiles" not in smoke
    assert smoke["data"]["train_size"] < 60000 and embedded["data"]["train_size"] is None
    # a nested override keeps the untouched siblings of the base section
    assert smoke["backbones"]["models"]["A"]["vit"]["patch_size"] == embedded["backbones"]["models"]["A"]["vit"]["patch_size"]
    with pytest.raises(ValueError, match="unknown profile 'nope'.*smoke"):
        load_params("nope", ROOT / "params.yaml")


def test_every_profile_declares_every_stage():
    """dvc.yaml declares profiles.<name>.<stage> for each stage; a missing key would break `dvc repro`."""
    profiles = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]
    for name, sections in profiles.items():
        assert set(STAGES) <= set(sections), f"profile {name} lacks {set(STAGES) - set(sections)}"


def test_unknown_stage_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown stage 'nope'; valid choices: .*backbones"):
        notebook_for("nope", ROOT)


def _parameters_cell(notebook: Path) -> dict:
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    for node in ast.parse(cell.source).body:
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("stage", STAGES)
def test_notebook_defaults_are_the_smoke_profile(stage):
    """Run in JupyterLab or by nbval, a notebook uses its defaults: they must be the smoke profile."""
    defaults = _parameters_cell(notebook_for(stage, ROOT))
    smoke = load_params("smoke", ROOT / "params.yaml")[stage]
    assert defaults.pop("profile") == "smoke"
    assert defaults.pop("out_root") == "build/smoke"
    assert defaults == smoke


def test_dvc_repro_smoke_end_to_end(tmp_path):
    """`dvc repro` on the smoke profile in a fresh copy: every stage runs, outputs appear, and a
    second `dvc repro` has nothing to do."""
    work = tmp_path / "workspace"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("figures/", "results/")) or f == "dvc.lock":
            continue  # outputs: the copy must make its own
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, work / f)
    params = (work / "params.yaml").read_text().replace("\nprofile: embedded\n", "\nprofile: smoke\n")
    (work / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)  # noqa: E731
    assert run("git", "init", "-q").returncode == 0
    repro = run("dvc", "repro")
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    for stage in STAGES:
        assert (work / "results" / "notebooks" / notebook_for(stage, work).name).exists()
    for table in ("results_A", "results_B", "transfer", "misalignment"):
        for suffix in (".csv", ".md", ".tex"):
            assert (work / "figures" / f"{table}{suffix}").stat().st_size > 0
    metrics = json.loads((work / "results" / "backbones" / "metrics.json").read_text())
    assert all(m["spot_view_vs_timm_max_abs_diff"] < 1e-5 for m in metrics.values())
    shown = run("dvc", "metrics", "show", "--json")
    assert shown.returncode == 0 and "spot_on_acc1" in shown.stdout
    again = run("dvc", "repro")
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout


def test_repo_root_is_found_from_a_subfolder():
    assert repo_root(ROOT / "notebooks") == ROOT
