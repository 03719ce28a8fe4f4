"""A stage notebook's setup in one line: ``stage = Stage("oracle", globals())``.

The notebook declares only ``profile``, ``out_root`` and ``overrides`` in its
``parameters`` cell; :class:`Stage` does the rest: work from the repository
root (the notebooks' paths are relative to it), refuse parameters papermill
injected that the notebook does not declare, resolve and check the stage's
section of params.yaml for ``profile``, and define its values as the notebook's variables
(printed, so the notebook shows what it ran with). Its methods load the
inputs every stage shares: splits, backbones, saliency maps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data import Split, load_split
from ..utils import default_device, read_json
from .config import PARAMS_FILE, check_stage, load_params, repo_root
from .pipeline import check_parameters, resume_dir


class Stage:
    """One pipeline stage as its notebook sees it: parameters, paths under ``out_root/results``, inputs.

    ``namespace``: the notebook's ``globals()``, holding ``profile``, ``out_root`` and ``overrides``
    (``"stage.key=value"`` strings); the stage's parameters are written into it.
    """

    def __init__(self, name: str, namespace: dict[str, Any]):
        self.root = repo_root()
        os.chdir(self.root)
        check_parameters(name, namespace)
        self.name = name
        self.out_root = Path(namespace.get("out_root") or ".")
        params = load_params(namespace.get("profile"), self.root / PARAMS_FILE, namespace.get("overrides"))
        self.profile = params["profile"]
        self.params: dict[str, Any] = params[name]
        check_stage(name, self.params)
        namespace.update(self.params)
        self.results = self.out_root / "results"
        self.figures = self.out_root / "figures"
        self.device = default_device()
        print(f"profile {self.profile}: stage {name}, results under {self.results}")
        self._build_missing_upstream(namespace.get("overrides"))
        print("parameters:", ", ".join(f"{key}={value!r}" for key, value in self.params.items()))

    def _build_missing_upstream(self, overrides) -> None:
        """A notebook opened on its own (JupyterLab, papermill, nbconvert) first runs the earlier stages
        whose outputs are missing under ``out_root``, with the same profile, through the pipeline's runner."""
        from .pipeline import missing_upstream, run_stage

        for name in missing_upstream(self.name, self.out_root, self.root):
            print(f"stage {name} has no outputs under {self.results}: running it first")
            run_stage(name, self.profile, str(self.out_root), overrides, require_upstream=False)

    @property
    def out_dir(self) -> Path:
        """``results/<stage>/``, the stage's outputs (created)."""
        path = self.results / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resume_dir(self) -> Path:
        """Scratch state a killed run resumes from (outside the stage's DVC outputs)."""
        return resume_dir(self.name, self.out_root)

    def split(self, split: str, size: int | None = None) -> Split:
        """The first ``size`` images (all if None) of the data stage's ``split`` ("train" or "test")."""
        return load_split(self.results / "data", split).head(size)

    def backbones(self, device=None) -> dict:
        """``{name: {"grid": view, "spot": view}}`` from the backbones stage (see ``load_backbones``)."""
        from .backbones import load_backbones

        return load_backbones(self.results / "backbones" / "models.json", device or self.device)

    def replicates(self) -> dict[str, list[str]]:
        """The backbones stage's seed-replicate groups, ``{"mean(A,B)": ["A", "B"]}`` (see
        :func:`spotlib.paper.backbones.replicate_groups`); empty when every backbone is its own recipe."""
        return read_json(self.results / "backbones" / "replicates.json", "run the backbones stage first")

    def saliency(self, split: str, size: int | None = None) -> torch.Tensor:
        """The saliency stage's maps for the first ``size`` images of ``split`` ("test" or "bank"); all it
        computed if ``size`` is None."""
        from .saliency import load_saliency

        maps = load_saliency(self.results / "saliency" / f"{split}.safetensors")
        if size is None:
            return maps
        if maps.shape[0] < size:
            raise ValueError(f"stage saliency computed {maps.shape[0]} {split} maps; raise its {split}_size to {size}")
        return maps[:size]
