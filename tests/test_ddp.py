"""spotlib.paper.finetune / spotlib.paper.train under torchrun: 2 CPU processes, gloo, DDP.

Every launch goes through ``python -m torch.distributed.run --standalone
--nproc_per_node=2`` as a subprocess (the venv's interpreter). Two launches use
a small test-only entry script (written to tmp) that calls
:func:`spotlib.paper.finetune.main` and either saves each rank's final weights (to
check that DDP kept the ranks in step) or makes rank 0 die with ``os._exit``
right after it wrote ``state.pt`` of the first epoch (a real kill: torchrun then
tears down rank 1, which waits at the barrier).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from spotlib.data import load_split
from spotlib.paper.train import TrainConfig, build_vit, train

REPO = Path(__file__).resolve().parents[1]
SPEC = dict(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
N_TRAIN = 240
# 225 = 7 global batches of 2 x 16 + 1 image: the last global batch leaves rank 1 with nothing.
TRAIN_SIZE = 225
KILL_EXIT = 17

ENTRY = textwrap.dedent(f"""
    import os, sys
    import spotlib.paper.train as T
    from spotlib.paper.finetune import main

    kill = os.environ.get("SPOTLIB_TEST_KILL_AFTER_EPOCH")
    if kill is not None:
        real = T.save_state

        def save(obj, path):
            real(obj, path)
            if os.path.basename(path) == "state.pt" and obj["epoch"] == int(kill):
                os._exit({KILL_EXIT})

        T.save_state = save
    model, log = main(sys.argv[1:])
    copies = os.environ.get("SPOTLIB_TEST_RANK_COPIES")
    if copies:
        from safetensors.torch import save_file
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
                  os.path.join(copies, "rank" + os.environ["RANK"] + ".safetensors"))
""")


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    """A DatasetDict on disk in build_dataset's format: 8x8 grey images, label = brighter."""
    import datasets

    rng = np.random.default_rng(0)
    out = workdir / "data"
    splits, stats = {}, None
    for split, n in (("train", N_TRAIN), ("test", 32)):
        labels = np.arange(n) % 2
        rng.shuffle(labels)
        images = (rng.integers(0, 80, (n, 1, 8, 8)) + labels[:, None, None, None] * 150).astype(np.uint8)
        features = datasets.Features({"image": datasets.Array3D(shape=(1, 8, 8), dtype="uint8"),
                                      "label": datasets.ClassLabel(names=["dark", "bright"])})
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        if split == "train":
            f = images.astype(np.float32) / 255
            stats = {"mean": [float(f.mean())], "std": [float(f.std())], "classes": ["dark", "bright"],
                     "sizes": {}, "image_shape": [8, 8]}
    datasets.DatasetDict(splits).save_to_disk(str(out))
    (out / "stats.json").write_text(json.dumps(stats))
    return out


@pytest.fixture(scope="module")
def init_weights(workdir) -> Path:
    torch.manual_seed(42)
    path = workdir / "init.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit(SPEC).state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def entry(workdir) -> Path:
    path = workdir / "ddp_entry.py"
    path.write_text(ENTRY)
    return path


def cli_args(dataset, init_weights, out, mode="spot", epochs=2, batch_size=16):
    return ["--data", str(dataset), "--vit", json.dumps(SPEC), "--init", str(init_weights), "--out", str(out),
            "--mode", mode, "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", "1e-2",
            "--min-tokens", "1", "--max-tokens", "6", "--priors", "uniform", "gaussian", "--seed", "3",
            "--train-size", str(TRAIN_SIZE)]


def torchrun(target: list[str], args: list[str], env: dict | None = None, timeout=120):
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 <target> <args>``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-4000:]}")
    return proc.returncode, out


def load(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def spot_run(workdir, dataset, init_weights, entry) -> Path:
    """An uninterrupted 2-process SPoT run, 2 epochs; each rank also saves its own final weights."""
    out, copies = workdir / "spot_run", workdir / "rank_copies"
    copies.mkdir()
    code, log = torchrun([str(entry)], cli_args(dataset, init_weights, out),
                         env={"SPOTLIB_TEST_RANK_COPIES": str(copies)})
    assert code == 0, log[-4000:]
    return out


# -- tests ---------------------------------------------------------------------------
def test_torchrun_spot_finetune_writes_trained_weights_and_ranks_agree(spot_run, workdir, init_weights):
    for name in ("model.safetensors", "state.pt", "log.csv", "log.json"):
        assert (spot_run / name).is_file(), name
    assert not list(spot_run.glob("*.tmp"))
    final, init = load(spot_run / "model.safetensors"), load(init_weights)
    assert final.keys() == init.keys()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], init[k]) for k in init)
    # DDP all-reduced the gradients of the SPoT view: both ranks (which drew different
    # token positions) end with the same weights, the ones rank 0 saved.
    copies = workdir / "rank_copies"
    assert_bitwise_equal(load(copies / "rank0.safetensors"), final)
    assert_bitwise_equal(load(copies / "rank1.safetensors"), final)
    log = pd.read_csv(spot_run / "log.csv")
    assert list(log.epoch) == [1, 2]
    assert np.isfinite(log.loss).all() and log.acc.between(0, 100).all()
    state = torch.load(spot_run / "state.pt", weights_only=False)
    assert state["epoch"] == 1 and state["world_size"] == 2


def test_torchrun_resume_after_a_kill_matches_uninterrupted_run(spot_run, workdir, dataset, init_weights, entry):
    out = workdir / "killed"
    args = cli_args(dataset, init_weights, out)
    code, log = torchrun([str(entry)], args, env={"SPOTLIB_TEST_KILL_AFTER_EPOCH": "0"})
    assert code != 0, log[-4000:]
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["epoch"] == 0 and state["world_size"] == 2
    assert not (out / "log.csv").exists()

    code, log = torchrun(["-m", "spotlib.paper.finetune"], args)  # the same command, run again
    assert code == 0, log[-4000:]
    assert_bitwise_equal(load(out / "model.safetensors"), load(spot_run / "model.safetensors"))
    resumed, reference = pd.read_csv(out / "log.csv"), pd.read_csv(spot_run / "log.csv")
    assert list(resumed.epoch) == [1, 2]
    assert resumed.loss.tolist() == reference.loss.tolist()

    # a checkpoint of 2 processes is not resumed by 1 (the global batch and the schedule differ)
    cfg = TrainConfig(mode="spot", epochs=2, batch_size=16, lr=1e-2, min_tokens=1, max_tokens=6,
                      priors=["uniform", "gaussian"], seed=3, train_size=TRAIN_SIZE)
    assert torch.load(out / "state.pt", weights_only=False)["config"] == {**vars(cfg)}
    with pytest.raises(ValueError, match="another world_size .world_size: 2.; resume with the same"):
        train(build_vit(SPEC), load_split(dataset, "train"), cfg, out)


def test_torchrun_grid_matches_single_process_with_the_global_batch(workdir, dataset, init_weights):
    """Grid mode has no per-rank randomness: 2 processes x 16 images per step take the same
    gradient steps as 1 process x 32 (DDP averages rank losses weighted by their share)."""
    out = workdir / "grid_ddp"
    code, log = torchrun(["-m", "spotlib.paper.finetune"], cli_args(dataset, init_weights, out, mode="grid", epochs=1))
    assert code == 0, log[-4000:]

    model = build_vit(SPEC)
    model.load_state_dict(load(init_weights))
    cfg = TrainConfig(mode="grid", epochs=1, batch_size=32, lr=1e-2, min_tokens=1, max_tokens=6,
                      priors=["uniform", "gaussian"], seed=3, train_size=TRAIN_SIZE)
    single_log = train(model, load_split(dataset, "train"), cfg, workdir / "grid_single")

    ddp, single = load(out / "model.safetensors"), model.state_dict()
    assert ddp.keys() == single.keys()
    # The attention key bias has a zero true gradient (softmax ignores a shift shared by all
    # keys), so its gradient is pure float round-off, which AdamW's normalisation blows up to
    # steps of order lr: it cannot agree between two summation orders. Everything else must.
    dim = SPEC["embed_dim"]
    key_bias = "blocks.0.attn.qkv.bias"
    torch.testing.assert_close(ddp[key_bias][dim : 2 * dim], single[key_bias][dim : 2 * dim], rtol=0, atol=0.1)
    ddp[key_bias][dim : 2 * dim] = single[key_bias][dim : 2 * dim]
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ddp_log = pd.read_csv(out / "log.csv")
    assert ddp_log.loss.tolist() == pytest.approx(single_log.loss.tolist(), rel=1e-5)
    assert ddp_log.acc.tolist() == pytest.approx(single_log.acc.tolist())


def test_torchrun_spot_finetune_on_smoke_data(tmp_path):
    """`torchrun -m spotlib.paper.finetune` with 2 gloo processes on the smoke profile's data (Fashion-MNIST) and
    its model A: the SPoT fine-tune of the pipeline, as a user would launch it on many GPUs."""
    from spotlib.paper.datasets import build_dataset
    from spotlib.paper.config import load_params

    params = load_params("smoke", REPO / "params.yaml")
    data = build_dataset(tmp_path / "data", **{**params["data"], "train_size": 256, "test_size": 64})
    model = params["backbones"]["models"]["A"]
    out = tmp_path / "spot"
    args = ["--data", str(data), "--vit", json.dumps(model["vit"]), "--out", str(out), "--mode", "spot",
            "--epochs", "1", "--batch-size", "32", "--min-tokens", str(model["spot"]["min_tokens"]),
            "--max-tokens", str(model["spot"]["max_tokens"]), "--priors", *model["spot"]["priors"]]
    code, log = torchrun(["-m", "spotlib.paper.finetune"], args)
    assert code == 0, log[-4000:]
    epochs = json.loads((out / "log.json").read_text())
    assert len(epochs) == 1 and np.isfinite(epochs[0]["loss"]) and "images_per_s" not in epochs[0]  # timings stay out
    build_vit(model["vit"]).load_state_dict(load(out / "model.safetensors"))  # strict: every weight, right shapes
