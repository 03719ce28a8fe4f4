"""Fine-tune (or train) a timm ViT on a built dataset, on one process or many (DDP).

Single process (GPU 0 if CUDA is available, else the CPU)::

    python -m spotlib.paper.finetune --data data/fashion_mnist --vit vit.json \\
        --init grid/model.safetensors --out runs/spot --mode spot --epochs 3 --batch-size 128

Multi-GPU fine-tuning on one machine with 8 GPUs (one process per GPU, NCCL;
``--batch-size`` is per process, so one optimiser step sees 8 * 128 images)::

    torchrun --standalone --nproc_per_node=8 -m spotlib.paper.finetune --data data/fashion_mnist \\
        --vit vit.json --init grid/model.safetensors --out runs/spot \\
        --mode spot --epochs 3 --batch-size 128 --lr 3e-3 --priors uniform gaussian sobol

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) the process
group is initialised with the ``nccl`` backend when CUDA is available (rank r
uses ``cuda:LOCAL_RANK``) and ``gloo`` otherwise (CPU). Rerunning the same
command with the same ``--out`` and the same number of processes resumes from
the last finished epoch. See :func:`spotlib.paper.train.train` for the sharding,
seeding and checkpoint rules.

``--vit`` is a JSON object (inline or a path to a ``.json`` file) as
:func:`spotlib.paper.train.build_vit` takes: ``VisionTransformer`` keyword arguments,
or ``{"timm_name": ..., "pretrained": ..., **kwargs}``; ``num_classes`` defaults
to the dataset's class count. ``--init`` loads weights (safetensors) before
training. Outputs in ``--out``: ``model.safetensors``, ``state.pt``,
``log.csv``, ``log.json`` (written by rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import load_split
from ..utils import default_device
from .train import MODES, TrainConfig, build_vit, distributed_context, train


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m spotlib.paper.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory written by spotlib.paper.datasets.build_dataset")
    p.add_argument("--vit", required=True, help="ViT spec: a JSON object or the path of a JSON file")
    p.add_argument("--init", default=None, help="initial weights (safetensors), optional")
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs; resumed if present)")
    p.add_argument("--split", default="train", help="dataset split to train on (default: train)")
    p.add_argument("--mode", choices=MODES, default=defaults.mode)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per process and step")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup", type=float, default=defaults.warmup)
    p.add_argument("--min-tokens", type=int, default=defaults.min_tokens)
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="default: the full grid")
    p.add_argument("--priors", nargs="+", default=defaults.priors,
                   help="priors to draw each batch's positions from (space or comma separated)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--train-size", type=int, default=defaults.train_size, help="first n training images")
    return p.parse_args(argv)


def read_spec(vit: str) -> dict:
    """The ViT spec from inline JSON or a JSON file."""
    text = Path(vit).read_text() if not vit.lstrip().startswith("{") and Path(vit).is_file() else vit
    spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(f"--vit must be a JSON object, got {spec!r}")
    return spec


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    priors = [p for item in args.priors for p in item.split(",") if p]
    return TrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed,
                       min_tokens=args.min_tokens, max_tokens=args.max_tokens, priors=priors,
                       train_size=args.train_size)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv=None):
    """Run the CLI; returns (trained model, log DataFrame)."""
    args = parse_args(argv)
    config = config_from_args(args)
    device = default_device()
    own_group = launched_by_torchrun() and dist.is_available() and not dist.is_initialized()
    if own_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    try:
        data = load_split(args.data, args.split)
        spec = read_spec(args.vit)
        spec.setdefault("num_classes", len(data.classes))
        torch.manual_seed(args.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = build_vit(spec)
        if args.init:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(args.init))
        log = train(model, data, config, args.out, device=device)
        if distributed_context()[0] == 0:
            print(log.to_string(index=False))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return model, log


if __name__ == "__main__":
    main()
