"""Shared fixtures: tiny random-init timm ViTs and tiny in-memory splits.

Everything here is sized for a 2-core CPU: the whole suite should run in about a
minute. Nothing touches the network.
"""

from __future__ import annotations

import os

# Never reach for the Hugging Face hub from the tests (the data tests build
# local ImageFolder datasets only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from spotlib.data import Split
from spotlib.vit import SPoTViT

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_vit(
    *,
    img_size=16,
    patch_size=4,
    in_chans=1,
    num_classes=3,
    embed_dim=24,
    depth=1,
    num_heads=2,
    seed=0,
    pos_std=0.5,
    **kwargs,
) -> VisionTransformer:
    """A tiny random-init timm ViT in eval mode.

    ``pos_std`` re-initialises the positional embedding (and class/register
    tokens) with a large std so that the positional path matters for the
    output; timm's default (std 0.02) would let a positional bug slip
    through a 1e-5 comparison.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=2.0, **kwargs,
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        if pos_std is not None and model.pos_embed is not None:
            model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=gen) * pos_std)
        for token in (model.cls_token, model.reg_token):
            if token is not None and pos_std is not None:
                token.copy_(torch.randn(token.shape, generator=gen) * pos_std)
        # Non-zero conv bias and head so every term of the embedding shows.
        if model.patch_embed.proj.bias is not None:
            model.patch_embed.proj.bias.copy_(torch.randn(model.patch_embed.proj.bias.shape, generator=gen) * 0.1)
        if hasattr(model.head, "weight"):
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture
def vit_factory():
    """``vit_factory(**kwargs)`` -> tiny random-init ``VisionTransformer`` (eval mode)."""
    return make_vit


def make_split(n=24, channels=1, size=(8, 8), num_classes=2, seed=0) -> Split:
    """Random uint8 split whose label is learnable: class c images are brighter with c."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randint(0, 60, (n, channels, *size), generator=gen)
    images = (noise + labels.view(-1, 1, 1, 1) * (180 // max(1, num_classes - 1))).clamp(0, 255).to(torch.uint8)
    mean = tuple([0.4] * channels)
    std = tuple([0.3] * channels)
    return Split(images, labels, mean, std, tuple(f"c{i}" for i in range(num_classes)))


@pytest.fixture
def split_factory():
    """``split_factory(n, channels, size, num_classes, seed)`` -> tiny in-memory ``Split``."""
    return make_split


@pytest.fixture
def tiny_split():
    return make_split()


# -- a tiny model trained on a task where token placement matters -----------
def blob_task(n: int, seed: int, size: int = 16, blob: int = 4):
    """1-channel images (n, 1, size, size), a bright blob in the top (label 0) or bottom (label 1) half."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = torch.randn(n, 1, size, size, generator=gen) * 0.1
    half = size // 2
    ys = torch.randint(0, half - blob + 1, (n,), generator=gen) + labels * half
    xs = torch.randint(0, size - blob + 1, (n,), generator=gen)
    for i in range(n):
        images[i, 0, ys[i] : ys[i] + blob, xs[i] : xs[i] + blob] += 3.0
    return images, labels


def train_blob_model():
    """A tiny ViT trained for a few seconds with random subpixel tokens on ``blob_task``.

    Returns (SPoTViT, images, labels) with held-out images.
    """
    model = make_vit(img_size=16, patch_size=4, in_chans=1, num_classes=2, embed_dim=32, depth=1,
                     num_heads=2, seed=3, pos_std=0.02)
    spot = SPoTViT(model)
    images, labels = blob_task(512, seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(150):
        idx = torch.randint(0, len(labels), (48,), generator=gen)
        n = int(torch.randint(2, 17, (1,), generator=gen))
        positions = torch.rand(48, n, 2, generator=gen)
        loss = F.cross_entropy(spot(images[idx], positions), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    test_images, test_labels = blob_task(16, seed=1)
    return spot, test_images, test_labels


@pytest.fixture(scope="session")
def trained_blob_model():
    """(SPoTViT, held-out images, labels) of :func:`train_blob_model` (trained once per session)."""
    return train_blob_model()
