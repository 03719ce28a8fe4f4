"""Choosing the placers' learning rates on validation images (never on test), as params.yaml uses them.

The placement stage fits on the first ``train_size`` training images and scores its choices on the
last ``val_size`` (:func:`spotlib.paper.placement.validation_split`); this check uses the same split,
the sparsest budget and the first backbone, and trains each candidate learning rate with several
seeds (the policy's initial weights and batch order change with the seed). Rule, fixed before the
numbers were seen: the highest mean validation top-1 over seeds.

``python -m spotlib.paper.placement_recipe`` (after ``dvc repro backbones``; about 3 minutes on 2 CPU
cores) writes ``results/recipes/placement.csv`` and ``placement.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from ..data import load_split
from .backbones import load_backbones
from .io import write_text
from .placement import PlacementConfig, evaluate_placer, make_placer, teacher_logits, train_placer, validation_split

CANDIDATES = {"learned prior": {"epochs": 1, "lr": [5.0e-2, 1.0e-2]}, "learned policy": {"epochs": 3, "lr": [1.0e-2, 3.0e-3]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare placer learning rates on held-out training images.")
    parser.add_argument("--results", default="results", help="the pipeline's results folder (data, backbones)")
    parser.add_argument("--out", default="results/recipes", help="where placement.csv and placement.md go")
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=30_000)
    parser.add_argument("--val-size", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    results = Path(args.results)
    fit, val = validation_split(load_split(results / "data", "train"), args.train_size, args.val_size)
    name, pair = next(iter(load_backbones(results / "backbones" / "models.json", "cpu").items()))
    teacher = teacher_logits(pair["grid"], fit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, grid in CANDIDATES.items():
            for lr in grid["lr"]:
                for seed in args.seeds:
                    placer = make_placer(kind, args.tokens, fit, pair["spot"], seed=seed)
                    config = PlacementConfig(epochs=grid["epochs"], batch_size=256, lr=lr, seed=seed)
                    train_placer(placer, pair["spot"], fit, config, Path(tmp) / f"{kind}_{lr}_{seed}", teacher=teacher,
                                 desc=f"{kind} lr {lr:g} seed {seed}")
                    correct = evaluate_placer(placer.eval(), pair["spot"], val, None)["acc1"]
                    rows.append(dict(kind=kind, epochs=grid["epochs"], lr=lr, seed=seed,
                                     val_acc1=100 * correct.float().mean().item()))
    frame = pd.DataFrame(rows)
    summary = frame.groupby(["kind", "lr"], sort=False).val_acc1.agg(["mean", "std", "min", "max"]).reset_index()
    chosen = summary.loc[summary.groupby("kind", sort=False)["mean"].idxmax()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "placement.csv", frame.to_csv(index=False))
    write_text(out / "placement.md", "\n".join([
        f"# Placer learning rates on validation ({len(val):,} training images held out; fit on {len(fit):,}; "
        f"backbone {name}, {args.tokens} tokens, distillation loss)", "",
        "Command: `" + " ".join(["python -m spotlib.paper.placement_recipe", *argv]) + "`", "",
        "Rule: the highest mean validation top-1 over seeds " + ", ".join(map(str, args.seeds)) + ".", "",
        summary.assign(lr=summary.lr.map("lr {:g}".format)).to_markdown(index=False, floatfmt=".2f"), "",
        *[f"Chosen for the {r.kind}: **lr {r.lr:g}** ({r.mean:.2f} % mean)" for r in chosen.itertuples()], ""]))
    print((out / "placement.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
