"""Top-1 and kNN accuracy of SPoT models under a prior and token budget, and sweeps.

kNN protocol (DINO-style): pooled pre-logit features of a frozen model,
L2-normalised, cosine similarity, the k nearest bank features vote with weight
exp(sim / T). The bank is a training split embedded under the *same* prior and
token budget as the queries.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .data import Split, for_model
from .priors import USES_EXTERNAL_MODEL, sample_positions
from .stats import accuracy_with_ci
from .tokenizer import check_positions
from .utils import check_int, check_positive, frozen, mixed_precision, progress
from .vit import SPoTViT


def check_not_empty(split: Split, what: str) -> None:
    """Raise a clear error for a split without images (rather than a confusing one further down,
    such as a batch size of 0 when the positions are drawn)."""
    if len(split) == 0:
        raise ValueError(f"the {what} is empty (0 images); it needs at least one image "
                         "(check the test_size / bank_size that selected it)")


def draw_positions(
    prior: str, split: Split, num_tokens: int, model: SPoTViT, seed: int = 0, saliency: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions (n, N, 2) for every image of ``split`` (n >= 1), independent of batch size."""
    check_not_empty(split, "split")
    return sample_positions(
        prior, len(split), num_tokens, seed=seed, image_size=split.image_size,
        grid_size=model.grid_size, saliency=saliency,
    )


@torch.no_grad()
def embed(
    model: SPoTViT, split: Split, positions: torch.Tensor | int, batch_size: int = 256, device=None,
    desc: str | None = None, amp: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, K) and pooled features (n, D) of ``split`` at ``positions`` (n, N, 2), float32 on the CPU.

    ``model``: anything with ``forward_features(images, x)`` and its timm ViT as ``model.model`` (a
    :class:`SPoTViT`; also the token-relevance sparsifier, whose ``x``, ``positions`` here, is its
    token budget, an int passed unchanged to every batch). Images are normalised as the model expects
    (:func:`spotlib.data.for_model`); ``amp``: bfloat16 autocast (default: on CUDA only). ``desc``: show
    a progress bar in images/s.
    """
    check_not_empty(split, "split")
    if isinstance(positions, torch.Tensor):
        check_positions(positions, name="positions")
        if positions.shape[0] != len(split):
            raise ValueError(f"positions hold {positions.shape[0]} images, the split {len(split)}")
    batch_size = check_int(batch_size, "batch_size", 1)
    logits, feats = [], []
    split = for_model(split, model)
    with frozen(model), mixed_precision(device, amp):
        bar = progress(total=len(split), desc=desc, unit="img", unit_scale=True, leave=False, disable=desc is None)
        for sl, images, _ in split.batches(batch_size, device):
            where = positions[sl].to(images.device, non_blocking=True) if torch.is_tensor(positions) else positions
            tokens = model.forward_features(images, where)
            pooled = model.model.forward_head(tokens, pre_logits=True)
            feats.append(pooled.float().cpu())
            logits.append(model.model.head(pooled).float().cpu())
            bar.update(len(images))
        bar.close()
    return torch.cat(logits), torch.cat(feats)


def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN labels (q,) for query features (q, D) against a bank (n, D), labels (n,).

    ``k`` >= 1 (at most n are used), ``temperature`` > 0, bank labels in [0, num_classes - 1], n >= 1.
    """
    k = check_int(k, "k", 1)
    num_classes = check_int(num_classes, "num_classes", 1)
    chunk = check_int(chunk, "chunk", 1)
    check_positive(temperature, "temperature")  # T <= 0 would invert or break the exp(sim / T) weights
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_labels.ndim != 1:
        raise ValueError(f"expected bank_features (n, D), bank_labels (n,) and query_features (q, D), got shapes "
                         f"{tuple(bank_features.shape)}, {tuple(bank_labels.shape)} and {tuple(query_features.shape)}")
    if bank_features.shape[0] != bank_labels.shape[0]:
        raise ValueError("bank_features and bank_labels hold different numbers of samples")
    if bank_features.shape[0] == 0:  # would vote for nothing and predict class 0 for every query
        raise ValueError("the kNN bank is empty (0 samples); kNN needs at least one bank feature")
    if bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"bank and query features differ in dimension: {bank_features.shape[1]} vs "
                         f"{query_features.shape[1]}")
    if bank_labels.is_floating_point() or bank_labels.dtype == torch.bool:
        raise TypeError(f"bank_labels must be an integer tensor of class indices, got dtype {bank_labels.dtype}")
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank_labels must be class indices in [0, {num_classes - 1}] (num_classes={num_classes}), "
                         f"got values in [{int(bank_labels.min())}, {int(bank_labels.max())}]")
    if query_features.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    k = min(k, bank_features.shape[0])
    bank = F.normalize(bank_features.float(), dim=1)
    preds = []
    for start in range(0, query_features.shape[0], chunk):
        query = F.normalize(query_features[start : start + chunk].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def evaluate_outcomes(
    model: SPoTViT,
    test: Split,
    bank: Split | None,
    prior: str,
    num_tokens: int,
    *,
    seed: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    device=None,
    saliency_test: torch.Tensor | None = None,
    saliency_bank: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image outcomes ``{"acc1": (n,) bool, "knn": (n,) bool}`` of ``model`` on ``test`` with
    ``num_tokens`` tokens from ``prior``: whether each test image is classified correctly (top-1 of the
    model's head; weighted kNN vote against ``bank``).

    ``positions`` (n, N, 2) overrides the prior for the test split (e.g. oracle
    positions); the kNN bank always uses the prior. ``bank=None`` skips kNN.
    ``test`` and ``bank`` must hold at least one image each.
    """
    # Fail before the (possibly long) embedding, not after it.
    check_not_empty(test, "test split")
    if bank is not None:
        check_not_empty(bank, "kNN bank split")
        check_int(k, "k", 1)
        check_positive(temperature, "temperature")
    if positions is None:
        positions = draw_positions(prior, test, num_tokens, model, seed, saliency_test)
    logits, feats = embed(model, test, positions, batch_size, device)
    bank_feats = None
    if bank is not None:
        bank_positions = draw_positions(prior, bank, num_tokens, model, seed + 1, saliency_bank)
        _, bank_feats = embed(model, bank, bank_positions, batch_size, device)
    return outcomes(logits, feats, test, bank, bank_feats, k, temperature)


def evaluate(model: SPoTViT, test: Split, bank: Split | None, prior: str, num_tokens: int, **kwargs) -> dict[str, float]:
    """{"acc1": %, "knn": %}: the means of :func:`evaluate_outcomes` (same arguments)."""
    return {metric: 100 * correct.float().mean().item()
            for metric, correct in evaluate_outcomes(model, test, bank, prior, num_tokens, **kwargs).items()}


def outcomes(logits: torch.Tensor, feats: torch.Tensor, test: Split, bank: Split | None,
             bank_feats: torch.Tensor | None, k: int = 20, temperature: float = 0.07) -> dict[str, torch.Tensor]:
    """Per-image correctness {"acc1": (n,) bool, "knn": (n,) bool} from the test split's logits (n, K) and
    features (n, D), and the bank's features (m, D) (no "knn" when ``bank`` is None)."""
    result = {"acc1": logits.argmax(1) == test.labels}
    if bank is not None:
        result["knn"] = knn_predict(bank_feats, bank.labels, feats, len(test.classes), k, temperature) == test.labels
    return result


def sweep(
    models: Mapping[str, SPoTViT],
    priors: Mapping[str, Sequence[str]],
    budgets: Sequence[int],
    test: Split,
    bank: Split | None,
    *,
    backbone: str = "",
    saliency: Mapping[str, torch.Tensor] | None = None,
    saliency_name: str | None = None,
    per_image: dict | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Evaluate each model with each of its priors at each budget, with 95 % bootstrap intervals over images.

    Args:
        models: {model name: SPoT view}.
        priors: {model name: prior names to evaluate it with}.
        budgets: token counts N.
        saliency: {"test": (m, H, W), "bank": (m', H, W)} maps for the priors that read them
            (``USES_EXTERNAL_MODEL``); with maps for fewer images than the split (m < n), those
            priors are scored on the first m test (m' bank) images, which the ``n`` column records.
        saliency_name: if given, the rows of those priors are labelled ``"<prior> (<saliency_name>)"``
            (e.g. ``salient (foreground)``), to tell maps of several sources apart.
        per_image: if given, filled with each run's per-image outcomes (bool (n,)), keyed
            (backbone, model, prior, tokens, metric), for paired tests between runs.
        kwargs: passed to :func:`evaluate_outcomes` (seed, k, temperature, batch_size, device).

    The progress bar counts runs and shows the last run's throughput (test and bank images per second).

    Returns:
        Tidy DataFrame with columns backbone, model, prior, oracle, tokens, metric, value (%), ci_low,
        ci_high (the 95 % percentile bootstrap interval over test images, %) and n (test images).
    """
    saliency = saliency or {}
    runs = [(m, p, n) for m in models for p in priors[m] for n in budgets]
    rows = []
    bar = progress(runs, desc=f"sweep {backbone}".strip())
    for model_name, prior, n in bar:
        split, bank_split, sal, label = test, bank, {}, prior
        if prior in USES_EXTERNAL_MODEL:
            label = f"{prior} ({saliency_name})" if saliency_name else prior
            maps, bank_maps = saliency.get("test"), saliency.get("bank")
            split = test.head(None if maps is None else len(maps))
            bank_split = None if bank is None else bank.head(None if bank_maps is None else len(bank_maps))
            sal = {"saliency_test": maps, "saliency_bank": bank_maps}
        start = time.perf_counter()
        scored = evaluate_outcomes(models[model_name], split, bank_split, prior, n, **sal, **kwargs)
        for metric, correct in scored.items():
            if per_image is not None:
                per_image[backbone, model_name, label, n, metric] = correct
            rows.append(dict(backbone=backbone, model=model_name, prior=label, oracle=prior in USES_EXTERNAL_MODEL,
                             tokens=n, metric=metric, **accuracy_with_ci(correct.numpy())))
        images = len(split) + (len(bank_split) if bank_split is not None else 0)
        bar.set_postfix_str(f"{model_name} {prior} {n} tokens: {images / (time.perf_counter() - start):,.0f} img/s",
                            refresh=False)
    return pd.DataFrame(rows)
