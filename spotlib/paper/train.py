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
come from generators seeded by (seed, epoch). ``state.pt`` may live in another
folder (``state_dir``): the pipeline keeps it outside its DVC outputs, which DVC
deletes before a rerun. The log goes to ``log.csv`` and ``log.json`` (epoch,
loss, acc, lr: the same bytes on every run on one machine; wall-clock timings
are only in the returned frame and in ``state.pt``).

Multi-process (DDP) training: when ``torch.distributed`` is initialised with a
world size W > 1 (e.g. under ``torchrun``, see :mod:`spotlib.paper.finetune`),
``train`` wraps the module whose forward it calls (the timm model in grid mode,
the SPoT view in spot mode) in ``DistributedDataParallel``. ``batch_size`` is
per process, so one optimiser step sees a global batch of W * batch_size images:
every rank draws the same (seed, epoch) permutation and takes its own disjoint,
contiguous share of each global batch. The token count and prior of a batch come
from the shared generator (identical on all ranks); token positions from a
generator seeded by (seed, epoch, rank). Each rank's loss is its summed cross
entropy times W / (global batch size), so DDP's gradient average is exactly the
gradient of the mean loss over the global batch: a grid-mode run on W processes
follows the single-process run with batch W * batch_size up to float round-off.
Only rank 0 writes checkpoints and logs (the others wait at a barrier), every
rank resumes from ``state.pt``; the logged loss/acc are over all ranks' images.
A checkpoint records its world size, and resuming with another one is refused.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..data import Split
from ..priors import PRIORS, USES_EXTERNAL_MODEL, sample_positions
from ..utils import progress
from .io import atomic_path, check_choice, config_from_spec, save_safetensors, torch_load, write_json
from ..vit import SPoTViT

MODES = ("grid", "spot")
# priors a training run can draw from: those that need nothing but the image size and grid
TRAINING_PRIORS = tuple(p for p in PRIORS if p not in USES_EXTERNAL_MODEL)
STATE_FORMAT = 2  # the layout of fit's resumable state.pt
TIMING_COLUMNS = ("seconds", "images_per_s")  # vary run to run: kept out of the files a pipeline hashes


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
    grid_fraction: float = 0.0  # spot mode: share of batches at the full patch grid (keeps full-grid accuracy)
    train_size: int | None = None  # first n training images (None = all)

    def __post_init__(self):
        check_choice(self.mode, "training mode", MODES)
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("seed", 0), ("min_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("max_tokens", "train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be null or an integer >= 1, got {value!r}")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"need min_tokens <= max_tokens, got {self.min_tokens} > {self.max_tokens}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.grid_fraction, (int, float)) and 0 <= self.grid_fraction <= 1):
            raise ValueError(f"grid_fraction must be a fraction in [0, 1], got {self.grid_fraction!r}")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not isinstance(self.priors, (list, tuple)) or not self.priors:
            raise ValueError(f"priors must be a non-empty list from: {', '.join(TRAINING_PRIORS)}; got {self.priors!r}")
        for prior in self.priors:
            check_choice(prior, "training prior", TRAINING_PRIORS)

    @classmethod
    def from_spec(cls, mode: str, spec: dict) -> "TrainConfig":
        """A config from a params.yaml spec (``grid:`` or ``spot:`` of a backbone); unknown keys are errors."""
        return config_from_spec(cls, spec, f"{mode} training spec", mode=mode)


def run_fingerprint(model: torch.nn.Module, data: Split, config: TrainConfig) -> str:
    """A short hash of what a training run starts from (config, initial weights, images, labels, normalisation):
    resumable state filed under it can only be resumed by the same run."""
    digest = hashlib.sha256(repr(sorted(asdict(config).items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(data.images.contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(data.labels.contiguous().numpy())
    digest.update(repr((data.mean, data.std)).encode())
    return digest.hexdigest()[:16]


def build_vit(spec: dict) -> VisionTransformer:
    """A timm ViT from a spec: ``{"timm_name": ..., "pretrained": bool, **kwargs}`` or
    ``VisionTransformer`` keyword arguments (img_size, patch_size, in_chans, embed_dim, ...)."""
    spec = dict(spec)
    name = spec.pop("timm_name", None)
    if name is None:
        spec.pop("pretrained", None)
        return VisionTransformer(**spec)
    try:
        model = timm.create_model(name, **spec)
    except Exception as err:
        if not spec.get("pretrained"):
            raise
        raise RuntimeError(
            f"timm could not load the pretrained weights of {name!r} ({type(err).__name__}: {err}). They are "
            "downloaded from the Hugging Face hub on first use: run once with internet access, or point timm at a "
            "local file with pretrained_cfg_overlay={'file': 'path/to/weights.safetensors'} in the spec"
        ) from err
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def one_cycle(optimiser: torch.optim.Optimizer, lr: float, total_steps: int, warmup: float):
    """One-cycle learning-rate schedule; ``warmup`` is the fraction of the steps spent warming up."""
    if abs(warmup * total_steps - 1) < 1e-6:  # OneCycleLR divides by zero when warm-up ends at step 0
        warmup *= 1.01
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=total_steps, pct_start=warmup)


def save_state(obj, path: str | Path) -> None:
    """``torch.save`` atomically (a kill never leaves a half-written checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_log(log: list[dict], out_dir: Path) -> pd.DataFrame:
    """The per-epoch log as a frame; ``log.csv``/``log.json`` in ``out_dir`` without the timing columns."""
    frame = pd.DataFrame(log)
    stable = frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame])
    with atomic_path(out_dir / "log.csv") as tmp:
        stable.to_csv(tmp, index=False)
    write_json(out_dir / "log.json", stable.to_dict("records"))
    return frame


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for the per-rank position generator, derived from (seed, epoch, rank)."""
    digest = hashlib.sha256(f"spotlib.paper.train/{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _barrier(device: torch.device) -> None:
    if dist.get_backend() == "nccl" and device.type == "cuda":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def fit(module: torch.nn.Module, config, num_images: int, step: Callable[[torch.Tensor, torch.Generator, int], tuple],
        save: Callable[[], None], state_path: str | Path, identity: dict, desc: str, device) -> list[dict]:
    """The one training loop (every trainer of the project runs on it): AdamW with a one-cycle schedule.

    Each epoch visits ``num_images`` in an order drawn from a generator seeded by (``config.seed``, epoch),
    in global batches of ``config.batch_size`` per process; ``step(indices, generator, epoch)`` runs one batch
    (this process's share under DDP) and returns the loss to back-propagate and the batch's summed
    statistics: ``{"loss": ..., <metric>: ..., "seen": images}``. The log holds their per-image means
    per epoch (summed over processes), with lr, seconds and images/s.

    After each epoch process 0 calls ``save()`` (the weights) and writes the resumable state (the
    trained weights, optimiser, schedule, log, epoch and ``identity``) to ``state_path`` atomically;
    a run that finds it resumes after its epoch, to the same weights as an uninterrupted run, unless
    its ``identity`` (config, ...) differs, which is an error. Every parameter of ``module`` trains.
    """
    rank, world = distributed_context()
    state_path = Path(state_path)
    identity = {"format": STATE_FORMAT, **identity}  # a state of an older layout is refused, not misread
    global_batch = config.batch_size * world
    steps_per_epoch = -(-num_images // global_batch)
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = one_cycle(optimiser, config.lr, config.epochs * steps_per_epoch, config.warmup)
    log, start_epoch = [], 0
    if state_path.exists():
        state = torch_load(state_path, map_location=device, weights_only=False)
        changed = [key for key, value in identity.items() if state.get(key) != value]
        if changed:
            raise ValueError(f"{state_path} was written with another {' and '.join(changed)} "
                             f"({', '.join(f'{k}: {state.get(k)!r}' for k in changed)}); resume with the same, "
                             f"or delete {state_path.parent} to start over")
        module.load_state_dict(state["weights"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        log, start_epoch = state["log"], state["epoch"] + 1
        if rank == 0:
            print(f"{desc}: resuming after epoch {start_epoch}/{config.epochs} from {state_path}", flush=True)
    for epoch in range(start_epoch, config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(num_images, generator=gen)
        module.train()
        sums, t0 = {}, time.perf_counter()
        # counted in images (every process's), so its rate reads as images/s
        bar = progress(total=num_images, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", leave=False, unit="img",
                       disable=rank != 0)
        for index in range(steps_per_epoch):
            batch = order[index * global_batch : (index + 1) * global_batch]
            loss, stats = step(batch, gen, epoch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            sums = {key: sums.get(key, 0) + value for key, value in stats.items()}
            bar.set_postfix({k: f"{v / max(sums['seen'], 1):.4g}" for k, v in sums.items() if k != "seen"}, refresh=False)
            bar.update(len(batch))
        bar.close()
        seconds = time.perf_counter() - t0
        if world > 1:  # statistics over every process's images
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            sums = dict(zip(sums, totals.tolist()))
        seen = sums.pop("seen")
        log.append(dict(epoch=epoch + 1, **{key: value / seen for key, value in sums.items()},
                        lr=schedule.get_last_lr()[0], seconds=seconds, images_per_s=seen / seconds))
        if rank == 0:
            save()
            save_state(dict(identity, weights=module.state_dict(), optimiser=optimiser.state_dict(),
                            schedule=schedule.state_dict(), log=log, epoch=epoch), state_path)
        if world > 1:
            _barrier(device)
    module.eval()
    return log


def train(
    model: VisionTransformer,
    data: Split,
    config: TrainConfig,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    state_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Train ``model`` in place on ``data`` with :func:`fit`; resume from ``state_dir/state.pt`` if it is there.

    ``out_dir`` receives ``model.safetensors`` and the log; ``state_dir`` (default
    ``out_dir``) the resumable ``state.pt``.

    Under an initialised ``torch.distributed`` process group of more than one
    process this is DDP training (see the module docstring): call it on every
    rank with the same arguments (``device`` being the rank's own, e.g.
    :func:`spotlib.utils.default_device`); ``config.batch_size`` is per process.

    Returns the per-epoch log (epoch, loss, acc, lr, seconds, images_per_s).
    """
    rank, world = distributed_context()
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir) if state_dir is not None else out_dir
    data = data.head(config.train_size)
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    spot = SPoTViT(model)
    max_tokens = config.max_tokens or spot.num_grid_tokens
    if not 1 <= config.min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {config.min_tokens}, {max_tokens}")
    model.to(device)
    forward = spot if config.mode == "spot" else model
    if world > 1:
        # Wrap the module whose forward is called, so that DDP's hooks all-reduce the gradients.
        # (Construction broadcasts rank 0's weights; after a resume they are equal already.)
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda" else None)
    rank_gens: dict[int, torch.Generator] = {}

    def step(batch: torch.Tensor, gen: torch.Generator, epoch: int):
        """One global batch: this process's share (all of it in one process). Under DDP the summed cross
        entropy times world / len(batch) is back-propagated, so DDP's average over processes is the gradient
        of the mean loss over the global batch; N and the prior come from the shared generator (the same on
        every process), positions from a per-process one."""
        idx, weight = torch.tensor_split(batch, world)[rank], world / len(batch)
        if len(idx) == 0:  # a last global batch smaller than the world: join the all-reduce with a zero gradient
            idx, weight = batch[:1], 0.0
        images, labels = data.normalise(data.images[idx].to(device)), data.labels[idx].to(device)
        if config.mode == "grid":
            logits = forward(images)
        else:
            n = int(torch.randint(config.min_tokens, max_tokens + 1, (1,), generator=gen))
            prior = config.priors[int(torch.randint(len(config.priors), (1,), generator=gen))]
            if config.grid_fraction and float(torch.rand((), generator=gen)) < config.grid_fraction:
                prior, n = "grid", spot.num_grid_tokens  # the full grid, as the grid ViT was trained
            if world > 1 and epoch not in rank_gens:
                rank_gens[epoch] = torch.Generator().manual_seed(rank_seed(config.seed, epoch, rank))
            positions = sample_positions(prior, len(idx), n, seed=rank_gens[epoch] if world > 1 else gen,
                                         image_size=data.image_size, grid_size=spot.grid_size, device=device)
            logits = forward(images, positions)
        if world == 1:
            loss = F.cross_entropy(logits, labels)
            return loss, dict(loss=loss.item() * len(idx), acc=100 * (logits.argmax(1) == labels).sum().item(),
                              seen=len(idx))
        ce = F.cross_entropy(logits, labels, reduction="sum")
        stats = dict(loss=ce.item(), acc=100 * (logits.argmax(1) == labels).sum().item(), seen=len(idx))
        return ce * weight, (stats if weight else dict.fromkeys(stats, 0))

    log = fit(model, config, len(data), step, lambda: save_safetensors(model.state_dict(), out_dir / "model.safetensors"),
              state_dir / "state.pt", dict(config=asdict(config), world_size=world), config.mode, device)
    frame = write_log(log, out_dir) if rank == 0 else pd.DataFrame(log)
    if world > 1:
        _barrier(device)
    return frame
