"""spotlib: Subpixel Placement of Tokens (SPoT) for timm Vision Transformers.

Public API::

    sample_windows(images, positions, window)      # subpixel tokenizer
    grid_positions(grid_size, batch_size)          # the standard patch grid
    sample_positions(prior, B, N, seed=...)        # spatial priors (PRIORS)
    SPoTViT(timm_vit)(images, positions)           # SPoT view of a timm ViT
    spot_on(model, images, labels, init_positions) # SPoT-ON oracle
    evaluate / sweep / knn_predict                 # top-1 and kNN accuracy

Positions are (B, N, 2) token centres, (y, x) normalised to [0, 1]; see
:mod:`spotlib.tokenizer` for the coordinate convention.
"""

from .evaluate import embed, evaluate, knn_predict, sweep
from .oracle import OracleResult, evaluate_positions, spot_on
from .priors import PRIORS, register_prior, sample_positions
from .tokenizer import grid_positions, sample_windows
from .vit import SPoTViT

__all__ = [
    "PRIORS", "OracleResult", "SPoTViT", "embed", "evaluate", "evaluate_positions", "grid_positions",
    "knn_predict", "register_prior", "sample_positions", "sample_windows", "spot_on", "sweep",
]
__version__ = "0.1.0"
