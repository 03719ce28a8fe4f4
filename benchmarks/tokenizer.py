"""Cost of subpixel tokenisation against timm's patch embedding, at the full grid.

Times, in one run and on the same inputs:
  timm:  model.patch_embed(x) + model._pos_embed(...)  (a strided convolution)
  SPoT:  SPoTViT.embed_tokens(x, grid positions) + prefix tokens
         (bilinear window sampling + linear map + interpolated positional embedding)
and the whole forward pass of both, and prints SPoT / timm time ratios.

    python benchmarks/tokenizer.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from timm.models.vision_transformer import VisionTransformer

from spotlib import SPoTViT

CONFIGS = {
    # name: (VisionTransformer kwargs, batch size)
    "embedded 28px k=4 (w96 d4)": (dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3,
                                         num_classes=10), 256),
    "ViT-B/16 224px": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000), 32),
}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})")
    print(f"{'config':<28} {'batch':>5} {'tokens':>6} | {'embed timm':>10} {'embed SPoT':>10} {'ratio':>6} | "
          f"{'fwd timm':>9} {'fwd SPoT':>9} {'ratio':>6}")
    for name, (kwargs, batch) in CONFIGS.items():
        model = VisionTransformer(**kwargs).to(device).eval()
        spot = SPoTViT(model)
        x = torch.randn(batch, kwargs.get("in_chans", 3), *model.patch_embed.img_size, device=device)
        pos = spot.grid_positions(batch, device=device)
        embed_timm = timed(lambda: model._pos_embed(model.patch_embed(x)), args.repeats, device)
        embed_spot = timed(lambda: spot._add_prefix_tokens(spot.embed_tokens(x, pos)), args.repeats, device)
        fwd_timm = timed(lambda: model(x), args.repeats, device)
        fwd_spot = timed(lambda: spot(x, pos), args.repeats, device)
        print(f"{name:<28} {batch:>5} {pos.shape[1]:>6} | {embed_timm * 1e3:>8.2f}ms {embed_spot * 1e3:>8.2f}ms "
              f"{embed_spot / embed_timm:>5.2f}x | {fwd_timm * 1e3:>7.1f}ms {fwd_spot * 1e3:>7.1f}ms "
              f"{fwd_spot / fwd_timm:>5.2f}x")


if __name__ == "__main__":
    main()
