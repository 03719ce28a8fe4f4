"""The paper's analyses, shared by the stage notebooks: each returns tidy frames they save and plot.

Conventions: accuracies are in percent, each with its 95 % bootstrap interval over test images
(``ci_low``, ``ci_high``) and sample size ``n``; a tidy result frame has one row per (backbone,
model, prior, oracle, tokens, metric) with its ``value`` (see :func:`spotlib.evaluate.sweep`).
*Per-image outcomes* (``per_image``) map the same keys ``(backbone, model, prior, tokens, metric)``
to bool tensors (n,) of correct test images, so two rows scored on the same images can be compared
by a paired test (:func:`spotlib.stats.paired_effect`). Seed replicates (backbones of one recipe,
:func:`spotlib.paper.backbones.replicate_groups`) add rows for their mean, with the spread over seeds.
The oracle's positions are saved in one safetensors file under :func:`position_key` names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import Split, for_model
from ..evaluate import draw_positions, evaluate_outcomes
from ..oracle import OracleResult, grid_oracle, one_at_a_time, spot_on, spot_on_split
from ..stats import accuracy_with_ci, bootstrap_ci, paired_effect, paired_permutation_test
from ..tokenizer import sample_points, snap_to_grid
from ..utils import progress
from ..vit import SPoTViT

KEYS = ["backbone", "model", "prior", "tokens", "metric"]
PerImage = dict  # {(backbone, model, prior, tokens, metric): bool tensor (n,)}


def position_key(backbone: str, prior: str, tokens: int, kind: str) -> str:
    """Name of an oracle tensor in ``positions.safetensors``: kind is final, loss, correct or trajectory."""
    return f"{backbone}/{prior}/{tokens}/{kind}"


def acc1(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.metric == "acc1"]


def best_prior(sweep: pd.DataFrame, metric: str = "acc1") -> pd.Series:
    """The best SPoT prior's value without the oracle flag, per (backbone, tokens)."""
    plain = sweep[(sweep.model == "SPoT") & ~sweep.oracle.astype(bool) & (sweep.metric == metric)]
    return plain.groupby(["backbone", "tokens"]).value.max()


def spot_on_rows(oracle: pd.DataFrame) -> pd.DataFrame:
    """The SPoT-ON rows of the oracle table, from its first starting prior (the table's SPoT-ON row)."""
    return oracle[(oracle.model == "SPoT-ON") & (oracle.prior == oracle.prior.iloc[0])]


def scored(correct: torch.Tensor, **labels) -> dict:
    """A result row: ``labels`` and the accuracy of per-image outcomes with its interval and n."""
    return dict(**labels, **accuracy_with_ci(np.asarray(correct, dtype=np.float64)))


def with_brackets(frame: pd.DataFrame, value: str = "value", low: str = "ci_low", high: str = "ci_high",
                  digits: int = 1) -> pd.Series:
    """``value [low, high]`` strings of a frame's columns, for printing and Markdown."""
    return frame.apply(lambda r: f"{r[value]:.{digits}f} [{r[low]:.{digits}f}, {r[high]:.{digits}f}]", axis=1)


# the headline's method keys, short enough for `dvc exp show` to fit a 120-column terminal
HEADLINE_METHODS = {"grid": "Patch Grid", "prior": "SPoT, its best fixed prior", "learned": "SPoT, learned prior",
                    "policy": "SPoT, learned policy", "relevance": "token relevance", "spot_on": "SPoT-ON (oracle)"}


def headline(rows: pd.DataFrame, backbone: str) -> dict:
    """The study at a glance, for one backbone (or replicate mean) at the sparsest budget: Acc@1 of each
    method of :data:`HEADLINE_METHODS` that has a row, with its 95 % interval and test-image count. The
    best fixed prior is taken among SPoT's rows without the oracle flag (no saliency model, no true
    object) and without the learned placers. ``rows``: the tidy rows of every method (the figures
    stage's ``full``: sweep, sparsifier, learned placers and :func:`spot_on_rows`).

    Returns ``{"backbone", "tokens", "prior_name", "acc1": {method: value}, "acc1_ci": {method: [low,
    high]}, "n": {method: n}}``: the figures stage's metrics file for ``dvc metrics show`` / ``dvc exp show``."""
    mine = acc1(rows[rows.backbone == backbone])
    n = int(mine.tokens.min())
    at = mine[mine.tokens == n]
    spot = at[at.model == "SPoT"]
    fixed = spot[~spot.prior.isin(["learned prior", "learned policy"]) & ~spot.oracle.astype(bool)]  # placement.KINDS
    fixed = fixed.sort_values("value", ascending=False)
    picked = {"grid": at[at.model == "ViT"], "prior": fixed.head(1), "learned": spot[spot.prior == "learned prior"],
              "policy": spot[spot.prior == "learned policy"], "relevance": at[at.model == "Token relevance"],
              "spot_on": at[at.model == "SPoT-ON"]}
    picked = {method: row.iloc[0] for method, row in picked.items() if len(row)}
    return {"backbone": backbone, "tokens": n, "prior_name": fixed.prior.iloc[0] if len(fixed) else None,
            "acc1": {m: round(float(r.value), 2) for m, r in picked.items()},
            "acc1_ci": {m: [round(float(r.ci_low), 2), round(float(r.ci_high), 2)] for m, r in picked.items()},
            "n": {m: int(r.n) for m, r in picked.items()}}


# -- seed replicates -------------------------------------------------------------------------------
def with_replicate_means(tidy: pd.DataFrame, per_image: PerImage, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """``tidy`` with a row per replicate group and (model, prior, tokens, metric) scored by every member:
    the accuracy of the per-image mean over the members (its interval over images) and ``spread``,
    the standard deviation of the members' accuracies over seeds; ``replicates`` counts them.
    ``per_image`` gains the group's per-image means under the group's label."""
    rows = []
    for label, members in groups.items():
        for key, group in tidy[tidy.backbone.isin(members)].groupby(KEYS[1:], sort=False):
            outcomes = [per_image.get((m, *key)) for m in members]
            if any(o is None for o in outcomes) or len({len(o) for o in outcomes}) != 1:
                continue  # a member did not score this row on the same images
            mean = torch.stack([o.double() for o in outcomes]).mean(0)
            per_image[(label, *key)] = mean
            first = group.iloc[0]
            rows.append(dict(scored(mean, backbone=label, **dict(zip(KEYS[1:], key)), oracle=first.oracle),
                             spread=float(group.value.std(ddof=1)), replicates=len(members)))
    out = tidy.assign(spread=np.nan, replicates=1) if "spread" not in tidy else tidy
    return pd.concat([out, pd.DataFrame(rows)], ignore_index=True) if rows else out


def effects(per_image: PerImage, comparisons: Sequence[tuple[tuple, tuple]], **labels) -> list[dict]:
    """Paired comparisons ``[(key_a, key_b), ...]`` of per-image outcomes: a − b in points with its
    interval and p-value (:func:`spotlib.stats.paired_effect`), on the images both scored (every
    evaluated subset is a prefix of the test split, so the first min(n_a, n_b)); pairs with a missing
    side are skipped."""
    rows = []
    for a, b in comparisons:
        if a in per_image and b in per_image:
            m = min(len(per_image[a]), len(per_image[b]))
            rows.append(dict(**labels, a=a, b=b, **paired_effect(per_image[a][:m].numpy(), per_image[b][:m].numpy())))
    return rows


# -- case study 1 ------------------------------------------------------------------------------
# The 2 x 3 design: each placement as (layout, where the windows may sit).
PLACEMENTS = {
    "grid": ("random", "grid cells"), "uniform": ("random", "subpixel"),
    "isotropic_grid": ("isotropic lattice", "grid cells"), "isotropic": ("isotropic lattice", "subpixel"),
    "center_grid": ("center lattice", "grid cells"), "center": ("center lattice", "subpixel"),
}


def placement_frame(tidy: pd.DataFrame) -> pd.DataFrame:
    """Case study 1's tidy rows with their ``layout`` and ``cells`` (grid cells / subpixel) columns."""
    known = tidy[tidy.prior.isin(PLACEMENTS)]
    return known.assign(layout=known.prior.map(lambda p: PLACEMENTS[p][0]),
                        cells=known.prior.map(lambda p: PLACEMENTS[p][1]))


def grid_design_effects(tidy: pd.DataFrame, per_image: PerImage) -> pd.DataFrame:
    """The paired contrasts of case study 1, per backbone (and replicate mean), model and budget:

    * ``off-grid − on-grid``: a lattice at its subpixel positions minus the same lattice on grid
      cells (the freedom to leave the grid, layout held fixed);
    * ``lattice − random (grid cells)``: a lattice on grid cells minus random grid cells (structure,
      cells held fixed);
    * ``SPoT − ViT``: the fine-tuned model minus the grid ViT at the same placement.
    """
    rows = []
    for (name, n), _ in tidy.groupby(["backbone", "tokens"], sort=False):
        for model in ("ViT", "SPoT"):
            key = lambda prior, m=model: (name, m, prior, n, "acc1")  # noqa: E731
            for lattice in ("isotropic", "center"):
                rows += effects(per_image, [(key(lattice), key(f"{lattice}_grid"))], backbone=name, model=model,
                                tokens=n, contrast="off-grid − on-grid", layout=f"{lattice} lattice")
                rows += effects(per_image, [(key(f"{lattice}_grid"), key("grid"))], backbone=name, model=model,
                                tokens=n, contrast="lattice − random (grid cells)", layout=f"{lattice} lattice")
            rows += effects(per_image, [(key("uniform"), key("grid"))], backbone=name, model=model, tokens=n,
                            contrast="off-grid − on-grid", layout="random")
        for prior in PLACEMENTS:
            rows += effects(per_image, [((name, "SPoT", prior, n, "acc1"), (name, "ViT", prior, n, "acc1"))],
                            backbone=name, model="SPoT − ViT", tokens=n, contrast="SPoT − ViT", layout=prior)
    return pd.DataFrame(rows).drop(columns=["a", "b"])


# -- case study 2 ------------------------------------------------------------------------------
def prior_ranking(tidy: pd.DataFrame, per_image: PerImage, alpha: float = 0.05) -> tuple[dict, list[str]]:
    """Per backbone, budget and metric: the best SPoT prior without the oracle flag, its paired
    difference from the runner-up (with interval and p-value: a ranking only if p < ``alpha``, else
    a tie), the Patch Grid and the saliency rows. Returns (metrics ``{backbone: {tokens: {metric: entry}}}``,
    one printable line per entry)."""
    value = tidy.set_index(["backbone", "model", "prior", "tokens", "metric"])["value"]
    plain = tidy[(tidy.model == "SPoT") & ~tidy.oracle.astype(bool)]
    metrics, lines = {}, []
    for (name, n, metric), group in plain.groupby(["backbone", "tokens", "metric"], sort=False):
        ranked = group.sort_values("value", ascending=False)
        best, second = ranked.iloc[0], ranked.iloc[1]
        gap = effects(per_image, [((name, "SPoT", best.prior, n, metric), (name, "SPoT", second.prior, n, metric))])
        gap = gap[0] if gap else {"diff": best.value - second.value, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan}
        entry = {"best_prior": best.prior, "best": best.value, "best_ci": [best.ci_low, best.ci_high],
                 "runner_up": second.prior, "margin": gap["diff"], "margin_ci": [gap["ci_low"], gap["ci_high"]],
                 "margin_p_value": gap["p_value"], "significant": bool(gap["p_value"] < alpha),
                 "patch_grid": value.get((name, "ViT", "grid", n, metric))}
        for prior in sorted(set(tidy[tidy.oracle.astype(bool) & (tidy.model == "SPoT")].prior)):
            entry[prior] = value.get((name, "SPoT", prior, n, metric))
        metrics.setdefault(name, {}).setdefault(str(n), {})[metric] = entry
        verdict = "ahead of" if entry["significant"] else "tied with"
        lines.append(f"{name} {n:>2} tokens {metric:>4}: {best.prior} {best.value:.1f} [{best.ci_low:.1f}, "
                     f"{best.ci_high:.1f}] {verdict} {second.prior} ({gap['diff']:+.1f} pts, p = {gap['p_value']:.3g})")
    return metrics, lines


def prior_effects(tidy: pd.DataFrame, per_image: PerImage) -> pd.DataFrame:
    """Case study 2's paired contrasts (top-1), per backbone (and replicate mean) and budget: every SPoT
    prior against the Patch Grid; ``center`` against ``isotropic``; and, for the saliency rows, the
    sampler (``salient_spread`` against i.i.d. ``salient``, on the same maps) and the map (each sampler
    on another source's maps, e.g. ``salient (foreground)`` against ``salient``)."""
    spot = sorted(set(tidy[tidy.model == "SPoT"].prior))
    salient = [p for p in spot if p.split(" (")[0] in ("salient", "salient_spread")]
    rows = []
    for (name, n), _ in tidy[tidy.metric == "acc1"].groupby(["backbone", "tokens"], sort=False):
        key = lambda model, prior: (name, model, prior, n, "acc1")  # noqa: E731
        pairs = [(f"{p} − Patch Grid", key("SPoT", p), key("ViT", "grid")) for p in spot]
        pairs.append(("center − isotropic", key("SPoT", "center"), key("SPoT", "isotropic")))
        for p in salient:
            base, _, source = p.partition(" (")
            if base == "salient_spread":
                pairs.append((f"sampler: {p} − {p.replace('salient_spread', 'salient', 1)}", key("SPoT", p),
                              key("SPoT", p.replace("salient_spread", "salient", 1))))
            if source:
                pairs.append((f"map: {p} − {base}", key("SPoT", p), key("SPoT", base)))
        for contrast, a, b in pairs:
            rows += effects(per_image, [(a, b)], backbone=name, tokens=n, contrast=contrast)
    return pd.DataFrame(rows).drop(columns=["a", "b"])


# -- the oracle and case studies 3 and 4 --------------------------------------------------------
def run_oracle(models: Mapping[str, SPoTViT], test: Split, bank: Split | None, budgets: Sequence[int],
               init_priors: Sequence[str], steps: int, lr: float, seed: int, batch_size: int, device,
               **knn) -> tuple[dict, dict[str, torch.Tensor], pd.DataFrame, PerImage]:
    """SPoT-ON for every backbone, budget and starting prior on ``test``.

    Returns ``runs[(backbone, prior, tokens)]`` (:class:`OracleResult`), the tensors to save
    (final positions, losses and correctness per step; trajectories for the first prior), a tidy
    frame (SPoT-ON's top-1 and kNN, ``knn``: k, temperature, at its positions, and SPoT's top-1 at
    the start, with intervals) and the per-image outcomes of its rows.
    """
    runs, tensors, rows, per_image = {}, {}, [], {}
    for name, model in models.items():
        for n in budgets:
            for prior in init_priors:
                init = draw_positions(prior, test, n, model, seed)
                res = spot_on_split(model, test, init, steps, lr, batch_size, device, desc=f"SPoT-ON {name} {prior} {n}")
                runs[name, prior, n] = res
                for kind in ("final", "loss", "correct") + (("trajectory",) if prior == init_priors[0] else ()):
                    value = res.positions if kind == "final" else getattr(res, kind)
                    tensors[position_key(name, prior, n, kind)] = value.to(torch.uint8) if kind == "correct" else value
                found = evaluate_outcomes(model, test, bank, "isotropic", n, seed=seed, positions=res.positions,
                                          batch_size=batch_size, device=device, **knn)
                found["acc1"] = res.correct_after  # the same images at the same positions (no second forward)
                for metric, correct in found.items():
                    per_image[name, "SPoT-ON", prior, n, metric] = correct
                    rows.append(scored(correct, backbone=name, model="SPoT-ON", prior=prior, oracle=True, tokens=n,
                                       metric=metric))
                per_image[name, "SPoT", prior, n, "acc1"] = res.correct_before
                rows.append(scored(res.correct_before, backbone=name, model="SPoT", prior=prior, oracle=False,
                                   tokens=n, metric="acc1"))
    return runs, tensors, pd.DataFrame(rows), per_image


def saturation(runs: Mapping[tuple, OracleResult], image_size: tuple[int, int], window: int,
               steps: Sequence[int] | None = None) -> pd.DataFrame:
    """How fast SPoT-ON saturates: per backbone, starting prior, budget and step, top-1 (with interval)
    and how far the tokens have moved from their start, in pixels (mean over tokens and images) and in
    windows (the share of tokens that moved more than one window side); ``steps``: which to report
    (default: every step)."""
    pixels = torch.tensor(image_size, dtype=torch.float32)
    rows = []
    for (name, prior, n), res in runs.items():
        shown = range(res.correct.shape[1]) if steps is None else [s for s in steps if s < res.correct.shape[1]]
        for s in shown:
            moved = ((res.trajectory[:, s] - res.trajectory[:, 0]) * pixels).norm(dim=-1)  # (B, N) px
            rows.append(scored(res.correct[:, s], backbone=name, prior=prior, tokens=n, step=s,
                               displacement_px=moved.mean().item(),
                               beyond_one_window=(moved > window).float().mean().item()))
    return pd.DataFrame(rows)


def saliency_shift(runs: Mapping, models: Mapping[str, SPoTViT], test: Split, maps: Mapping[str, torch.Tensor],
                   budgets: Sequence[int], prior: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Case study 3: saliency under each token at the oracle's start and end, and at uniform random
    positions (the control), for each source of maps (``maps``: {source: (m, H, W)}, m <= the oracle's
    images: the first m are read). Returns (per-token values, per source/backbone/budget statistics:
    the mean per-image change with its bootstrap CI and a paired permutation p-value)."""
    token_rows, stat_rows = [], []
    for source, saliency in maps.items():
        m = min(len(saliency), len(test))
        for name in models:
            for n in budgets:
                res = runs[name, prior, n]
                before = sample_points(saliency[:m], res.trajectory[:m, 0])
                after = sample_points(saliency[:m], res.positions[:m])
                rand = sample_points(saliency[:m], draw_positions("uniform", test.head(m), n, models[name], seed + 7))
                for kind, values in (("initial", before), ("final", after), ("random", rand)):
                    token_rows.append(pd.DataFrame({"source": source, "backbone": name, "tokens": n, "positions": kind,
                                                    "saliency": values.flatten().numpy()}))
                diff = (after - before).mean(1)  # per image: mean over its tokens
                low, high = bootstrap_ci(diff.numpy(), seed=seed)
                stat_rows.append(dict(source=source, backbone=name, tokens=n, initial=before.mean().item(),
                                      final=after.mean().item(), random=rand.mean().item(),
                                      mean_change=diff.mean().item(), ci_low=low, ci_high=high,
                                      p_value=paired_permutation_test(before.mean(1).numpy(), after.mean(1).numpy(),
                                                                      seed=seed), images=m))
    return pd.concat(token_rows, ignore_index=True), pd.DataFrame(stat_rows)


def interdependence(models: Mapping[str, SPoTViT], images: Split, tokens: int, prior: str, steps: int, lr: float,
                    seed: int, device) -> pd.DataFrame:
    """All tokens searched at once vs each alone (:func:`spotlib.oracle.one_at_a_time`): accuracy of each
    placement (with intervals) and how far (in pixels) the tokens travel, per backbone."""
    rows = []
    pixels = torch.tensor(images.image_size, dtype=torch.float32)
    for name, model in models.items():
        init = draw_positions(prior, images, tokens, model, seed).to(device)
        x, labels = for_model(images, model).normalise(images.images.to(device)), images.labels.to(device)
        joint = spot_on(model, x, labels, init, steps, lr)
        solo = one_at_a_time(model, x, labels, init, steps, lr)
        combined = evaluate_outcomes(model, images, None, prior, tokens, positions=solo, device=device)["acc1"]
        init, solo, final = init.cpu(), solo.cpu(), joint.positions.cpu()
        for placement, correct in (("prior", joint.correct_before), ("joint", joint.correct_after),
                                   ("one at a time", combined)):
            rows.append(scored(correct.cpu(), backbone=name, tokens=tokens, placement=placement,
                               travel_px={"prior": 0.0, "joint": ((final - init) * pixels).norm(dim=-1).mean().item(),
                                          "one at a time": ((solo - init) * pixels).norm(dim=-1).mean().item()}[placement],
                               from_joint_px=((solo - final) * pixels).norm(dim=-1).mean().item()
                               if placement == "one at a time" else 0.0))
    return pd.DataFrame(rows)


def transfer(runs: Mapping[tuple, OracleResult], models: Mapping[str, SPoTViT], test: Split, budgets: Sequence[int],
             prior: str, device) -> pd.DataFrame:
    """Case study 4: each target's top-1 (with interval) with the oracle positions of each source and at
    its prior, and the paired gain of each source's positions over the target's prior."""
    rows = []
    for n in budgets:
        for target, model in models.items():
            start = runs[target, prior, n].correct_before
            rows.append(scored(start, tokens=n, source="prior", target=target, gain=0.0, gain_ci_low=0.0,
                               gain_ci_high=0.0, gain_p_value=1.0))
            for source in models:
                got = evaluate_outcomes(model, test, None, prior, n, positions=runs[source, prior, n].positions,
                                        device=device)["acc1"]
                gain = paired_effect(got.numpy(), start.numpy())
                rows.append(scored(got, tokens=n, source=source, target=target, gain=gain["diff"],
                                   gain_ci_low=gain["ci_low"], gain_ci_high=gain["ci_high"], gain_p_value=gain["p_value"]))
    return pd.DataFrame(rows).rename(columns={"value": "acc1"})


def grid_oracle_split(model: SPoTViT, split: Split, num_tokens: int, batch_size: int, device,
                      desc: str | None = None) -> torch.Tensor:
    """:func:`spotlib.oracle.grid_oracle` over a split in batches (progress): (n, N, 2) on the CPU."""
    split = for_model(split, model)
    out = []
    bar = progress(total=len(split), desc=desc, unit="img", disable=desc is None)
    for _, images, labels in split.batches(batch_size, device):
        out.append(grid_oracle(model, images, labels, num_tokens).cpu())
        bar.update(len(images))
    bar.close()
    return torch.cat(out)


def misalignment(runs: Mapping[tuple, OracleResult], models: Mapping[str, SPoTViT], test: Split,
                 budgets: Sequence[int], prior: str, device, batch_size: int = 250,
                 grid_search_images: int | None = None,
                 grid_budgets: Sequence[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-1 (with intervals) at the prior, at the oracle's subpixel positions, with those snapped to
    grid cells, and at the grid-constrained oracle (a greedy search over distinct cells with the true
    label, on the first ``grid_search_images`` images, all by default, at the budgets in
    ``grid_budgets``, all by default: the search costs N passes per token); and the paired difference
    of the subpixel oracle and each grid-bound placement on the same images."""
    rows, contrasts = [], []
    searched_budgets = set(budgets if grid_budgets is None else grid_budgets)
    m = len(test) if grid_search_images is None else min(grid_search_images, len(test))
    for name, model in models.items():
        for n in budgets:
            res = runs[name, prior, n]
            snapped = snap_to_grid(res.positions, model.grid_size)
            placements = {"prior": res.correct_before, "oracle subpixel": res.correct_after,
                          "oracle snapped to grid": evaluate_outcomes(model, test, None, prior, n, device=device,
                                                                      positions=snapped)["acc1"]}
            if n in searched_budgets:
                searched = grid_oracle_split(model, test.head(m), n, batch_size, device, desc=f"grid oracle {name} {n}")
                placements["grid oracle (greedy cells)"] = evaluate_outcomes(model, test.head(m), None, prior, n,
                                                                             positions=searched, device=device)["acc1"]
            for kind, correct in placements.items():
                rows.append(scored(correct, backbone=name, tokens=n, positions=kind))
            for kind in [k for k in placements if k not in ("prior", "oracle subpixel")]:
                k = len(placements[kind])
                contrasts.append(dict(backbone=name, tokens=n, a="oracle subpixel", b=kind,
                                      **paired_effect(placements["oracle subpixel"][:k].numpy(),
                                                      placements[kind].numpy())))
    return pd.DataFrame(rows).rename(columns={"value": "acc1"}), pd.DataFrame(contrasts)
