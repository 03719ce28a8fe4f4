"""SPoT view of a timm ``VisionTransformer``: tokens at continuous positions.

The view owns no weights of its own. It reads the wrapped model's patch
embedding, class/register tokens, positional embedding, blocks, norms and
head, so a checkpoint of the timm model is a checkpoint of the SPoT model, and
training the view trains the timm model.

Per token at position p (see :mod:`spotlib.tokenizer` for conventions):

* the k x k window around p, sampled bilinearly, goes through the patch
  embedding's convolution weight as a linear map (and its norm, if any);
* the positional embedding is the model's learned (gh, gw) grid of
  embeddings, interpolated bilinearly at p. The learned vectors sit at the grid
  centres (i + 0.5) / gh; between two centres the embedding is the bilinear
  blend, and beyond the outermost centres (a band of half a cell along the
  border) it is held at the nearest edge value (clamped, no extrapolation).

At the grid centres both steps return exactly what timm computes, so
``SPoTViT(m)(x, grid_positions(...)) == m(x)`` up to float round-off.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .tokenizer import PADDING_MODES, check_images, check_positions, grid_positions, sample_windows


class SPoTViT(nn.Module):
    """Wrap a timm ``VisionTransformer`` so that it takes token positions.

    Args:
        model: a timm ``VisionTransformer`` (class token or global pooling,
            any image size, square patch size, any channel count).
        padding: border behaviour of overhanging windows, one of ``PADDING_MODES`` (see
            :func:`spotlib.tokenizer.sample_windows`).

    ``forward(images, positions)`` returns logits (B, num_classes) for images of the
    wrapped model's size, (B, in_chans, *image_size) (as timm's own forward, any other
    size or channel count is refused);
    ``features(images, positions)`` the pooled pre-logit features (B, D).

    ``input_stats``: the per-channel (mean, std) the wrapped model expects its
    inputs normalised with (a pretrained backbone's), or None for the
    dataset's own statistics; :func:`spotlib.data.for_model` applies it, and
    the evaluation and oracle helpers call that for you.
    """

    input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __init__(self, model: VisionTransformer, padding: str = "zeros"):
        super().__init__()
        self._check_model(model)
        if padding not in PADDING_MODES:
            raise ValueError(f"unknown padding {padding!r}; valid choices: {', '.join(PADDING_MODES)}")
        self.model = model
        self.padding = padding

    def _check_common(self, model) -> None:
        """What every view needs: a timm ViT with square patches and a fixed image size."""
        name = type(self).__name__
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"{name} wraps a timm VisionTransformer, got {type(model).__name__}; "
                            "create one with timm.create_model('vit_...')")
        patch = model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"{name} needs square patches, the model has patch size {patch}")
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("models created with dynamic_img_size=True are not supported; positions are continuous already")

    def _check_model(self, model) -> None:
        """Raise if ``model`` cannot be wrapped (subclasses with another tokenizer override this)."""
        self._check_common(model)
        if model.pos_embed is None:
            raise ValueError("SPoTViT needs a learned absolute positional embedding (model.pos_embed is None)")

    # -- shape facts -------------------------------------------------------
    @property
    def window(self) -> int:
        """Window (patch) side k in pixels."""
        return self.model.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        """(gh, gw): the model's learned positional-embedding grid."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def in_chans(self) -> int:
        return self.model.patch_embed.proj.in_channels

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) the wrapped model was built for (its ``img_size``), or None if it has none."""
        size = self.model.patch_embed.img_size
        return None if size is None else tuple(size)

    def check_input(self, images: torch.Tensor) -> None:
        """Raise a clear error unless ``images`` is a float (B, in_chans, *image_size) tensor.

        The positions are normalised, so the tokenizer would sample any image size without
        complaint; but the learned patch weights and positional grid belong to one pixel
        scale, so another size (e.g. 56 x 56 into a 28-px model) gives silently wrong tokens.
        """
        check_images(images)
        size = self.image_size
        C, H, W = images.shape[1:]
        expected = f"(B, {self.in_chans}, {size[0]}, {size[1]})" if size else f"(B, {self.in_chans}, H, W)"
        if C != self.in_chans:
            raise ValueError(f"images have {C} channels but the model expects {self.in_chans}: "
                             f"images must be {expected}, got {tuple(images.shape)}")
        if size is not None and (H, W) != size:
            raise ValueError(f"images are {H}x{W} pixels but the model expects {size[0]}x{size[1]} (its img_size): "
                             f"images must be {expected}, got {tuple(images.shape)}; resize or crop them first")

    @property
    def num_grid_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def grid_positions(self, batch_size: int = 1, device=None) -> torch.Tensor:
        """The full standard grid, (batch_size, gh * gw, 2), in timm's token order."""
        return grid_positions(self.grid_size, batch_size, device=device)

    # -- forward -----------------------------------------------------------
    def embed_tokens(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Patch embedding + positional embedding of N tokens: (B, N, D)."""
        self.check_input(images)
        check_positions(positions, images.shape[0])
        proj = self.model.patch_embed.proj
        windows = sample_windows(images, positions, self.window, self.padding)
        x = F.linear(windows, proj.weight.flatten(1), proj.bias)
        x = self.model.patch_embed.norm(x)
        # Interpolate at full precision even under bfloat16 autocast (bf16 would move a position by up to
        # ~1 px at 224 px); float64 stays float64 (gradcheck).
        pos_dtype = torch.promote_types(x.dtype, torch.float32)
        return x + self.interpolate_pos_embed(positions.to(pos_dtype)).to(x.dtype)

    def interpolate_pos_embed(self, positions: torch.Tensor) -> torch.Tensor:
        """Learned grid positional embedding at continuous positions: (B, N, D)."""
        m = self.model
        gh, gw = self.grid_size
        start = 0 if m.no_embed_class else m.num_prefix_tokens
        table = m.pos_embed[:, start:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        B, N, _ = positions.shape
        # Centres (i + 0.5) / gh are exactly the texel centres of grid_sample
        # with align_corners=False; "border" clamps beyond the outer centres.
        grid = (positions.flip(-1) * 2 - 1).view(1, B * N, 1, 2)
        pe = F.grid_sample(table.to(positions.dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return pe.view(-1, B, N).permute(1, 2, 0)

    def _add_prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend class/register tokens as timm's ``_pos_embed`` does."""
        m = self.model
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype) for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if not m.no_embed_class and m.pos_embed is not None:
                prefix = prefix + m.pos_embed[:, : m.num_prefix_tokens]
            x = torch.cat([prefix, x], dim=1)
        return m.pos_drop(x)

    def forward_features(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, (B, prefix + N, D)."""
        m = self.model
        x = self._add_prefix_tokens(self.embed_tokens(images, positions))
        x = m.norm_pre(x)
        x = m.blocks(x)
        return m.norm(x)

    def features(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (B, D), as used by kNN evaluation."""
        return self.model.forward_head(self.forward_features(images, positions), pre_logits=True)

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for N tokens per image at ``positions`` (B, N, 2)."""
        return self.model.forward_head(self.forward_features(images, positions))
