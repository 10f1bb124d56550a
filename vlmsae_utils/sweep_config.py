"""The sweep file's schema: the keys of each section with their types, checked once when it is loaded."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .data import DECODE_CHOICES
from .executor_config import ExecutorConfig, parse_executor
from .hooks import DEFAULT_HOOK, EMBEDDING_HOOK, block_hooks, steerable_hooks
from .io import read_yaml
from .paths import safe_stem
from .train_config import TrainConfig, grid_configs

__all__ = [
    "EXECUTION_ONLY",
    "HIERARCHY_KEYS",
    "REQUIRED",
    "RESULTS_NOTEBOOK",
    "RUNS_FILE",
    "SAE_KEYS",
    "SAE_SETTINGS",
    "SPLIT_KEYS",
    "STEERING_KEYS",
    "STEERING_REQUIRED",
    "SWEEP_RELATIVE_PATHS",
    "TOP_KEYS",
    "TRAIN_DEFAULTS",
    "TRAIN_RUN_SETTINGS",
    "ConfigError",
    "executor_settings",
    "grid_ks",
    "load_config",
    "slug",
]


TOP_KEYS = {
    "name": str,
    "data": dict,
    "models": list,
    "layers": list,
    "tokens": str,
    "dtype": str,
    "batch_size": int,
    "scorers": list,
    "sae": dict,
    "hierarchy": dict,
    "steering": dict,
    "device": str,
    "model_dtype": str,
    "num_workers": int,
    "decode": str,
    "hook": str,
    "executor": dict,
}
#: Parameters that say where a run executes, not what it computes: not part of a run's fingerprint,
#: so a sweep finished on one GPU is not redone on another (results agree within the tested tolerances).
EXECUTION_ONLY = ("device", "num_workers")
REQUIRED = ("name", "data", "models", "layers", "scorers", "sae")
#: TrainConfig fields a sweep's ``sae`` section may set: every setting besides the grid's, as notebook 02 takes them.
SAE_SETTINGS = TrainConfig.setting_names()
#: Settings every training run passes to notebook 02 (set or not: they are in today's run fingerprints);
#: any other setting is passed only where the ``sae`` section sets it, so finished sweeps stay finished.
TRAIN_RUN_SETTINGS = ("k", "batch_size", "lr", "seed", "aux_alpha", "decay_start")
#: The ``sae`` section: the grid's types and expansions, and settings typed as TrainConfig declares them.
#: ``k`` may also be a list: a sparsity sweep, every (type, expansion) trained at each K (Table 1).
SAE_KEYS = {
    "types": list,
    "expansions": list,
    **{key: TrainConfig.value_types(key) for key in SAE_SETTINGS},
    "k": (int, list),
}
STEERING_REQUIRED = ("llava", "encoder", "layer")  # a steering section names what it steers
#: Notebook parameters that name a store or SAE folder of the sweep (written relative to its folder).
SWEEP_RELATIVE_PATHS = ("train_store", "val_store", "activations_store", "scorer_store", "uniqueness_store", "sae_path")
RUNS_FILE = "runs.csv"  # in the sweep's folder: every run in order with its state (status table)
RESULTS_NOTEBOOK = "06"  # the chapter that draws a sweep's results tables
TRAIN_DEFAULTS = TrainConfig()  # what an unset key of the sae section means
HIERARCHY_KEYS = {"layer": (int, str), "expansion": (int, float), "group_fractions": list, "top_k": int, "steps": int}
STEERING_KEYS = {
    "llava": str,
    "encoder": str,
    "layer": int,
    "expansion": (int, float),
    "steps": int,
    "num_images": int,
    "alphas": list,
    "clip_text_model": str,
    "latents": list,
    "alpha_scale": str,
    "score_alpha": (int, float),
    "random_k": int,
    "concept_pool": str,
    "concept_tokens": str,
    "concept_shortlist": int,
    "image_latents": int,
    "hook": str,
}
SPLIT_KEYS = {"data_dir": str, "split": (str, type(None))}


class ConfigError(ValueError):
    """A sweep file with unknown keys, wrong types or missing data."""


# ----------------------------------------------------------------------------- config


def _check_keys(section: dict, allowed: dict, where: str) -> None:
    """Unknown keys and wrong value types are errors that name the key. YAML reads ``2e-4`` (no dot)
    as a string: where a number is expected, such strings are read as numbers."""
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(allowed)}")
    for key, value in list(section.items()):
        expected = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if isinstance(value, str) and float in expected and str not in expected:
            with contextlib.suppress(ValueError):
                section[key] = value = float(value)
        if not isinstance(value, allowed[key]) or (isinstance(value, bool) and allowed[key] is int):
            expected = allowed[key] if isinstance(allowed[key], type) else " or ".join(t.__name__ for t in allowed[key])
            expected = getattr(expected, "__name__", expected)
            raise ConfigError(f"{where}.{key}: expected {expected}, got {value!r}")


def _check_sae_settings(sae: dict, where: str) -> None:
    """Every SAE type of the grid is registered and every (type, expansion) a valid TrainConfig (k >= 1,
    fractions summing to 1, …), so a bad value fails here, not hours into the sweep."""
    from .sae import SAE_TYPES

    unknown = [t for t in sae.get("types") or [] if t not in SAE_TYPES]
    if unknown:
        raise ConfigError(f"{where}.types: unknown SAE type(s) {unknown}; valid: {', '.join(SAE_TYPES)}")
    ks = grid_ks(sae)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ConfigError(f"{where}.k: an integer or a non-empty list of integers, got {sae.get('k')!r}")
    settings = {key: sae[key] for key in SAE_SETTINGS if key in sae and key != "k"}
    try:
        for k in ks:
            grid_configs(sae.get("types") or [], sae.get("expansions") or [], k=k, **settings)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def grid_ks(sae: dict) -> list:
    """The K values of the grid: ``sae.k`` as a list (one value when it is a number; unset: TrainConfig's)."""
    k = sae.get("k", TRAIN_DEFAULTS.k)
    return list(k) if isinstance(k, list) else [k]


def _check_single_k(config: dict[str, Any], where: str) -> None:
    """A list of K is a sweep of the grid only: the hierarchy and steering SAEs take one K."""
    if isinstance(config["sae"].get("k"), list) and ({"hierarchy", "steering"} & set(config)):
        raise ConfigError(
            f"{where}.sae.k: a list of K values sweeps the grid (Table 1); a config with hierarchy or "
            "steering trains one SAE for them: give one k, or put the K sweep in a config of its own"
        )


def _check_run_values(config: dict[str, Any], where: str) -> None:
    """Values every cell would refuse (a device or dtype name, a token mode, a batch size, the
    hierarchy's SAE), refused here by the rules the stages apply, before any cell starts. A device
    is checked by name only: a config is often written on a machine without the cluster's GPUs."""
    import torch

    from .device import DEVICE_NAMES, MODEL_DTYPES
    from .hooks import TOKEN_MODES
    from .store_format import DTYPES

    device = config.get("device", "auto")
    try:
        known = device == "auto" or torch.device(device).type in ("cpu", "cuda", "mps")
    except (RuntimeError, TypeError):
        known = False
    choices = {
        "device": (known, ", ".join(DEVICE_NAMES)),
        "model_dtype": (
            config.get("model_dtype", "auto") in ("auto", *MODEL_DTYPES),
            "auto, " + ", ".join(MODEL_DTYPES),
        ),
        "dtype": (config.get("dtype", "float32") in DTYPES, ", ".join(DTYPES)),
        "tokens": (config.get("tokens", "cls") in TOKEN_MODES, ", ".join(TOKEN_MODES)),
        "decode": (config.get("decode", "cpu") in DECODE_CHOICES, ", ".join(DECODE_CHOICES)),
    }
    for key, (ok, valid) in choices.items():
        if not ok:
            raise ConfigError(f"{where}.{key}: {config[key]!r} is not valid; valid: {valid}")
    for key, least in (("batch_size", 1), ("num_workers", 0)):
        if key in config and config[key] < least:
            raise ConfigError(f"{where}.{key}: must be at least {least}, got {config[key]!r}")
    if "hierarchy" in config:
        _check_hierarchy(config["hierarchy"], f"{where}.hierarchy")


def _check_hierarchy(h: dict[str, Any], where: str) -> None:
    """The hierarchy's Matryoshka SAE is a valid TrainConfig; it ranks at least 2 top images per latent."""
    if h.get("top_k", 16) < 2:
        raise ConfigError(f"{where}.top_k: the LCA depth needs image pairs: at least 2, got {h['top_k']!r}")
    settings = {key: h[key] for key in ("group_fractions", "steps") if key in h}
    try:
        grid_configs(["matryoshka_batch_top_k"], [h.get("expansion", 2)], **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | os.PathLike, *, check_data: bool = True) -> dict[str, Any]:
    """Read and validate a sweep file; data folders must exist (``fixture`` always does) unless
    ``check_data=False`` (to inspect a config meant for another machine)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    try:
        config = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    where = path.name
    _check_keys(config, TOP_KEYS, where)
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", config["name"]):
        raise ConfigError(f"{where}.name: use letters, digits, '_', '-' or '.', got {config['name']!r}")
    _check_keys(config["sae"], SAE_KEYS, f"{where}.sae")
    _check_sae_settings(config["sae"], f"{where}.sae")
    _check_single_k(config, where)
    for section, keys in (("hierarchy", HIERARCHY_KEYS), ("steering", STEERING_KEYS)):
        if section in config:
            _check_keys(config[section], keys, f"{where}.{section}")
    missing = [key for key in STEERING_REQUIRED if key not in config.get("steering", {key: None})]
    if missing:
        raise ConfigError(f"{where}.steering: missing key(s) {missing}")
    for split_name in ("train", "val"):
        if split_name not in config["data"]:
            raise ConfigError(f"{where}.data: needs 'train' and 'val' entries with data_dir and split")
    for split_name, split in config["data"].items():
        if not isinstance(split, dict) or "data_dir" not in split:
            raise ConfigError(f"{where}.data.{split_name}: a mapping with data_dir (and split), got {split!r}")
        _check_keys(split, SPLIT_KEYS, f"{where}.data.{split_name}")
        if check_data and split["data_dir"] != "fixture" and not Path(split["data_dir"]).expanduser().is_dir():
            raise ConfigError(f"{where}.data.{split_name}.data_dir: folder {split['data_dir']!r} does not exist")
    for layer in config["layers"]:
        if layer != "last" and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ConfigError(f"{where}.layers: each layer is a block index or 'last', got {layer!r}")
    _check_hooks(config, where)
    _check_run_values(config, where)
    for key in ("models", "scorers"):
        may_be_empty = key == "models" and "steering" in config  # a steering-only config trains no grid
        if not (config[key] or may_be_empty) or not all(isinstance(m, str) for m in config[key]):
            raise ConfigError(f"{where}.{key}: a non-empty list of encoder names")
    for key in ("types", "expansions"):
        if not config["sae"].get(key):
            raise ConfigError(f"{where}.sae.{key}: a non-empty list")
    _check_distinct_slugs(config, where)
    executor_settings(config, where)
    if "hierarchy" in config and config["hierarchy"].get("layer", config["layers"][0]) not in config["layers"]:
        raise ConfigError(
            f"{where}.hierarchy.layer: {config['hierarchy']['layer']!r} is not one of layers "
            f"{config['layers']}; the hierarchy run uses that layer's extraction"
        )
    return config


def executor_settings(config: dict[str, Any], where: str = "sweep") -> ExecutorConfig:
    """The config's ``executor:`` block, validated (inline defaults when absent)."""
    try:
        return parse_executor(config.get("executor"), f"{where}.executor", device=config.get("device", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def slug(name: str) -> str:
    """A folder-safe, readable form of an encoder name (``openai/clip-vit-…`` → ``openai_clip-vit-…``);
    names that would give an empty or dot-leading folder get :func:`~.paths.safe_stem` (with a hash)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return readable if readable and not readable.startswith(".") else safe_stem(name)


def _check_distinct_slugs(config: dict[str, Any], where: str) -> None:
    """Two different model names must not share a run folder (``a/b`` and ``a_b`` would)."""
    names = set(config["models"]) | set(config["scorers"])
    names |= {config.get("steering", {}).get(key) for key in ("encoder", "llava")} - {None}
    seen: dict[str, str] = {}
    for name in sorted(names):
        other = seen.setdefault(slug(name), name)
        if other != name:
            raise ConfigError(f"{where}: models {other!r} and {name!r} would share the run folder {slug(name)!r}")


def _check_hooks(config: dict[str, Any], where: str) -> None:
    """``hook`` must be a per-block hook (``last`` in layers is post_projection), ``steering.hook`` a steerable one."""
    checks = [("hook", config.get("hook", DEFAULT_HOOK), block_hooks(), f"; layers: [last] extracts {EMBEDDING_HOOK}")]
    if "steering" in config:
        checks.append(("steering.hook", config["steering"].get("hook", DEFAULT_HOOK), steerable_hooks(), ""))
    for key, value, valid, note in checks:
        if value not in valid:
            raise ConfigError(f"{where}.{key}: {value!r} is not a hook this can use; valid: {', '.join(valid)}{note}")
