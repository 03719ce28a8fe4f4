"""Training of timm ViTs on a patch grid or with random subpixel tokens.

``mode="grid"``: the plain timm forward on the full patch grid (the baseline).
``mode="spot"``: the SPoT view with, per batch, a random token count
N ~ U{min_tokens..max_tokens} and positions from a randomly chosen prior in
``priors``, so one model serves every budget.

Checkpoints: ``model.safetensors`` (weights; final after the last epoch) and
``state.pt`` (weights, optimiser, schedule, epoch: one file, so a kill can never
pair one epoch's weights with another's optimiser) written atomically after each
epoch. A killed run resumes from the last finished epoch and ends with the same
weights as an uninterrupted one: every epoch's shuffling and position draws
come from generators seeded by (seed, epoch). The log goes to ``log.csv`` and
``log.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from .data import Split
from .priors import sample_positions
from .vit import SPoTViT

MODES = ("grid", "spot")


@dataclass
class TrainConfig:
    """Recipe: AdamW with a one-cycle schedule, no augmentation."""

    mode: str = "grid"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of steps spent warming up (one-cycle pct_start)
    seed: int = 0
    min_tokens: int = 1
    max_tokens: int | None = None  # None = the full grid
    priors: list[str] = field(default_factory=lambda: ["uniform"])
    train_size: int | None = None  # first n training images (None = all)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; valid choices: {', '.join(MODES)}")


def build_vit(spec: dict) -> VisionTransformer:
    """A timm ViT from a spec: ``{"timm_name": ..., "pretrained": bool, **kwargs}`` or
    ``VisionTransformer`` keyword arguments (img_size, patch_size, in_chans, embed_dim, ...)."""
    spec = dict(spec)
    name = spec.pop("timm_name", None)
    if name is None:
        spec.pop("pretrained", None)
        return VisionTransformer(**spec)
    model = timm.create_model(name, **spec)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def load_vit(spec: dict, weights: str | Path) -> VisionTransformer:
    """Build from ``spec`` and load ``weights`` (safetensors)."""
    model = build_vit({**spec, "pretrained": False})
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def _atomic_save(obj, path: Path, save=torch.save) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save(obj, str(tmp))
    os.replace(tmp, path)


def train(
    model: VisionTransformer,
    data: Split,
    config: TrainConfig,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Train ``model`` in place on ``data``; resume from ``out_dir`` if a checkpoint is there.

    Returns the per-epoch log (epoch, loss, acc, lr, seconds, images_per_s).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data.head(config.train_size)
    spot = SPoTViT(model)
    max_tokens = config.max_tokens or spot.num_grid_tokens
    if not 1 <= config.min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {config.min_tokens}, {max_tokens}")
    model.to(device)
    steps_per_epoch = -(-len(data) // config.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=config.warmup
    )
    log, start_epoch = [], 0
    state_path = out_dir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was written with another config; delete {out_dir} to start over")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        log, start_epoch = state["log"], state["epoch"] + 1

    for epoch in range(start_epoch, config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=gen)
        model.train()
        total_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"{config.mode} epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = data.normalise(data.images[idx].to(device))
            labels = data.labels[idx].to(device)
            if config.mode == "grid":
                logits = model(images)
            else:
                n = int(torch.randint(config.min_tokens, max_tokens + 1, (1,), generator=gen))
                prior = config.priors[int(torch.randint(len(config.priors), (1,), generator=gen))]
                positions = sample_positions(prior, len(idx), n, seed=gen, image_size=data.image_size,
                                             grid_size=spot.grid_size, device=device)
                logits = spot(images, positions)
            loss = F.cross_entropy(logits, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        seconds = time.perf_counter() - t0
        log.append(dict(epoch=epoch + 1, loss=total_loss / seen, acc=100 * correct / seen,
                        lr=schedule.get_last_lr()[0], seconds=seconds, images_per_s=seen / seconds))
        _atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors", save_file)
        _atomic_save(dict(config=asdict(config), model=model.state_dict(), optimiser=optimiser.state_dict(),
                          schedule=schedule.state_dict(), log=log, epoch=epoch), state_path)
    frame = pd.DataFrame(log)
    frame.to_csv(out_dir / "log.csv", index=False)
    (out_dir / "log.json").write_text(json.dumps(log, indent=2))
    model.eval()
    return frame


def load_backbones(manifest: str | Path) -> dict[str, dict[str, SPoTViT]]:
    """{backbone: {"grid": SPoT view of the grid-trained ViT, "spot": of the SPoT fine-tune}}.

    ``manifest`` is the JSON the backbones stage writes: {backbone: {"vit": spec,
    "weights": {mode: path relative to the manifest's folder}}}.
    """
    manifest = Path(manifest)
    entries = json.loads(manifest.read_text())
    return {
        name: {mode: SPoTViT(load_vit(entry["vit"], manifest.parent / path)) for mode, path in entry["weights"].items()}
        for name, entry in entries.items()
    }
