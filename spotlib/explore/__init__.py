"""An interactive placement explorer: move tokens by hand and watch the prediction.

Two layers, so that everything but the drawing is testable without a browser:

* :class:`Explorer` holds the state (one image, N positions, a prior and budget, a seed) and answers
  from it: ``predict()`` (top-k per model), ``windows()`` (the k x k samples the first model sees),
  ``oracle()`` (SPoT-ON from the current positions), ``snapped()`` (the same tokens moved to grid
  cells). Positions follow :mod:`spotlib.tokenizer`: (N, 2), (y, x) normalised to [0, 1]; every edit
  clamps into [0, 1].
* :meth:`Explorer.widget` lays it out in JupyterLab: a canvas (an ``anywidget``; click to add a token,
  drag to move it, shift-click or right-click to remove it), an image picker (index, class,
  "misclassified at this budget", an upload of one's own image), a prior selector, a budget slider and
  a seed, the top-k probabilities of every model side by side, a SPoT-ON button that animates the
  trajectory with its loss per step, a "snap to grid" toggle, and the tokens' windows in a strip.

Works with any :class:`spotlib.vit.SPoTViT` (the embedded models, or a timm ViT-B/16 at 224 px):
``Explorer({"A": spot_a, "B": spot_b}, split)``.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data import Split, for_model
from ..oracle import OracleResult, spot_on
from ..priors import PRIORS, USES_EXTERNAL_MODEL, sample_positions
from ..tokenizer import sample_windows, snap_to_grid
from ..utils import check_int
from ..vit import SPoTViT

# priors that draw from the current image alone (the salient ones need a saliency map per image)
EXPLORER_PRIORS = tuple(p for p in PRIORS if p not in USES_EXTERNAL_MODEL)


class Explorer:
    """Token placement on one image of ``split``, for one or more SPoT models.

    Args:
        models: ``{name: SPoTViT}``, all for ``split``'s image size (each normalises the image its own
            way, :func:`spotlib.data.for_model`); the first one's window and grid are drawn.
        split: the images to pick from (uint8, with labels and class names).
        prior, num_tokens, seed: the initial placement (``sample_positions``).
        top: how many classes ``predict`` returns per model.
    """

    def __init__(self, models: Mapping[str, SPoTViT], split: Split, prior: str = "isotropic", num_tokens: int = 6,
                 seed: int = 0, top: int = 5):
        if not models:
            raise ValueError("Explorer needs at least one model: {name: SPoTViT}")
        self.models = dict(models)
        self.split = split
        self.top = check_int(top, "top", 1)
        first = next(iter(self.models.values()))
        self.window, self.grid_size = first.window, first.grid_size
        self.index: int | None = None
        self.image: torch.Tensor = split.images[:1]  # (1, C, H, W) uint8, set by select / upload
        self.label: int | None = None
        self.prior, self.num_tokens, self.seed = prior, check_int(num_tokens, "num_tokens", 1), seed
        self.positions = torch.empty(0, 2)
        self.select(0)
        self.draw(prior, num_tokens, seed)

    # -- the image -------------------------------------------------------------------------
    def select(self, index: int) -> None:
        """Make image ``index`` of the split the current one (its label is known)."""
        index = check_int(index, "index", 0, len(self.split) - 1)
        self.index, self.image, self.label = index, self.split.images[index:index + 1], int(self.split.labels[index])

    def upload(self, image) -> None:
        """Make one's own image (a PIL image, or an (H, W[, C]) uint8 array) the current one: converted to
        the split's channels and resized (shorter side, bicubic) and centre-cropped to its size; no label."""
        from PIL import Image

        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("L" if self.split.channels == 1 else "RGB")
        H, W = self.split.image_size
        scale = max(H / pil.height, W / pil.width)
        pil = pil.resize((max(W, round(pil.width * scale)), max(H, round(pil.height * scale))), Image.BICUBIC)
        left, top = (pil.width - W) // 2, (pil.height - H) // 2
        array = np.asarray(pil.crop((left, top, left + W, top + H)), dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        self.index, self.image, self.label = None, torch.from_numpy(array.copy())[None], None

    def inputs(self, name: str) -> torch.Tensor:
        """The current image as model ``name`` expects it: (1, C, H, W) float, normalised."""
        split = for_model(self.split, self.models[name])
        return split.normalise(self.image)

    def indices(self, label: int | None = None, misclassified_by: str | None = None, limit: int = 500) -> list[int]:
        """Split indices (among the first ``limit``) of class ``label`` (any if None) and, with
        ``misclassified_by``, those that model gets wrong with the current prior, budget and seed."""
        candidates = torch.arange(min(limit, len(self.split)))
        if label is not None:
            candidates = candidates[self.split.labels[candidates] == label]
        if misclassified_by is not None and len(candidates):
            model = self.models[misclassified_by]
            part = for_model(self.split.subset(candidates), model)
            positions = sample_positions(self.prior, len(part), self.num_tokens, seed=self.seed,
                                         image_size=part.image_size, grid_size=self.grid_size)
            with torch.no_grad():
                wrong = model(part.normalise(part.images), positions).argmax(1) != part.labels
            candidates = candidates[wrong]
        return candidates.tolist()

    # -- the tokens ------------------------------------------------------------------------
    def draw(self, prior: str | None = None, num_tokens: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Redraw the positions from a prior (seeded: the same prior, budget and seed give the same positions)."""
        prior = self.prior if prior is None else prior
        if prior not in EXPLORER_PRIORS:
            raise ValueError(f"unknown prior {prior!r} for the explorer; valid choices: {', '.join(EXPLORER_PRIORS)}")
        self.prior = prior
        self.num_tokens = check_int(self.num_tokens if num_tokens is None else num_tokens, "num_tokens", 1)
        self.seed = self.seed if seed is None else check_int(seed, "seed", 0)
        self.positions = sample_positions(self.prior, 1, self.num_tokens, seed=self.seed,
                                          image_size=self.split.image_size, grid_size=self.grid_size)[0]
        return self.positions

    def add(self, y: float, x: float) -> None:
        """Add a token centred at (y, x), clamped into [0, 1]."""
        self.positions = torch.cat([self.positions, torch.tensor([[y, x]], dtype=torch.float32).clamp(0, 1)])

    def move(self, index: int, y: float, x: float) -> None:
        """Move token ``index`` to (y, x), clamped into [0, 1]."""
        index = check_int(index, "token index", 0, len(self.positions) - 1)
        self.positions = self.positions.clone()
        self.positions[index] = torch.tensor([y, x]).clamp(0, 1)

    def remove(self, index: int) -> None:
        """Remove token ``index`` (the last one cannot go: a model needs at least one token)."""
        index = check_int(index, "token index", 0, len(self.positions) - 1)
        if len(self.positions) == 1:
            raise ValueError("cannot remove the last token: the model needs at least one")
        self.positions = torch.cat([self.positions[:index], self.positions[index + 1:]])

    def snapped(self) -> torch.Tensor:
        """The current tokens moved to the centres of the grid cells containing them (N, 2)."""
        return snap_to_grid(self.positions, self.grid_size)

    # -- what the models see and say ----------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{model: (K,) softmax}`` at ``positions`` (N, 2) (default: the current ones)."""
        positions = self.positions if positions is None else positions
        return {name: model(self.inputs(name), positions[None].float()).softmax(-1)[0]
                for name, model in self.models.items()}

    def predict(self, positions: torch.Tensor | None = None) -> dict[str, list[tuple[str, float]]]:
        """``{model: [(class name, probability), ...]}``, the ``top`` most probable classes, best first."""
        out = {}
        for name, probs in self.probabilities(positions).items():
            values, classes = probs.topk(min(self.top, len(probs)))
            out[name] = [(self.split.classes[int(c)], float(v)) for v, c in zip(values, classes)]
        return out

    def windows(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The first model's view: (N, C, k, k) windows sampled at ``positions`` (default: the current ones),
        in the model's normalised input space."""
        name = next(iter(self.models))
        positions = self.positions if positions is None else positions
        k = self.window
        out = sample_windows(self.inputs(name), positions[None].float(), k, self.models[name].padding)
        return out[0].view(len(positions), -1, k, k)

    def oracle(self, model: str | None = None, steps: int = 30, lr: float = 0.01) -> OracleResult:
        """SPoT-ON from the current positions with the current image's label (``model``: default the first).
        Raises for an uploaded image (no label): the oracle needs one."""
        if self.label is None:
            raise ValueError("SPoT-ON needs the image's label; an uploaded image has none (pick one from the split)")
        name = model or next(iter(self.models))
        return spot_on(self.models[name], self.inputs(name), torch.tensor([self.label]), self.positions[None],
                       steps=steps, lr=lr)

    def widget(self, size: int = 280):
        """The explorer laid out for JupyterLab (needs ``anywidget`` and ``ipywidgets``); see the module docstring."""
        from .widget import build_widget

        return build_widget(self, size)


# -- small rendering helpers shared with the widget ---------------------------------------------
def to_png(array: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array, each pixel repeated ``scale`` times (crisp pixels)."""
    from PIL import Image

    if scale > 1:
        array = array.repeat(scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_array(image: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) uint8 -> (H, W) or (H, W, 3) uint8 for display."""
    array = image[0].numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def windows_strip(windows: torch.Tensor, scale: int = 6, gap: int = 2) -> np.ndarray:
    """(N, C, k, k) windows (any range) -> one uint8 strip image, windows side by side, each min-max scaled."""
    n, c, k, _ = windows.shape
    lo, hi = windows.amin(dim=(1, 2, 3), keepdim=True), windows.amax(dim=(1, 2, 3), keepdim=True)
    scaled = ((windows - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    tiles = [t.permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1) for t in scaled]
    pad = np.full((k * scale, gap, c), 255, np.uint8)
    strip = np.concatenate([x for t in tiles for x in (t, pad)][:-1], axis=1)
    return strip[..., 0] if c == 1 else strip


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def prediction_html(predictions: Mapping[str, Sequence[tuple[str, float]]], label: str | None) -> str:
    """Top-k bars per model, side by side; the true class (if known) in bold."""
    columns = []
    for name, rows in predictions.items():
        bars = "".join(
            f"<div class='spot-row'><span class='spot-cls'>{'<b>' if c == label else ''}{c}{'</b>' if c == label else ''}"
            f"</span><span class='spot-bar' style='width:{100 * p:.0f}px'></span><span>{100 * p:.1f} %</span></div>"
            for c, p in rows)
        columns.append(f"<div class='spot-model'><div class='spot-name'>{name}</div>{bars}</div>")
    truth = f"true class: <b>{label}</b>" if label is not None else "uploaded image: no label"
    return (f"<div class='spot-predictions' data-top='{next(iter(predictions.values()))[0][0]}'>"
            f"<div>{truth}</div><div style='display:flex;gap:24px'>{''.join(columns)}</div></div>")


def sleep_frame(seconds: float) -> None:
    """Pause between animation frames (a function, so tests can skip the wait)."""
    time.sleep(seconds)
