"""params.yaml, the profiles that overlay it, and the checks every value passes before a stage runs.

``params.yaml`` holds one section per ``dvc.yaml`` stage: the values of the
default ``embedded`` profile, exactly what ``dvc repro`` runs (each stage tracks
its own section and nothing else). Another profile is an overlay file,
``profiles/<name>.yaml``, in the same shape, holding only what differs; it is
deep-merged over ``params.yaml`` (a ``null`` in place of a mapping removes it:
``models: {A: null}`` drops model A). Under DVC a profile is applied to
``params.yaml`` itself, as ``dvc exp run -S`` overrides
(:func:`dvc_overrides`; ``make repro PROFILE=smoke``), so editing a profile
that is not running reruns nothing.

Configuration is strict: a section must name a stage, and set exactly the keys
of :data:`STAGE_KEYS`, each with a valid value, so a typo is an error listing
the valid choices, checked before the first stage runs
(``python -m spotlib.paper.pipeline check`` checks every profile).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
BASE_PROFILE = "embedded"  # the values in params.yaml itself
APPLIED_KEY = "profile_applied"  # set with a profile's values by dvc_overrides, so a bare label is caught
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("source", "path", "hub_id", "image_size", "resize", "channels", "train_size", "test_size",
             "train_per_class", "seed", "workers"),
    "backbones": ("train_size", "eval_size", "batch_size", "models"),
    "grid_limitation": ("budgets", "priors", "test_size", "batch_size", "seed"),
    "saliency": ("source", "test_size", "bank_size", "batch_size"),
    "spatial_priors": ("budgets", "priors", "extra_saliency", "test_size", "bank_size", "knn_k", "knn_temperature",
                       "batch_size", "seed"),
    "oracle": ("budgets", "init_priors", "test_size", "bank_size", "steps", "lr", "saturation_steps",
               "grid_oracle_budgets", "grid_oracle_size", "extra_saliency", "interdependence_budget",
               "interdependence_size", "knn_k", "knn_temperature", "batch_size", "seed"),
    "sparsification": ("budgets", "prune_after", "hidden", "train", "test_size", "bank_size", "knn_k",
                       "knn_temperature", "batch_size", "throughput_batch"),
    "placement": ("budgets", "init_prior", "train_size", "val_size", "losses", "prior", "policy", "policy_arch",
                  "test_size", "bank_size", "knn_k", "knn_temperature", "batch_size", "throughput_batch", "seed"),
    "figures": ("budgets",),
}


class ConfigError(ValueError):
    """A params.yaml value, key, section or profile that the pipeline cannot run."""


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding dvc.yaml."""
    here = Path(start or os.getcwd()).resolve()
    for path in (here, *here.parents):
        if (path / "dvc.yaml").exists():
            return path
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run from inside the SPoT workspace")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in: dicts recursively, everything else replaced,
    and a ``null`` override of a dict removes it (so a profile can drop the default's models)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_names(root: Path | None = None) -> list[str]:
    """``embedded`` (params.yaml itself) and every ``profiles/<name>.yaml``."""
    root = root or repo_root()
    return [BASE_PROFILE, *sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))]


def read_profile(profile: str, root: Path | None = None) -> dict:
    """The overlay ``profiles/<profile>.yaml`` (sections checked against the stages)."""
    root = root or repo_root()
    path = root / PROFILES_DIR / f"{profile}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown profile {profile!r}; valid choices: {', '.join(profile_names(root))}")
    overlay = yaml.safe_load(path.read_text()) or {}
    _check_sections(overlay, f"{PROFILES_DIR}/{path.name}")
    return overlay


def _check_sections(sections: Mapping, where: str) -> None:
    unknown = [name for name in sections if name not in STAGE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown stage section(s) {', '.join(map(repr, unknown))}; "
                          f"valid choices: {', '.join(STAGE_KEYS)}")


def load_params(profile: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> dict:
    """Every stage section of params.yaml resolved for ``profile`` (default: the file's ``profile``).

    The file's own values are its ``profile`` (``embedded``, or another one when ``dvc exp run -S``
    has applied that profile to it); any other profile's overlay is merged over them.
    ``overrides``: ``"stage.key.sub=value"`` strings (the value read as YAML), applied last, like
    ``dvc exp run -S``; ``"profile=name"`` picks the profile.
    """
    path = Path(path) if path else repo_root() / PARAMS_FILE
    params = yaml.safe_load(path.read_text())
    overrides = list(overrides or [])
    for item in [o for o in overrides if o.split("=", 1)[0].strip() == "profile"]:
        profile = item.split("=", 1)[1].strip()
        overrides.remove(item)
    resolved_for = params.pop("profile", BASE_PROFILE)
    applied = params.pop(APPLIED_KEY, None)
    if resolved_for != BASE_PROFILE and applied != resolved_for:  # a label alone would run the embedded values
        raise ConfigError(f"params.yaml says profile {resolved_for!r} but its values were not applied (no "
                          f"`{APPLIED_KEY}: {resolved_for}`, e.g. after `dvc exp run -S profile={resolved_for}`); "
                          f"apply a profile with all its values: make repro PROFILE={resolved_for} "
                          f"(python -m spotlib.paper.pipeline exp --profile {resolved_for})")
    profile = profile or resolved_for
    _check_sections(params, path.name)
    if profile != resolved_for:
        if resolved_for != BASE_PROFILE:
            raise ConfigError(f"{path.name} is already resolved for profile {resolved_for!r} (inside `dvc exp run`?); "
                              f"cannot apply profile {profile!r} on top of it")
        params = deep_merge(params, read_profile(profile, path.parent))
    for item in overrides:
        params = apply_override(params, item)
    params["profile"] = profile
    return params


def apply_override(params: dict, item: str) -> dict:
    """``params`` with one ``"stage.key.sub=value"`` override applied (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like stage.key=value, e.g. oracle.test_size=100")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    if keys[0] not in STAGE_KEYS or len(keys) < 2:
        raise ConfigError(f"override {item!r}: the key must start with a stage and name a key in it "
                          f"(stage.key=value); stages: {', '.join(STAGE_KEYS)}")
    patch: Any = yaml.safe_load(value)
    for key in reversed(keys):
        patch = {key: patch}
    return deep_merge(params, patch)


def _hydra_value(value) -> str:
    """``value`` in the override grammar of ``dvc exp run -S`` (Hydra's): strings quoted."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_hydra_value, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def dvc_overrides(profile: str, root: Path | None = None) -> list[str]:
    """``dvc exp run -S`` arguments that turn params.yaml into ``profile``'s values: one per leaf of
    its overlay (``++key=value``: set or add), ``~key`` where the overlay removes a mapping, plus
    ``profile`` and ``profile_applied`` set to its name."""
    def leaves(overlay: Mapping, base: Mapping, prefix: str):
        for key, value in overlay.items():
            path = f"{prefix}{key}"
            if value is None and isinstance(base.get(key), dict):
                yield f"~{path}"
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from leaves(value, base[key], path + ".")
            else:
                yield f"++{path}={_hydra_value(value)}"

    root = root or repo_root()
    base = yaml.safe_load((root / PARAMS_FILE).read_text())
    overlay = read_profile(profile, root) if profile != BASE_PROFILE else {}
    marks = [f"++profile={_hydra_value(profile)}"]
    if profile != BASE_PROFILE:
        marks.append(f"++{APPLIED_KEY}={_hydra_value(profile)}")
    return [*marks, *leaves(overlay, base, "")]


# -- values ------------------------------------------------------------------------------------
def _integer(value, minimum: int, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"an integer >= {minimum}" + (" or null" if allow_none else "")
    return None


def _positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return None if ok else "a number > 0"


def _budgets(value) -> str | None:
    ok = isinstance(value, list) and value and all(_integer(v, 1) is None for v in value) and len(set(value)) == len(value)
    return None if ok else "a non-empty list of distinct integers >= 1 (token counts)"


def _prior_names(value) -> str | None:
    from ..priors import PRIORS

    if not isinstance(value, list) or not value:
        return f"a non-empty list of priors from: {', '.join(PRIORS)}"
    bad = [v for v in value if v not in PRIORS]
    return f"a list of priors from: {', '.join(PRIORS)} (unknown: {', '.join(map(repr, bad))})" if bad else None


def _saliency_list(value) -> str | None:
    valid = _saliency_sources()
    if not isinstance(value, list) or any(v not in valid for v in value) or len(set(value)) != len(value):
        return f"a list (possibly empty) of distinct saliency sources from: {', '.join(valid)}"
    return None


def _steps_list(value) -> str | None:
    ok = isinstance(value, list) and value and all(_integer(v, 0) is None for v in value) and len(set(value)) == len(value)
    return None if ok else "a non-empty list of distinct integers >= 0 (oracle step counts)"


def _choice(choices: Callable[[], Any]) -> Callable[[Any], str | None]:
    def check(value):
        valid = list(choices())
        return None if value in valid else f"one of: {', '.join(valid)}"

    return check


def _data_sources():
    from .datasets import SOURCES

    return SOURCES


def _saliency_sources():
    from .saliency import SALIENCY_SOURCES

    return sorted(SALIENCY_SOURCES)


def _backbone_specs(value) -> str | None:
    from .backbones import check_backbone_spec

    if not isinstance(value, dict) or not value:
        return "a mapping {name: backbone spec} with at least one backbone"
    for name, spec in value.items():
        check_backbone_spec(name, spec)  # raises with its own message
    return None


def _sparsifier_train(value) -> str | None:
    from .sparsify import SparsifyConfig

    if not isinstance(value, dict):
        return "a mapping of SparsifyConfig fields"
    SparsifyConfig.from_spec(value)  # raises with its own message
    return None


def _placement_train(value) -> str | None:
    from .placement import PlacementConfig

    if not isinstance(value, dict):
        return "a mapping of PlacementConfig fields"
    PlacementConfig.from_spec(value)  # raises with its own message
    return None


def _policy_arch(value) -> str | None:
    keys = ("view_size", "width", "hidden")
    if not isinstance(value, dict) or any(k not in keys for k in value):
        return f"a mapping with some of: {', '.join(keys)}"
    bad = [k for k, v in value.items() if _integer(v, 4 if k == "view_size" else 1) is not None]
    return f"integers (view_size >= 4, the others >= 1); bad: {', '.join(bad)}" if bad else None


def _losses(value) -> str | None:
    from .placement import LOSSES

    ok = isinstance(value, list) and value and all(v in LOSSES for v in value) and len(set(value)) == len(value)
    return None if ok else f"a non-empty list of distinct losses from: {', '.join(LOSSES)}"


# Checks by key name (any stage), then by (stage, key); each returns None or what the value must be.
KEY_RULES: dict[str, Callable[[Any], str | None]] = {
    **{key: functools.partial(_integer, minimum=1, allow_none=True)
       for key in ("train_size", "test_size", "bank_size", "eval_size", "train_per_class")},
    **{key: functools.partial(_integer, minimum=1)
       for key in ("batch_size", "throughput_batch", "image_size", "knn_k", "workers", "interdependence_size",
                   "grid_oracle_size",
                   "interdependence_budget", "hidden")},
    "seed": functools.partial(_integer, minimum=0),
    "steps": functools.partial(_integer, minimum=0),
    "prune_after": functools.partial(_integer, minimum=0),
    "channels": lambda v: None if v in (1, 3) else "1 or 3",
    "resize": functools.partial(_integer, minimum=1, allow_none=True),
    "lr": _positive_number,
    "knn_temperature": _positive_number,
    "budgets": _budgets,
    "priors": _prior_names,
    "init_priors": _prior_names,
    "grid_oracle_budgets": _budgets,
    "extra_saliency": _saliency_list,
    "saturation_steps": _steps_list,
}
STAGE_RULES: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("data", "source"): _choice(_data_sources),
    ("saliency", "source"): _choice(_saliency_sources),
    ("backbones", "models"): _backbone_specs,
    ("sparsification", "train"): _sparsifier_train,
    ("placement", "train_size"): functools.partial(_integer, minimum=1),
    ("placement", "val_size"): functools.partial(_integer, minimum=1),
    ("placement", "init_prior"): lambda v: _prior_names([v]),
    ("placement", "losses"): _losses,
    ("placement", "prior"): _placement_train,
    ("placement", "policy"): _placement_train,
    ("placement", "policy_arch"): _policy_arch,
}


def check_stage(stage: str, section: Mapping) -> None:
    """Raise :class:`ConfigError` unless ``section`` sets exactly the stage's keys, each valid."""
    declared = STAGE_KEYS[stage]
    if not isinstance(section, Mapping):
        raise ConfigError(f"params for stage {stage!r} must be a mapping of its parameters: {', '.join(declared)}")
    unknown = [k for k in section if k not in declared]
    if unknown:
        raise ConfigError(f"stage {stage!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(declared)}")
    missing = [k for k in declared if k not in section]
    if missing:
        raise ConfigError(f"stage {stage!r}: params.yaml does not set {', '.join(map(repr, missing))}; "
                          f"set every key: {', '.join(declared)}")
    for key, value in section.items():
        rule = STAGE_RULES.get((stage, key)) or KEY_RULES.get(key)
        try:
            problem = rule(value) if rule else None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"stage {stage!r}, key {key!r}: {err}") from err
        if problem:
            raise ConfigError(f"stage {stage!r}, key {key!r} must be {problem}; got {value!r}")
    if stage == "oracle":  # keys that constrain each other
        if max(section["saturation_steps"]) > section["steps"]:
            raise ConfigError(f"stage 'oracle': saturation_steps {section['saturation_steps']} go beyond "
                              f"steps = {section['steps']}; use step counts from 0 to {section['steps']}")
        extra = [n for n in section["grid_oracle_budgets"] if n not in section["budgets"]]
        if extra:
            raise ConfigError(f"stage 'oracle': grid_oracle_budgets {extra} are not in budgets; "
                              f"valid choices: {section['budgets']}")


def check_params(params: Mapping, stages: list[str] | None = None) -> None:
    """Check every stage section of resolved ``params`` (see :func:`check_stage`)."""
    for stage in stages or STAGE_KEYS:
        if stage not in params:
            raise ConfigError(f"params.yaml has no section for stage {stage!r}")
        check_stage(stage, params[stage])
