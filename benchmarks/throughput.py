"""Evaluation and SPoT-ON throughput per token budget, against the ideal speed-up from FLOPs.

Runs the workspace's own code paths on synthetic uint8 images kept in host memory, as the
pipeline does (``spotlib.evaluate.embed``: pinned host-to-device copies, normalisation on the
device, bfloat16 autocast on CUDA; ``spotlib.oracle.spot_on_split``), with a random-init timm
ViT (speed does not depend on the weights, and nothing is downloaded)::

    python benchmarks/throughput.py                    # ViT-B/16 at 224 px, on the GPU if there is one
    python benchmarks/throughput.py --device cpu       # smaller default sizes on a CPU

Prints, per budget N: evaluation images/s, its ratio to the full grid (the speed-up), and the
ideal speed-up from FLOPs (full-grid FLOPs / FLOPs at N, matmuls and attention counted); then
SPoT-ON images/s (steps and budget stated) and the plain timm forward as a baseline.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import timm
import torch

from spotlib import SPoTViT, embed
from spotlib.data import Split
from spotlib.oracle import spot_on_split
from spotlib.utils import mixed_precision
from spotlib.priors import sample_positions
from spotlib.paper.sparsify import count_flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 49, 100, 196])
    parser.add_argument("--prior", default="isotropic")
    # sizes: (GPU default, CPU default)
    parser.add_argument("--images", type=int, default=None, help="images per evaluation pass (4096; CPU: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="(512; CPU: 32)")
    parser.add_argument("--oracle-images", type=int, default=None, help="(512; CPU: 16)")
    parser.add_argument("--oracle-batch-size", type=int, default=None, help="(256; CPU: 16)")
    parser.add_argument("--oracle-steps", type=int, default=50)
    parser.add_argument("--oracle-budget", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (3; CPU: 1)")
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast (auto: on CUDA only)")
    parser.add_argument("--out", default=None, help="also write the table as CSV here")
    args = parser.parse_args()

    device = torch.device(args.device)
    defaults = dict(images=(4096, 64), batch_size=(512, 32), oracle_images=(512, 16), oracle_batch_size=(256, 16),
                    repeats=(3, 1))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if device.type == "cuda" else cpu)
    amp = {"auto": None, "on": True, "off": False}[args.amp]
    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False, img_size=args.img_size).to(device).eval()
    spot = SPoTViT(vit)
    full = spot.num_grid_tokens
    images = torch.randint(0, 256, (args.images, 3, args.img_size, args.img_size), dtype=torch.uint8)
    split = Split(images, torch.randint(0, vit.num_classes, (args.images,)), (0.5,) * 3, (0.5,) * 3,
                  tuple(str(i) for i in range(vit.num_classes)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} at {args.img_size} px ({full} grid tokens) on {name}; "
          f"amp={'bf16' if (amp if amp is not None else device.type == 'cuda') else 'off'}, batch {args.batch_size}")

    x1 = split.normalise(images[:1].to(device))
    full_flops = count_flops(spot, x1, spot.grid_positions(1, device))
    rows = []
    for n in sorted(set(args.budgets + [full]), reverse=True):
        positions = sample_positions(args.prior, args.images, n, seed=0, image_size=split.image_size,
                                     grid_size=spot.grid_size)
        seconds = timed(lambda: embed(spot, split, positions, args.batch_size, device, amp=amp), device, args.repeats)
        flops = count_flops(spot, x1, positions[:1].to(device))
        rows.append(dict(tokens=n, images_per_s=args.images / seconds, gflops_per_image=flops / 1e9,
                         ideal_speedup=full_flops / flops))
    table = pd.DataFrame(rows)
    base = table.loc[table.tokens == full, "images_per_s"].item()
    table["speedup"] = table.images_per_s / base
    table["speedup_vs_ideal"] = table.speedup / table.ideal_speedup

    def plain_forward():
        with torch.no_grad(), mixed_precision(device, amp):
            for _, x, _ in split.batches(args.batch_size, device):
                vit(x)

    timm_ips = args.images / timed(plain_forward, device, args.repeats)

    oracle = split.head(args.oracle_images)
    init = sample_positions(args.prior, len(oracle), args.oracle_budget, seed=0, image_size=split.image_size,
                            grid_size=spot.grid_size)
    oracle_s = timed(lambda: spot_on_split(spot, oracle, init, args.oracle_steps, 3e-3, args.oracle_batch_size,
                                           device, desc=None, amp=amp), device, max(1, args.repeats - 2))

    print("\nEvaluation (spotlib.evaluate.embed, prior %s):" % args.prior)
    print(table.round(3).to_string(index=False))
    small, large = min(args.budgets), max(args.budgets)
    if small in set(table.tokens) and large in set(table.tokens):
        t = table.set_index("tokens")
        measured = t.images_per_s[small] / t.images_per_s[large]
        ideal = t.gflops_per_image[large] / t.gflops_per_image[small]
        print(f"\n{small} vs {large} tokens: {measured:.2f}x faster, ideal from FLOPs {ideal:.2f}x "
              f"({100 * measured / ideal:.0f}% of ideal)")
    print(f"timm forward on the full grid (baseline): {timm_ips:.1f} images/s; SPoT view at {full} tokens: "
          f"{base:.1f} images/s ({base / timm_ips:.2f}x of timm)")
    print(f"SPoT-ON ({args.oracle_steps} AdamW steps, {args.oracle_budget} tokens, batch {args.oracle_batch_size}): "
          f"{len(oracle) / oracle_s:.2f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if args.out:
        table.assign(device=name, model=args.model, timm_images_per_s=timm_ips,
                     oracle_images_per_s=len(oracle) / oracle_s, oracle_steps=args.oracle_steps,
                     oracle_budget=args.oracle_budget).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
