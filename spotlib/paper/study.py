"""The paper's analyses, shared by the stage notebooks: each returns tidy frames they save and plot.

Conventions: accuracies are in percent; a tidy result frame has one row per (backbone, model,
prior, oracle, tokens, metric) with its ``value`` (see :func:`spotlib.evaluate.sweep`); the oracle's
positions are saved in one safetensors file under :func:`position_key` names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from ..data import Split, for_model
from ..evaluate import draw_positions, evaluate
from ..oracle import OracleResult, one_at_a_time, spot_on, spot_on_split
from ..tokenizer import sample_points, snap_to_grid
from ..vit import SPoTViT
from .stats import bootstrap_ci, paired_permutation_test


def position_key(backbone: str, prior: str, tokens: int, kind: str) -> str:
    """Name of an oracle tensor in ``positions.safetensors``: kind is final, loss or trajectory."""
    return f"{backbone}/{prior}/{tokens}/{kind}"


def acc1(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.metric == "acc1"]


def best_prior(sweep: pd.DataFrame, metric: str = "acc1") -> pd.Series:
    """The best SPoT prior's value without the oracle flag, per (backbone, tokens)."""
    plain = sweep[(sweep.model == "SPoT") & ~sweep.oracle & (sweep.metric == metric)]
    return plain.groupby(["backbone", "tokens"]).value.max()


def spot_on_rows(oracle: pd.DataFrame) -> pd.DataFrame:
    """The SPoT-ON rows of the oracle table, from its first starting prior (the table's SPoT-ON row)."""
    return oracle[(oracle.model == "SPoT-ON") & (oracle.prior == oracle.prior.iloc[0])]


# -- case study 1 ------------------------------------------------------------------------------
def grid_gaps(tidy: pd.DataFrame, priors: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per backbone/budget: the best off-grid SPoT prior minus the Patch Grid, and minus SPoT on the grid."""
    acc = tidy.set_index(["backbone", "model", "prior", "tokens"])["value"]
    gaps = {}
    for (name, n), _ in tidy.groupby(["backbone", "tokens"], sort=False):
        best = max(acc[name, "SPoT", p, n] for p in priors if p != "grid")
        gaps[f"{name}/{n}"] = {"spot_subpixel_minus_patch_grid": best - acc[name, "ViT", "grid", n],
                               "spot_subpixel_minus_spot_grid": best - acc[name, "SPoT", "grid", n]}
    return gaps


# -- case study 2 ------------------------------------------------------------------------------
def prior_ranking(tidy: pd.DataFrame) -> tuple[dict, list[str]]:
    """Per backbone, budget and metric: the best SPoT prior, its margin over the runner-up, the Patch
    Grid and (if swept) the salient prior. Returns (metrics, one printable line per entry)."""
    value = tidy.set_index(["backbone", "model", "prior", "tokens", "metric"])["value"]
    plain = tidy[(tidy.model == "SPoT") & ~tidy.oracle]
    metrics, lines = {}, []
    for (name, n, metric), group in plain.groupby(["backbone", "tokens", "metric"]):
        ranked = group.sort_values("value", ascending=False)
        best, second = ranked.iloc[0], ranked.iloc[1]
        entry = {"best_prior": best.prior, "best": best.value, "margin": best.value - second.value,
                 "patch_grid": value[name, "ViT", "grid", n, metric]}
        if "salient" in set(tidy.prior):
            entry["salient"] = value[name, "SPoT", "salient", n, metric]
        metrics[f"{name}/{n}/{metric}"] = entry
        lines.append(f"{name} {n:>2} tokens {metric:>4}: best {best.prior:<9} {best.value:5.1f} (+{entry['margin']:.1f} "
                     f"over {second.prior:<9})  Patch Grid {entry['patch_grid']:5.1f}"
                     + (f"  salient {entry['salient']:5.1f}" if "salient" in entry else ""))
    return metrics, lines


# -- the oracle and case studies 3 and 4 --------------------------------------------------------
def run_oracle(models: Mapping[str, SPoTViT], test: Split, bank: Split | None, budgets: Sequence[int],
               init_priors: Sequence[str], steps: int, lr: float, seed: int, batch_size: int, device,
               **knn) -> tuple[dict, dict[str, torch.Tensor], pd.DataFrame]:
    """SPoT-ON for every backbone, budget and starting prior on ``test``.

    Returns ``runs[(backbone, prior, tokens)]`` (:class:`OracleResult`), the tensors to save
    (final positions and losses; trajectories for the first prior) and a tidy frame: SPoT-ON's
    top-1 and kNN (``knn``: k, temperature) at its positions, and SPoT's top-1 at the start.
    """
    runs, tensors, rows = {}, {}, []
    for name, model in models.items():
        for n in budgets:
            for prior in init_priors:
                init = draw_positions(prior, test, n, model, seed)
                res = spot_on_split(model, test, init, steps, lr, batch_size, device, desc=f"SPoT-ON {name} {prior} {n}")
                runs[name, prior, n] = res
                tensors[position_key(name, prior, n, "final")] = res.positions
                tensors[position_key(name, prior, n, "loss")] = res.loss
                if prior == init_priors[0]:
                    tensors[position_key(name, prior, n, "trajectory")] = res.trajectory
                scores = evaluate(model, test, bank, "isotropic", n, seed=seed, positions=res.positions,
                                  batch_size=batch_size, device=device, **knn)
                for metric, v in scores.items():
                    rows.append(dict(backbone=name, model="SPoT-ON", prior=prior, oracle=True, tokens=n, metric=metric,
                                     value=v))
                rows.append(dict(backbone=name, model="SPoT", prior=prior, oracle=False, tokens=n, metric="acc1",
                                 value=100 * res.correct_before.float().mean().item()))
    return runs, tensors, pd.DataFrame(rows)


def saliency_shift(runs: Mapping, models: Mapping[str, SPoTViT], test: Split, saliency: torch.Tensor,
                   budgets: Sequence[int], prior: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Case study 3: saliency under each token at the oracle's start and end, and at uniform random
    positions (the control). Returns (per-token values, per backbone/budget statistics: the mean
    per-image change with its bootstrap CI and a paired permutation p-value)."""
    token_rows, stat_rows = [], []
    for name in models:
        for n in budgets:
            res = runs[name, prior, n]
            before = sample_points(saliency, res.trajectory[:, 0])
            after = sample_points(saliency, res.positions)
            rand = sample_points(saliency, draw_positions("uniform", test, n, models[name], seed + 7))
            for kind, values in (("initial", before), ("final", after), ("random", rand)):
                token_rows.append(pd.DataFrame({"backbone": name, "tokens": n, "positions": kind,
                                                "saliency": values.flatten().numpy()}))
            diff = (after - before).mean(1)  # per image: mean over its tokens
            low, high = bootstrap_ci(diff.numpy(), seed=seed)
            stat_rows.append(dict(backbone=name, tokens=n, initial=before.mean().item(), final=after.mean().item(),
                                  random=rand.mean().item(), mean_change=diff.mean().item(), ci_low=low, ci_high=high,
                                  p_value=paired_permutation_test(before.mean(1).numpy(), after.mean(1).numpy(),
                                                                  seed=seed),
                                  images=len(diff)))
    return pd.concat(token_rows, ignore_index=True), pd.DataFrame(stat_rows)


def interdependence(models: Mapping[str, SPoTViT], images: Split, tokens: int, prior: str, steps: int, lr: float,
                    seed: int, device) -> pd.DataFrame:
    """All tokens searched at once vs each alone (:func:`spotlib.oracle.one_at_a_time`): accuracy of each
    placement and how far (in pixels) the tokens travel, per backbone."""
    rows = []
    pixels = torch.tensor(images.image_size, dtype=torch.float32)
    for name, model in models.items():
        init = draw_positions(prior, images, tokens, model, seed).to(device)
        x, labels = for_model(images, model).normalise(images.images.to(device)), images.labels.to(device)
        joint = spot_on(model, x, labels, init, steps, lr)
        solo = one_at_a_time(model, x, labels, init, steps, lr)
        combined = evaluate(model, images, None, prior, tokens, positions=solo, device=device)["acc1"]
        init, solo, final = init.cpu(), solo.cpu(), joint.positions.cpu()
        rows.append(dict(
            backbone=name, tokens=tokens, images=len(images),
            acc_prior=100 * joint.correct_before.float().mean().item(),
            acc_joint=100 * joint.correct_after.float().mean().item(),
            acc_one_at_a_time=combined,
            travel_joint_px=((final - init) * pixels).norm(dim=-1).mean().item(),
            travel_solo_px=((solo - init) * pixels).norm(dim=-1).mean().item(),
            joint_vs_solo_px=((final - solo) * pixels).norm(dim=-1).mean().item(),
        ))
    return pd.DataFrame(rows)


def transfer(runs: Mapping[tuple, OracleResult], models: Mapping[str, SPoTViT], test: Split, budgets: Sequence[int],
             prior: str, device) -> pd.DataFrame:
    """Case study 4: each target's top-1 with the oracle positions of each source (and at the prior)."""
    rows = []
    for n in budgets:
        for target, model in models.items():
            rows.append(dict(tokens=n, source="prior", target=target,
                             acc1=100 * runs[target, prior, n].correct_before.float().mean().item()))
            for source in models:
                acc = evaluate(model, test, None, prior, n, positions=runs[source, prior, n].positions, device=device)
                rows.append(dict(tokens=n, source=source, target=target, acc1=acc["acc1"]))
    return pd.DataFrame(rows)


def misalignment(runs: Mapping[tuple, OracleResult], models: Mapping[str, SPoTViT], test: Split,
                 budgets: Sequence[int], prior: str, device) -> pd.DataFrame:
    """Top-1 at the prior, at the oracle's subpixel positions, and with those snapped to grid cells."""
    rows = []
    for name, model in models.items():
        for n in budgets:
            final = runs[name, prior, n].positions
            for kind, pos in (("prior", runs[name, prior, n].trajectory[:, 0]), ("oracle subpixel", final),
                              ("oracle snapped to grid", snap_to_grid(final, model.grid_size))):
                acc = evaluate(model, test, None, prior, n, positions=pos, device=device)["acc1"]
                rows.append(dict(backbone=name, tokens=n, positions=kind, acc1=acc))
    return pd.DataFrame(rows)
