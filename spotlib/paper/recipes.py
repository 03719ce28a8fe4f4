"""Choosing the embedded backbones' training recipe on a validation split (never on the test set).

The grid ViT and its SPoT fine-tune are trained on part of the training split and scored on the
held-out rest (``val_size`` images drawn with a fixed seed), so the choice of recipe never sees a
test image. Two comparisons, each against a rule fixed before the numbers were seen:

* **grid recipes** (architecture and epochs at a similar cost): the highest validation top-1 at the
  full grid;
* **SPoT fine-tunes** of the chosen grid ViT: among the recipes that keep full-grid validation top-1
  within ``tolerance`` points of the grid ViT's, the highest mean top-1 over the sparse budgets and
  fixed priors; if none does, the one that loses least at the full grid.

``python -m spotlib.paper.recipes --data results/data --out results/recipes`` runs both (about 15
minutes on 2 CPU cores) and writes ``grid.csv``, ``spot.csv`` and ``recipes.md`` (the tables, the
rule and the choice); params.yaml's ``backbones`` section holds the chosen recipe. The candidates
are :data:`GRID_RECIPES` and :data:`SPOT_RECIPES`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ..data import Split, load_split
from ..evaluate import sweep
from ..vit import SPoTViT
from .io import write_text
from .train import TrainConfig, build_vit, train

VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=4)
GRID_RECIPES = {  # similar cost on a CPU: width 64 trains about twice as fast as width 96
    "w96 d4, 2 epochs": (dict(embed_dim=96, num_heads=3), dict(epochs=2)),
    "w64 d4, 3 epochs": (dict(embed_dim=64, num_heads=2), dict(epochs=3)),
    "w64 d4, 4 epochs": (dict(embed_dim=64, num_heads=2), dict(epochs=4)),
}
GRID_BASE = dict(batch_size=128, lr=3.0e-3, weight_decay=0.05, seed=0)
ALL_PRIORS = ["uniform", "gaussian", "sobol", "isotropic", "center", "grid"]
SPOT_RECIPES = {
    "uniform, 1 epoch, lr 1e-3 (the earlier recipe)": dict(epochs=1, lr=1.0e-3, priors=["uniform"]),
    "mixed priors + 25% full grid, 1 epoch, lr 1e-3": dict(epochs=1, lr=1.0e-3, priors=ALL_PRIORS, grid_fraction=0.25),
    "mixed priors + 25% full grid, 1 epoch, lr 3e-4": dict(epochs=1, lr=3.0e-4, priors=ALL_PRIORS, grid_fraction=0.25),
    "mixed priors + 50% full grid, 1 epoch, lr 1e-3": dict(epochs=1, lr=1.0e-3, priors=ALL_PRIORS, grid_fraction=0.5),
    "mixed priors + 25% full grid, 2 epochs, lr 1e-3": dict(epochs=2, lr=1.0e-3, priors=ALL_PRIORS, grid_fraction=0.25),
    "mixed priors + 50% full grid, 1 epoch, lr 3e-4": dict(epochs=1, lr=3.0e-4, priors=ALL_PRIORS, grid_fraction=0.5),
    "mixed priors + 75% full grid, 1 epoch, lr 1e-3": dict(epochs=1, lr=1.0e-3, priors=ALL_PRIORS, grid_fraction=0.75),
}
SPOT_BASE = dict(batch_size=128, weight_decay=0.05, seed=0, min_tokens=4, max_tokens=49)
SPARSE = dict(budgets=[6, 12, 25], priors=["uniform", "gaussian", "sobol", "isotropic", "center"])


def validation_split(train_split: Split, val_size: int, seed: int = 0) -> tuple[Split, Split]:
    """(fit, val): ``val_size`` training images drawn with ``seed`` held out, the rest to fit on."""
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))
    return train_split.subset(order[val_size:].sort().values), train_split.subset(order[:val_size].sort().values)


def _score(view: SPoTViT, val: Split, budgets, priors, device) -> dict:
    full = view.num_grid_tokens
    tidy = pd.concat([sweep({"m": view}, {"m": ["grid"]}, [full], val, None, device=device),
                      sweep({"m": view}, {"m": priors}, budgets, val, None, device=device)])
    acc = tidy.set_index(["prior", "tokens"]).value
    sparse = tidy[tidy.tokens != full]
    return {"full_grid": acc["grid", full], "sparse_mean": sparse.value.mean(),
            **{f"{p} {n}": acc[p, n] for p, n in zip(sparse.prior, sparse.tokens)}}


def compare_grid_recipes(fit: Split, val: Split, recipes=GRID_RECIPES, device="cpu",
                         epochs_scale: float = 1.0) -> tuple[pd.DataFrame, dict]:
    """Train each grid recipe on ``fit``; val top-1 at the full grid and at the sparse budgets (random cells)."""
    rows, models = [], {}
    for name, (arch, config) in recipes.items():
        torch.manual_seed(GRID_BASE["seed"])
        vit = build_vit({**VIT, **arch})
        cfg = TrainConfig(mode="grid", **{**GRID_BASE, **config,
                                          "epochs": max(1, round(config["epochs"] * epochs_scale))})
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:  # weights and resumable state of a throwaway run
            log = train(vit, fit, cfg, scratch, device)
        models[name] = vit
        score = _score(SPoTViT(vit), val, SPARSE["budgets"], ["grid"], device)
        rows.append(dict(recipe=name, vit=str(arch), **{k: v for k, v in cfg.__dict__.items() if k in config},
                         train_minutes=(time.perf_counter() - start) / 60, train_acc=log.acc.iloc[-1], **score))
    return pd.DataFrame(rows), models


def compare_spot_recipes(grid_vit, fit: Split, val: Split, recipes=SPOT_RECIPES, device="cpu",
                         epochs_scale: float = 1.0) -> pd.DataFrame:
    """Fine-tune a copy of ``grid_vit`` with each SPoT recipe; val top-1 at the full grid and sparse budgets."""
    reference = _score(SPoTViT(grid_vit), val, SPARSE["budgets"], SPARSE["priors"], device)
    rows = [dict(recipe="(the grid ViT, not fine-tuned)", **reference)]  # its column order leads
    for name, config in recipes.items():
        tuned = copy.deepcopy(grid_vit)
        cfg = TrainConfig(mode="spot", **{**SPOT_BASE, **config,
                                          "epochs": max(1, round(config["epochs"] * epochs_scale))})
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            train(tuned, fit, cfg, scratch, device)
        score = _score(SPoTViT(tuned), val, SPARSE["budgets"], SPARSE["priors"], device)
        rows.append(dict(recipe=name, full_grid=score.pop("full_grid"), sparse_mean=score.pop("sparse_mean"),
                         train_minutes=(time.perf_counter() - start) / 60, **score))
    frame = pd.DataFrame(rows)
    frame.insert(2, "full_grid_drop", reference["full_grid"] - frame.full_grid)
    return frame


def choose_spot(frame: pd.DataFrame, tolerance: float = 1.0) -> str:
    """The rule of the module docstring, applied to :func:`compare_spot_recipes`'s frame."""
    tuned = frame.iloc[1:]
    kept = tuned[tuned.full_grid_drop <= tolerance]
    return (kept.sort_values("sparse_mean").iloc[-1] if len(kept) else tuned.sort_values("full_grid_drop").iloc[0]).recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare training recipes on a validation split carved from training.")
    parser.add_argument("--data", default="results/data", help="a dataset built by the data stage")
    parser.add_argument("--out", default="results/recipes", help="where grid.csv, spot.csv and recipes.md go")
    parser.add_argument("--val-size", type=int, default=10_000)
    parser.add_argument("--train-size", type=int, default=None, help="fit on the first n of the rest (default all)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="scale every recipe's epochs (quick checks)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="allowed full-grid drop of a SPoT recipe (pts)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    fit, val = validation_split(load_split(args.data, "train"), args.val_size)
    fit = fit.head(args.train_size)
    grid, models = compare_grid_recipes(fit, val, epochs_scale=args.epochs_scale)
    best_grid = grid.sort_values("full_grid").iloc[-1].recipe
    spot = compare_spot_recipes(models[best_grid], fit, val, epochs_scale=args.epochs_scale)
    best_spot = choose_spot(spot, args.tolerance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "grid.csv", grid.to_csv(index=False))
    write_text(out / "spot.csv", spot.to_csv(index=False))
    write_text(out / "recipes.md", "\n".join([
        f"# Recipes compared on a validation split ({len(val):,} training images held out; fit on {len(fit):,})",
        "", "Command: `python -m spotlib.paper.recipes " + " ".join(argv) + "`", "",
        "## Grid ViT (rule: highest validation top-1 at the full grid)", "",
        grid.drop(columns=["vit"]).to_markdown(index=False, floatfmt=".2f"), "", f"Chosen: **{best_grid}**", "",
        f"## SPoT fine-tune of it (rule: full-grid drop <= {args.tolerance} pt, then highest mean sparse top-1 "
        f"over {SPARSE['budgets']} tokens x {', '.join(SPARSE['priors'])}; else the smallest drop)", "",
        spot.to_markdown(index=False, floatfmt=".2f"), "", f"Chosen: **{best_spot}**", ""]))
    print((out / "recipes.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
