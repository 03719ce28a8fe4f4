"""Synthetic state dicts in the published formats (the authors' SPoT-B/16, MAE fine-tuned), any size.

Random tensors under the documented key names and shapes, for loader tests and for the
imagenet-profile pipeline test; nothing is downloaded.
"""

from __future__ import annotations

import torch

from spotlib.paper.checkpoints import PUBLISHED_VARIANTS


def published_shapes(variant: str, D=768, depth=12, k=16, classes=1000, hidden=3072) -> dict[str, tuple]:
    """The published key names and shapes (defaults: SPoT-B/16, as documented for the released files)."""
    shapes = {"tokenizer._n_sigma": (1,), "embedder.emb.weight": (D, 4 * k * k), "embedder.emb.bias": (D,),
              "embedder.cls_token": (1, 1, D)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "att.qkv.weight": (3 * D, D), p + "att.qkv.bias": (3 * D,),
            p + "att.proj.weight": (D, D), p + "att.proj.bias": (D,), p + "ls1.lambda_": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.L1.weight": (hidden, D), p + "mlp.L1.bias": (hidden,),
            p + "mlp.L2.weight": (D, hidden), p + "mlp.L2.bias": (D,), p + "ls2.lambda_": (D,),
        })
    pool = "norm" if PUBLISHED_VARIANTS[variant] == "token" else "fc_norm"
    shapes.update({pool + ".weight": (D,), pool + ".bias": (D,), "head.weight": (classes, D), "head.bias": (classes,)})
    return shapes


def published_state_dict(variant: str, seed: int = 0, D=64, depth=2, k=4, classes=5, hidden=256) -> dict:
    """Random tensors under the published key names, tiny shapes (default: width 64, depth 2, k 4, 5 classes)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in published_shapes(variant, D=D, depth=depth, k=k, classes=classes, hidden=hidden).items():
        std = {"embedder.cls_token": 1.0, "tokenizer._n_sigma": 0.0}.get(key, 0.5 if "lambda_" in key else 0.15)
        mean = 1.0 if "norm" in key and key.endswith("weight") else 0.0
        sd[key] = torch.randn(shape, generator=gen) * std + mean
    sd["tokenizer._n_sigma"] += 0.3  # n_sigma = softplus(0.3) ~ 0.854, so the loaded value matters
    sd["tokenizer.logprior"] = torch.randn(7, generator=gen)  # present in some files, unused
    return sd


def mae_state_dict(D=32, depth=2, p=4, img=16, classes=3, hidden=128, seed=0, device=None) -> dict:
    """The official MAE fine-tuned key names (global pool: fc_norm, no final norm), tiny shapes by default."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.3):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(*shape, generator=gen) * std

    n = (img // p) ** 2
    sd = {"cls_token": r(1, 1, D, std=1.0), "pos_embed": r(1, 1 + n, D, std=1.0),
          "patch_embed.proj.weight": r(D, 3, p, p, std=0.1), "patch_embed.proj.bias": r(D)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(hidden, D),
                   b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(D, hidden), b + "mlp.fc2.bias": r(D)})
    sd.update({"fc_norm.weight": 1 + r(D), "fc_norm.bias": r(D), "head.weight": r(classes, D), "head.bias": r(classes)})
    return sd
