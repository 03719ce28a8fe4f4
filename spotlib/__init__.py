"""spotlib: Subpixel Placement of Tokens (SPoT) for timm Vision Transformers.

Public API::

    sample_windows(images, positions, window)      # subpixel tokenizer
    grid_positions(grid_size, batch_size)          # the standard patch grid
    sample_positions(prior, B, N, seed=...)        # spatial priors (PRIORS)
    SPoTViT(timm_vit)(images, positions)           # SPoT view of a timm ViT
    spot_on(model, images, labels, init_positions) # SPoT-ON oracle
    evaluate / sweep / knn_predict                 # top-1 and kNN accuracy (sweep: with intervals)
    grid_oracle(model, images, labels, N)          # the grid-constrained oracle (greedy over cells)

Positions are (B, N, 2) token centres, (y, x) normalised to [0, 1]; see
:mod:`spotlib.tokenizer` for the coordinate convention.
"""

try:
    from .evaluate import embed, evaluate, evaluate_outcomes, knn_predict, sweep
except ModuleNotFoundError as err:  # e.g. DVC's `python` resolved to the system interpreter, not the project's
    import sys

    raise ModuleNotFoundError(
        f"spotlib needs {err.name!r}, which {sys.executable} does not have: use the project's environment "
        "(make setup, then make repro / make test, or put .venv/bin first on PATH)", name=err.name) from err
from .oracle import OracleResult, grid_oracle, one_at_a_time, spot_on
from .priors import PRIORS, register_prior, sample_positions
from .tokenizer import grid_positions, sample_windows
from .vit import SPoTViT

__all__ = [
    "PRIORS", "OracleResult", "SPoTViT", "embed", "evaluate", "evaluate_outcomes", "grid_oracle", "grid_positions", "knn_predict", "one_at_a_time",
    "register_prior", "sample_positions", "sample_windows", "spot_on", "sweep",
]
__version__ = "0.1.0"
