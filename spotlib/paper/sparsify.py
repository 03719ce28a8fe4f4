"""Learned token sparsification baseline (SPOT-style token relevance on a fixed patch grid).

Reimplementation, from the abstract only (the authors' code was not available),
of "SPOT: Sparsification with attentiOn dynamics via Token relevance": small
predictors inside a frozen ViT infer per-token relevance from the token
embeddings, their interactions (attention) and how attention changes across
layers (attention dynamics), and the least relevant tokens are removed early.
Not to be confused with SPoT (subpixel placement, :mod:`spotlib.vit`): here
every token is a standard grid patch and the budget is met by *removing*
patches after block ``prune_after``.

Inference (:class:`TokenRelevanceSparsifier`)
---------------------------------------------
Blocks ``0..L`` (``L = prune_after``) run on all T = P + N tokens (P prefix
tokens: class token first, then registers; N grid patches). Their head-averaged
attention probabilities A_l (B, T, T) are captured, and per patch token j the
predictor reads

* the token embedding after block L, through the predictor's own LayerNorm (D values);
* ``T * A_l[cls, j]``: attention the class token pays to j, per layer (L + 1 values);
* ``T * mean_i A_l[i, j]``: attention j receives from all tokens, per layer (L + 1);
* the layer-to-layer differences of both (attention dynamics, 2 L values).

The factor T makes uniform attention read 1 whatever the grid size. A
DynamicViT-style MLP (per-token layer, concatenated with its mean over the
image's tokens as global context, two more layers) maps these 4 L + 2 + D
features to one relevance score per patch token. ``forward(images, keep)``
keeps the ``keep`` highest-scoring patches (prefix tokens always kept), gathers
them in their original raster order, and runs blocks ``L+1..`` on them, then
the final norm and ``model.forward_head``. The score does not depend on the
budget, so one predictor serves every budget. At ``keep = N`` the result is the
unpruned model's output up to float round-off.

Attention probabilities are not exposed by fused attention kernels. While
``model.blocks[l]`` (l <= L) runs, the sparsifier switches that block's
attention to timm's own unfused path (``attn.fused_attn = False``, restored
after) and reads the probabilities with a temporary forward pre-hook on
``attn.attn_drop``, the module timm applies to them. Nothing is computed twice,
so the capture costs no extra FLOPs; the result equals the fused forward up to
round-off. :func:`attention_probs` recomputes the same probabilities from
scratch (``block.attn.qkv`` on ``block.norm1(x)``); the tests check both
against timm's attention output.

Training (:func:`train_sparsifier`)
-----------------------------------
The backbone is frozen; only the predictor trains, by distillation: KL(teacher
|| student), the teacher being the full model's logits and the student the
model at a random budget ``keep ~ U{min_keep..max_keep}``. Two estimators of
the gradient through the discrete top-k:

``"reinforce"`` (default, :meth:`TokenRelevanceSparsifier.policy_loss`): the
scores are the logits of a Plackett-Luce distribution over token orderings.
Per image, S orderings are drawn by Gumbel top-k; the first ``keep`` tokens of
each are kept and the *real pruned model* (the inference path, no gradients)
gives KL_s. The surrogate ``(KL_s - mean of the other samples' KL) * log P(ordering_s)``
is an unbiased score-function gradient of E[KL] (leave-one-out baseline), so
training optimises exactly what inference runs, and nothing is
backpropagated through the ViT. One budget per batch.

``"straight_through"`` (:meth:`TokenRelevanceSparsifier.relaxed_forward`): a
DynamicViT-style differentiable relaxation. Perturbed scores ``z = s + noise * Gumbel``;
forward with the hard top-``keep`` mask of z (budget met exactly, so no ratio
loss), backward through ``sigmoid(z - t)``, t the detached midpoint between the
keep-th and (keep+1)-th largest z. Blocks after L see the mask as in DynamicViT
(:func:`masked_block_forward`): key j's exp-logit is multiplied by m_j in every
softmax row but its own, so with a hard mask the kept tokens never see the
dropped ones (the forward equals pruned inference; tested) while the mask
gradient at m_j = 0 stays non-zero (unlike adding log m to the logits). One
budget per image.

Why REINFORCE is the default: with the backbone frozen, the straight-through
gradient (a first-order expansion in m around the hard mask) barely taught the
predictor to beat random selection. Fashion-MNIST, backbone A (embed 96, depth
4, grid-trained), prune_after=1, hidden 64, defaults (2 epochs on the 60,000
training images, lr 1e-2), top-1 % on the 10,000 test images at keep 6 / 12 / 25
(all 49 patches: 83.73):

* random patches: 69.6 / 76.2 / 81.5
* best single feature (mean attention received in block 1): 74.6 / 78.1 / 80.7
* straight_through (noise 1): 72.2 / 77.0 / 80.8
* reinforce (S = 4): 80.2 / 82.5 / 83.1

Both train at about 1,200 images/s on 2 CPU cores (batch 128).

FLOPs
-----
:func:`count_flops` counts matmul/conv FLOPs (2 per multiply-add) with
``torch.utils.flop_counter.FlopCounterMode``, adding the CPU fused-attention
kernel that torch's table misses, so fused and explicit attention count the
same. Elementwise ops, norms and softmax are not counted (the usual convention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from ..data import Split, for_model
from ..evaluate import embed, outcomes
from ..tokenizer import check_images, grid_positions
from ..utils import frozen, images_per_second, mixed_precision
from ..vit import SPoTViT
from .io import config_from_spec, load_safetensors, read_safetensors_metadata, save_safetensors
from .study import acc1, best_prior, spot_on_rows
from .train import fit, write_log

PREDICTOR_FILE = "predictor.safetensors"
STATE_FILE = "state.pt"


# -- attention helpers ---------------------------------------------------------------------
def _probs_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale): q, k (B, H, T, hd) -> (B, H, T, T), as timm's unfused path."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _check_block(block: nn.Module, index: int) -> None:
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(
            f"block {index} is a {type(block).__name__} with a {type(getattr(block, 'attn', None)).__name__}; "
            "the sparsifier needs timm's pre-norm Block with the standard timm.layers.Attention"
        )


def attention_probs(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, H, T, T) of a timm ``Block`` on its input tokens x (B, T, D).

    Recomputed from ``block.attn.qkv`` on ``block.norm1(x)`` with the block's
    heads, scale and ``q_norm``/``k_norm`` (attention dropout is not applied).
    Applying them to v and ``attn.proj`` gives ``block.attn(block.norm1(x))``.
    """
    attn = block.attn
    B, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return _probs_from_qk(attn.q_norm(q), attn.k_norm(k), attn.scale)


def masked_block_forward(block: Block, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One timm ``Block`` on tokens x (B, T, D) with a soft keep mask (B, T) in [0, 1].

    Uses the block's own modules and weights; only the attention softmax is
    replaced by DynamicViT's masked form
    ``p_ij = (exp(a_ij) w_ij + eps / T) / (sum_l exp(a_il) w_il + eps)`` with
    ``w_ij = m_j`` for j != i and ``w_ii = 1``. With ``mask`` all ones this is
    ``block(x)``; with a 0/1 mask the rows of kept tokens equal ``block`` run on
    the kept tokens alone (up to ``eps``). Differentiable in ``mask``, also
    where it is 0.
    """
    attn = block.attn
    B, T, _ = x.shape
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    eye = torch.eye(T, dtype=x.dtype, device=x.device)
    weight = mask.to(x.dtype)[:, None, None, :] * (1 - eye) + eye  # (B, 1, T, T)
    e = logits.exp() * weight
    probs = (e + eps / T) / (e.sum(dim=-1, keepdim=True) + eps)
    probs = attn.attn_drop(probs)
    out = (probs @ v).transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def plackett_luce_log_prob(scores: torch.Tensor, order: torch.Tensor, places: int) -> torch.Tensor:
    """log P(the first ``places`` entries of ``order``) under Plackett-Luce with logits ``scores``.

    Place i picks ``order[i]`` among the items not yet placed (``order[i:]``) with
    probability softmax over their scores. scores (..., N), order (..., N) a
    permutation of 0..N-1 -> (...). A Gumbel-perturbed argsort of ``scores`` is a
    sample of this distribution.
    """
    ranked = scores.gather(-1, order)
    remaining = ranked.flip(-1).logcumsumexp(-1).flip(-1)  # logsumexp over order[i:]
    return (ranked - remaining)[..., :places].sum(-1)


# -- the predictor ---------------------------------------------------------------------------
class RelevancePredictor(nn.Module):
    """Per-token relevance score from token embeddings and attention features.

    Args:
        dim: token embedding size D.
        num_attn_features: attention features per token (4 L + 2 for L = prune_after).
        hidden: hidden width.

    ``forward(tokens (B, N, D), attn_features (B, N, F)) -> scores (B, N)``.
    """

    def __init__(self, dim: int, num_attn_features: int, hidden: int = 64):
        super().__init__()
        if hidden < 2:
            raise ValueError(f"predictor hidden size must be >= 2, got {hidden}")
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Sequential(nn.Linear(dim + num_attn_features, hidden), nn.GELU())
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1))

    def forward(self, tokens: torch.Tensor, attn_features: torch.Tensor) -> torch.Tensor:
        h = self.local(torch.cat([self.norm(tokens), attn_features], dim=-1))  # (B, N, hidden)
        context = h.mean(dim=1, keepdim=True).expand_as(h)  # global context of the image
        return self.score(torch.cat([h, context], dim=-1)).squeeze(-1)


# -- the sparsifier ------------------------------------------------------------------------
class TokenRelevanceSparsifier(nn.Module):
    """A frozen timm ViT that drops the least relevant patch tokens after block ``prune_after``.

    Args:
        model: a timm ``VisionTransformer`` with a class token and timm's
            standard ``Block``/``Attention`` (its modules are called, never copied).
        prune_after: index of the last block that runs on all tokens, in
            ``[0, depth - 2]`` (e.g. 1 for a 4-block model: blocks 0..1 see all
            tokens, blocks 2..3 only the kept ones).
        hidden: hidden width of the relevance predictor.
        input_stats: (mean, std) the backbone expects its inputs normalised with, or None for
            the dataset's statistics (see :func:`spotlib.data.for_model`).
        seed: if set, seeds torch's global generator before the predictor's random init.

    ``forward(images, keep)`` -> logits (B, num_classes); ``features(images, keep)``
    -> pooled pre-logits (B, D); ``scores(images)`` -> relevance (B, N) in raster
    order (reshape to the grid for a map); ``kept_positions(images, keep)`` ->
    (B, keep, 2) grid centres, (y, x) in [0, 1]. Only ``self.predictor`` has
    trainable weights of its own; the backbone stays ``self.model``.
    """

    def __init__(self, model: VisionTransformer, prune_after: int, hidden: int = 64, input_stats=None,
                 seed: int | None = None):
        super().__init__()
        self.input_stats = input_stats
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"TokenRelevanceSparsifier wraps a timm VisionTransformer, got {type(model).__name__}")
        if model.cls_token is None:
            raise ValueError(
                "TokenRelevanceSparsifier needs a model with a class token (class_token=True): relevance is read "
                "from the class token's attention and the class token is never pruned"
            )
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("models created with dynamic_img_size=True are not supported")
        depth = len(model.blocks)
        if depth < 2:
            raise ValueError(f"the model has {depth} block(s); pruning between blocks needs depth >= 2")
        if isinstance(prune_after, bool) or not isinstance(prune_after, int) or not 0 <= prune_after <= depth - 2:
            raise ValueError(f"prune_after must be an int in [0, {depth - 2}] for a {depth}-block model, got {prune_after!r}")
        for i, block in enumerate(model.blocks):
            _check_block(block, i)
        self.model = model
        self.prune_after = prune_after
        self.hidden = hidden
        if seed is not None:
            torch.manual_seed(seed)
        self.predictor = RelevancePredictor(model.embed_dim, self.num_attn_features, hidden)

    # -- shape facts -------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        """N: patch tokens of the full grid (the largest budget)."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        """P: class (first) and register tokens, always kept."""
        return self.model.num_prefix_tokens

    @property
    def num_attn_features(self) -> int:
        """Attention features per token: 2 (L + 1) per-layer values + 2 L differences."""
        return 4 * self.prune_after + 2

    def check_keep(self, keep: int) -> int:
        """``keep`` as an int, or a ValueError naming the valid range [1, N]."""
        if isinstance(keep, bool) or not isinstance(keep, int):
            try:
                is_int = float(keep).is_integer()
            except (TypeError, ValueError):
                is_int = False
            if not is_int:
                raise TypeError(f"keep must be an int in [1, {self.num_patches}], got {keep!r}")
            keep = int(keep)
        if not 1 <= keep <= self.num_patches:
            raise ValueError(
                f"keep must be in [1, {self.num_patches}] (patch tokens of the {self.grid_size[0]}x{self.grid_size[1]} "
                f"grid; the class token is always kept on top), got {keep}"
            )
        return keep

    # -- forward pieces ------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens before the first block, (B, P + N, D), exactly as timm's forward_features."""
        check_images(images)
        m = self.model
        expected = (m.patch_embed.proj.in_channels, *m.patch_embed.img_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        x = m._pos_embed(m.patch_embed(images))
        return m.norm_pre(m.patch_drop(x))

    def run_prefix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks 0..L on all tokens.

        Returns:
            x: (B, P + N, D) tokens after block L.
            attn_features: (B, N, 4 L + 2) per patch token (see the module docstring).
        """
        x = self.embed(images)
        P, T = self.num_prefix_tokens, x.shape[1]
        captured: list[torch.Tensor] = []
        blocks = list(self.model.blocks[: self.prune_after + 1])
        fused = [block.attn.fused_attn for block in blocks]
        handles = [block.attn.attn_drop.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
                   for block in blocks]
        cls_attn, received = [], []
        try:
            for block in blocks:
                block.attn.fused_attn = False  # timm's explicit softmax path: probabilities pass attn_drop
                captured.clear()
                x = block(x)
                if len(captured) != 1:
                    raise RuntimeError(f"expected one attention map from {type(block.attn).__name__}, got {len(captured)}")
                probs = captured[0].mean(dim=1)  # (B, T, T), head-averaged
                cls_attn.append(probs[:, 0, P:] * T)
                received.append(probs[:, :, P:].mean(dim=1) * T)
        finally:
            for handle in handles:
                handle.remove()
            for block, flag in zip(blocks, fused):
                block.attn.fused_attn = flag
        cls_attn, received = torch.stack(cls_attn, dim=-1), torch.stack(received, dim=-1)  # (B, N, L + 1)
        features = [cls_attn, received, cls_attn.diff(dim=-1), received.diff(dim=-1)]
        return x, torch.cat(features, dim=-1)

    def _score(self, x: torch.Tensor, attn_features: torch.Tensor) -> torch.Tensor:
        return self.predictor(x[:, self.num_prefix_tokens :], attn_features)

    def _run_suffix(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks L+1.. and the final norm on tokens x (B, P + n, D)."""
        for block in self.model.blocks[self.prune_after + 1 :]:
            x = block(x)
        return self.model.norm(x)

    @staticmethod
    def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices (B, keep) of the largest scores, in ascending (raster) order."""
        return scores.topk(keep, dim=1).indices.sort(dim=1).values

    def _prune(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        P = self.num_prefix_tokens
        patches = x[:, P:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :P], patches], dim=1)

    # -- public forward ------------------------------------------------------------------------
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Relevance scores (B, N) of the patch tokens in raster order (higher = kept first)."""
        return self._score(*self.run_prefix(images))

    def keep_indices(self, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Raster indices (B, keep) of the kept patch tokens, ascending."""
        keep = self.check_keep(keep)
        return self._top(self.scores(images), keep)

    def kept_positions(self, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Grid centres (B, keep, 2), (y, x) in [0, 1], of the kept patch tokens (spotlib convention)."""
        idx = self.keep_indices(images, keep)
        grid = grid_positions(self.grid_size, images.shape[0], device=idx.device)
        return grid.gather(1, idx[..., None].expand(-1, -1, 2))

    def forward_features(self, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Output tokens after the final norm, (B, P + keep, D): prefix, then kept patches in raster order."""
        keep = self.check_keep(keep)
        x, attn_features = self.run_prefix(images)
        idx = self._top(self._score(x, attn_features), keep)
        return self._run_suffix(self._prune(x, idx))

    def features(self, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Pooled pre-logit features (B, D) at budget ``keep`` (for kNN)."""
        return self.model.forward_head(self.forward_features(images, keep), pre_logits=True)

    def forward(self, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits (B, num_classes) with the ``keep`` most relevant of the N patch tokens."""
        return self.model.forward_head(self.forward_features(images, keep))

    def relaxed_forward(
        self,
        images: torch.Tensor,
        keep: int | torch.Tensor,
        noise: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: (student logits, teacher logits), both (B, num_classes).

        Args:
            images: (B, C, H, W) model-ready images.
            keep: budget, one int for the batch or one per image (B,) in [1, N].
            noise: scale of the Gumbel noise added to the scores before top-k (0: none).
            generator: source of the noise (drawn on the CPU, so reproducible on any device).

        The backbone runs without gradients up to block L and for the teacher;
        the student runs blocks L+1.. on all tokens under the straight-through
        Gumbel top-k mask (see the module docstring), so gradients reach only
        the predictor. With ``noise=0`` the student equals ``forward(images, keep)``.
        """
        m = self.model
        if m.global_pool != "token" or m.attn_pool is not None:
            raise ValueError(f"training the sparsifier needs class-token pooling (global_pool='token'), "
                             f"the model has global_pool={m.global_pool!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        B, N = images.shape[0], self.num_patches
        if isinstance(keep, torch.Tensor):
            if keep.shape != (B,) or keep.dtype.is_floating_point:
                raise ValueError(f"a per-image keep must be an integer tensor of shape ({B},), got {keep.dtype} {tuple(keep.shape)}")
            if keep.min() < 1 or keep.max() > N:
                raise ValueError(f"keep must be in [1, {N}], got values in [{int(keep.min())}, {int(keep.max())}]")
            keep = keep.to(device=images.device, dtype=torch.long)
        else:
            keep = torch.full((B,), self.check_keep(keep), dtype=torch.long, device=images.device)
        with torch.no_grad():
            x, attn_features = self.run_prefix(images)
            teacher = m.forward_head(self._run_suffix(x))
        scores = self._score(x, attn_features)  # (B, N), the only part with gradients
        z = scores
        if noise > 0:
            gumbel = -torch.empty(scores.shape, dtype=torch.float32).exponential_(generator=generator).log()
            z = scores + noise * gumbel.to(device=scores.device, dtype=scores.dtype)
        # hard top-keep per image, and the midpoint threshold between the last kept and first dropped z
        ordered, order = z.detach().sort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=z.device).expand(B, N))
        hard = (rank < keep[:, None]).to(z.dtype)
        last_kept = ordered.gather(1, (keep - 1)[:, None])
        first_dropped = torch.where(keep[:, None] < N, ordered.gather(1, keep.clamp(max=N - 1)[:, None]), last_kept - 2)
        soft = torch.sigmoid(z - (last_kept + first_dropped) / 2)
        mask = hard + soft - soft.detach()
        mask = torch.cat([mask.new_ones(B, self.num_prefix_tokens), mask], dim=1)
        for block in m.blocks[self.prune_after + 1 :]:
            x = masked_block_forward(block, x, mask)
        return m.forward_head(m.norm(x)), teacher

    def policy_loss(
        self, images: torch.Tensor, keep: int, samples: int = 4, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Score-function (REINFORCE) training objective on the real pruned model.

        The scores define a Plackett-Luce distribution over token orderings;
        ``samples`` orderings per image are drawn by Gumbel top-k (noise on the
        CPU from ``generator``), the first ``keep`` tokens of each are kept and
        the pruned model (exactly the inference path) is run without gradients.
        With KL_s the per-image distillation loss of sample s and b_s the mean
        over the other samples (leave-one-out baseline), the surrogate
        ``mean_s,i (KL_s - b_s) log P(ordering_s)`` has the gradient of
        E[KL] with respect to the scores (unbiased; only the predictor gets one).

        Returns:
            {"loss": surrogate scalar to backpropagate, "kl": (samples, B) KL per
            sample and image, "student": (samples, B, K) logits, "teacher": (B, K)}.
        """
        keep = self.check_keep(keep)
        if samples < 2:
            raise ValueError(f"policy_loss needs samples >= 2 for its leave-one-out baseline, got {samples}")
        m = self.model
        with torch.no_grad():
            x, attn_features = self.run_prefix(images)
            teacher = m.forward_head(self._run_suffix(x))
        scores = self._score(x, attn_features)  # (B, N), the only part with gradients
        B, N = scores.shape
        gumbel = -torch.empty((samples, B, N), dtype=torch.float32).exponential_(generator=generator).log()
        order = (scores.detach() + gumbel.to(device=scores.device, dtype=scores.dtype)).argsort(dim=-1, descending=True)
        with torch.no_grad():
            idx = order[..., :keep].sort(dim=-1).values.reshape(samples * B, keep)
            pruned = self._prune(x.repeat(samples, 1, 1), idx)
            student = m.forward_head(self._run_suffix(pruned)).view(samples, B, -1)
            kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1).expand_as(student), log_target=True,
                          reduction="none").sum(-1)  # (samples, B)
            baseline = (kl.sum(0, keepdim=True) - kl) / (samples - 1)
        log_prob = plackett_luce_log_prob(scores.expand(samples, B, N), order, keep)  # (samples, B)
        loss = ((kl - baseline) * log_prob).mean()
        return {"loss": loss, "kl": kl, "student": student, "teacher": teacher}

    # -- predictor weights -----------------------------------------------------------------------
    def save_predictor(self, path: str | Path) -> None:
        """Predictor weights as safetensors (atomic), with prune_after and hidden as metadata."""
        save_safetensors(self.predictor.state_dict(), path, {"prune_after": self.prune_after, "hidden": self.hidden})

    def load_predictor(self, path: str | Path) -> "TokenRelevanceSparsifier":
        """Load predictor weights written by :meth:`save_predictor` (checks prune_after/hidden)."""
        meta = read_predictor_metadata(path)
        if meta and (meta["prune_after"], meta["hidden"]) != (self.prune_after, self.hidden):
            raise ValueError(f"{path} holds a predictor for prune_after={meta['prune_after']}, hidden={meta['hidden']}; "
                             f"this sparsifier has prune_after={self.prune_after}, hidden={self.hidden}")
        device = next(self.predictor.parameters()).device
        self.predictor.load_state_dict(load_safetensors(path, device=str(device)))
        return self

    @classmethod
    def from_checkpoint(cls, model: VisionTransformer, path: str | Path) -> "TokenRelevanceSparsifier":
        """A sparsifier around ``model`` with the predictor (and its prune_after/hidden) from ``path``."""
        meta = read_predictor_metadata(path)
        if not meta:
            raise ValueError(f"{path} has no prune_after/hidden metadata; build the sparsifier and call load_predictor")
        return cls(model, meta["prune_after"], meta["hidden"]).load_predictor(path).eval()


def read_predictor_metadata(path: str | Path) -> dict[str, int]:
    """{"prune_after": int, "hidden": int} stored in a predictor file ({} if absent)."""
    meta = read_safetensors_metadata(path)
    return {k: int(meta[k]) for k in ("prune_after", "hidden") if k in meta}


# -- training ------------------------------------------------------------------------------
ESTIMATORS = ("reinforce", "straight_through")


@dataclass
class SparsifyConfig:
    """Predictor training: AdamW with a one-cycle schedule, KL distillation from the full model.

    ``estimator``: ``"reinforce"`` (default; :meth:`TokenRelevanceSparsifier.policy_loss`,
    one budget per batch, ``samples`` Gumbel top-k draws per image) or
    ``"straight_through"`` (:meth:`TokenRelevanceSparsifier.relaxed_forward`, one
    budget per image, Gumbel noise of scale ``noise``).
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.05
    warmup: float = 0.1  # one-cycle pct_start
    seed: int = 0
    min_keep: int = 1
    max_keep: int | None = None  # None = the full grid
    estimator: str = "reinforce"
    samples: int = 4  # reinforce: orderings drawn per image
    noise: float = 1.0  # straight_through: scale of the Gumbel noise on the scores (0 = deterministic top-k)
    train_size: int | None = None  # first n training images (None = all)

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (leave-one-out baseline), got {self.samples}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.min_keep < 1 or (self.max_keep is not None and self.max_keep < self.min_keep):
            raise ValueError(f"need 1 <= min_keep <= max_keep, got {self.min_keep}, {self.max_keep}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size must be null or an integer >= 1, got {self.train_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_spec(cls, spec: dict) -> "SparsifyConfig":
        """A config from params.yaml's ``sparsification.train``; unknown keys are errors listing the valid ones."""
        return config_from_spec(cls, spec, "sparsification.train")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over the batch."""
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


def train_sparsifier(sparsifier: TokenRelevanceSparsifier, data: Split, config: SparsifyConfig, out_dir: str | Path,
                     device: str | torch.device = "cpu", state_dir: str | Path | None = None) -> pd.DataFrame:
    """Train the predictor of ``sparsifier`` in place; resume from ``state_dir`` (default ``out_dir``)
    if a checkpoint is there.

    The backbone is frozen (eval mode, no gradients; restored afterwards).
    Budgets keep ~ U{min_keep..max_keep} (per batch for ``reinforce``, per image
    for ``straight_through``), shuffling and Gumbel noise come from a generator
    seeded by (seed, epoch), so a killed run resumes from the last finished
    epoch to the same weights as an uninterrupted one.

    Writes ``predictor.safetensors`` (predictor weights, with prune_after and
    hidden as metadata) to ``out_dir`` and ``state.pt`` (predictor, optimiser,
    schedule, log, epoch) to ``state_dir`` atomically after each epoch, and
    ``log.csv`` / ``log.json`` (without the timing columns) at the end.

    Returns:
        Per-epoch log: epoch, loss (mean KL of the pruned students to the
        teacher), agree (% student top-1 == teacher top-1), mean_keep, lr,
        seconds, images_per_s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir) if state_dir is not None else out_dir
    data = for_model(data.head(config.train_size), sparsifier)
    N = sparsifier.num_patches
    max_keep = config.max_keep or N
    if not 1 <= config.min_keep <= max_keep <= N:
        raise ValueError(f"need 1 <= min_keep <= max_keep <= {N} (patch tokens), got {config.min_keep}, {max_keep}")
    sparsifier.to(device)

    def step(idx: torch.Tensor, gen: torch.Generator, epoch: int):
        images = data.normalise(data.images[idx].to(device))
        if config.estimator == "reinforce":
            keep = int(torch.randint(config.min_keep, max_keep + 1, (1,), generator=gen))
            out = sparsifier.policy_loss(images, keep, config.samples, gen)
            loss, kl, student, teacher = out["loss"], out["kl"].mean(), out["student"][0], out["teacher"]
            keep_sum = keep * len(idx)
        else:
            keep = torch.randint(config.min_keep, max_keep + 1, (len(idx),), generator=gen)
            student, teacher = sparsifier.relaxed_forward(images, keep, config.noise, gen)
            loss = kl = distillation_loss(student, teacher)
            keep_sum = int(keep.sum())
        agree = (student.argmax(1) == teacher.argmax(1)).sum().item()
        return loss, dict(loss=kl.item() * len(idx), agree=100 * agree, mean_keep=keep_sum, seen=len(idx))

    arch = dict(prune_after=sparsifier.prune_after, hidden=sparsifier.hidden, num_patches=N)
    with frozen(sparsifier.model):
        log = fit(sparsifier.predictor, config, len(data), step, lambda: sparsifier.save_predictor(out_dir / PREDICTOR_FILE),
                  state_dir / STATE_FILE, dict(config=asdict(config), arch=arch), "sparsifier", device)
    return write_log(log, out_dir)


# -- evaluation ------------------------------------------------------------------------------
def evaluate_sparsifier(
    sparsifier: TokenRelevanceSparsifier,
    test: Split,
    bank: Split | None,
    keep: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    device=None,
) -> dict[str, torch.Tensor]:
    """Per-image outcomes {"acc1": (n,) bool, "knn": (n,) bool} at budget ``keep``, as
    :func:`spotlib.evaluate.evaluate_outcomes` (bank at the same budget)."""
    keep = sparsifier.check_keep(keep)
    logits, feats = embed(sparsifier, test, keep, batch_size, device)
    bank_feats = None if bank is None else embed(sparsifier, bank, keep, batch_size, device)[1]
    return outcomes(logits, feats, test, bank, bank_feats, k, temperature)


# -- FLOPs ---------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV matmuls of a fused attention call (2 FLOPs per multiply-add)."""
    *batch, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d_q + d_v)


# Fused attention kernels torch's FLOP table lacks (the CPU one, in torch <= 2.14 at least).
_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): _sdpa_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name)
}


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs (matmuls and convolutions, 2 per multiply-add) of ``fn(*args, **kwargs)`` under no_grad."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


# -- against SPoT: costs and accuracy at equal FLOPs ---------------------------------------------
def method_costs(name: str, sparsifier, spot: SPoTViT, test: Split, budgets: Sequence[int], throughput_batch: int,
                 device) -> list[dict]:
    """FLOPs per image and images/s of token relevance and of SPoT at each budget (any pixels will do)."""
    x = test.normalise(test.images[:1].to(device))
    repeat = -(-throughput_batch // len(test))
    xb = test.normalise(test.images[:throughput_batch].repeat(repeat, 1, 1, 1)[:throughput_batch].to(device))
    rows = []
    for n in budgets:
        pos1, posb = spot.grid_positions(1, device)[:, :n], spot.grid_positions(len(xb), device)[:, :n]
        with torch.no_grad(), mixed_precision(device):  # bfloat16 on a GPU, as the evaluation
            rows += [dict(backbone=name, method="Token relevance", tokens=n, flops=count_flops(sparsifier, x, n),
                          images_per_s=images_per_second(lambda: sparsifier(xb, n), len(xb))),
                     dict(backbone=name, method="SPoT", tokens=n, flops=count_flops(spot, x, pos1),
                          images_per_s=images_per_second(lambda: spot(xb, posb), len(xb)))]
    return rows


def compare_at_equal_flops(relevance: pd.DataFrame, costs: pd.DataFrame, sweep: pd.DataFrame,
                           oracle: pd.DataFrame) -> pd.DataFrame:
    """Token relevance against SPoT (best prior, interpolated to equal FLOPs), SPoT-ON and the Patch Grid."""
    best_spot = best_prior(sweep)
    patch_grid = acc1(sweep[sweep.model == "ViT"]).set_index(["backbone", "tokens"]).value
    ceiling = acc1(spot_on_rows(oracle)).set_index(["backbone", "tokens"]).value
    mine = acc1(relevance).set_index(["backbone", "tokens"]).value
    flops = costs.set_index(["backbone", "method", "tokens"]).flops
    rows = []
    for name, group in relevance.groupby("backbone", sort=False):
        budgets = list(dict.fromkeys(group.tokens))
        spot_flops = [flops[name, "SPoT", n] for n in budgets]
        spot_acc = [best_spot.get((name, n), float("nan")) for n in budgets]
        for n in budgets:
            f = flops[name, "Token relevance", n]
            # SPoT's cost grows with N; outside its range there is no SPoT point at this cost
            at_equal = float(np.interp(f, spot_flops, spot_acc)) if spot_flops[0] <= f <= spot_flops[-1] else None
            rows.append(dict(backbone=name, tokens=n, relevance=mine[name, n], spot_best_prior=best_spot.get((name, n)),
                             spot_on=ceiling.get((name, n)), patch_grid=patch_grid.get((name, n)),
                             relevance_mflops=f / 1e6, spot_mflops=flops[name, "SPoT", n] / 1e6,
                             spot_at_equal_flops=at_equal))
    return pd.DataFrame(rows)


def cost_points(costs: pd.DataFrame, relevance: pd.DataFrame, sweep: pd.DataFrame) -> pd.DataFrame:
    """One point per method and budget: MFLOPs, images/s and top-1 with its interval (``ci_low``,
    ``ci_high``): token relevance, the Patch Grid (the grid ViT at N random cells: SPoT's N-token cost)
    and SPoT with its best prior (without the oracle flag) at that budget."""
    plain = acc1(sweep[(sweep.model == "SPoT") & ~sweep.oracle.astype(bool)])
    best = plain.loc[plain.groupby(["backbone", "tokens"]).value.idxmax()].set_index(["backbone", "tokens"])
    grid = acc1(sweep[sweep.model == "ViT"]).set_index(["backbone", "tokens"])
    mine = acc1(relevance).set_index(["backbone", "tokens"])
    rows = []
    for r in costs.itertuples():
        sources = {"Token relevance": mine} if r.method == "Token relevance" else {"SPoT (best prior)": best,
                                                                                  "Patch Grid": grid}
        for method, frame in sources.items():
            if (r.backbone, r.tokens) in frame.index:
                hit = frame.loc[(r.backbone, r.tokens)]
                rows.append(dict(backbone=r.backbone, method=method, tokens=r.tokens, mflops=r.flops / 1e6,
                                 acc1=hit.value, ci_low=hit.ci_low, ci_high=hit.ci_high, images_per_s=r.images_per_s,
                                 **({"prior": hit.prior} if method == "SPoT (best prior)" else {})))
    return pd.DataFrame(rows)


def with_row_costs(tidy: pd.DataFrame, costs: pd.DataFrame, replicates: Mapping[str, Sequence[str]] | None = None
                   ) -> pd.DataFrame:
    """``tidy`` with ``mflops``: each row's forward FLOPs per image at its budget (the sparsifier's for
    token relevance; a row whose "<model>, <prior>" is a method of ``costs``, such as "SPoT, learned
    policy", its own; SPoT's N-token forward for the other grid ViT and SPoT rows; none for SPoT-ON,
    whose cost is a search). A replicate group's rows take its first member's costs (one architecture)."""
    alias = {label: members[0] for label, members in (replicates or {}).items()}
    flops = costs.set_index(["backbone", "method", "tokens"]).flops

    def cost(row) -> float:
        backbone = alias.get(row.backbone, row.backbone)
        own = (backbone, f"{row.model}, {row.prior}", row.tokens)
        if own in flops.index:
            return flops[own] / 1e6
        method = {"Token relevance": "Token relevance", "ViT": "SPoT", "SPoT": "SPoT"}.get(row.model)
        key = (backbone, method, row.tokens)
        return flops[key] / 1e6 if method and key in flops.index else float("nan")
    return tidy.assign(mflops=tidy.apply(cost, axis=1))
