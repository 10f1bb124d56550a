"""Loading a sweep file: YAML parsed once into a frozen :class:`~vlmsae_utils.sweep_schema.SweepConfig`
(its keys and types declared there), then the checks across keys every cell would otherwise fail on."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .data import DECODE_CHOICES
from .hooks import EMBEDDING_HOOK, block_hooks, steerable_hooks
from .io import read_yaml
from .paths import safe_stem
from .sweep_schema import ConfigError, HierarchySection, SaeSection, SweepConfig
from .train_config import grid_configs

__all__ = [
    "EXECUTION_ONLY",
    "RESULTS_NOTEBOOK",
    "RUNS_FILE",
    "SWEEP_RELATIVE_PATHS",
    "ConfigError",
    "load_config",
    "slug",
]


#: Parameters that say where a run executes, not what it computes: not part of a run's fingerprint,
#: so a sweep finished on one GPU is not redone on another (results agree within the tested tolerances).
EXECUTION_ONLY = ("device", "num_workers")
#: Notebook parameters that name a store or SAE folder of the sweep (written relative to its folder).
SWEEP_RELATIVE_PATHS = ("train_store", "val_store", "activations_store", "scorer_store", "uniqueness_store", "sae_path")
RUNS_FILE = "runs.csv"  # in the sweep's folder: every run in order with its state (status table)
RESULTS_NOTEBOOK = "06"  # the chapter that draws a sweep's results tables


# ----------------------------------------------------------------------------- config


def _check_sae_settings(sae: SaeSection, where: str) -> None:
    """Every SAE type of the grid is registered and every (type, expansion, K) a valid TrainConfig
    (k >= 1, fractions summing to 1, …), so a bad value fails here, not hours into the sweep."""
    from .sae import SAE_TYPES

    for key in ("types", "expansions"):
        if not getattr(sae, key):
            raise ConfigError(f"{where}.{key}: a non-empty list")
    unknown = [t for t in sae.types if t not in SAE_TYPES]
    if unknown:
        raise ConfigError(f"{where}.types: unknown SAE type(s) {unknown}; valid: {', '.join(SAE_TYPES)}")
    if not sae.ks:
        raise ConfigError(f"{where}.k: an integer or a non-empty list of integers, got {sae.k!r}")
    try:
        for k in sae.ks:
            grid_configs(sae.types, sae.expansions, k=k, **sae.settings)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_single_k(config: SweepConfig, where: str) -> None:
    """A list of K is a sweep of the grid only: the hierarchy and steering SAEs take one K."""
    if config.sae.sweeps_k and (config.hierarchy or config.steering):
        raise ConfigError(
            f"{where}.sae.k: a list of K values sweeps the grid (Table 1); a config with hierarchy or "
            "steering trains one SAE for them: give one k, or put the K sweep in a config of its own"
        )


def _check_run_values(config: SweepConfig, where: str) -> None:
    """Values every cell would refuse (a device or dtype name, a token mode, a batch size, the
    hierarchy's SAE), refused here by the rules the stages apply, before any cell starts. A device
    is checked by name only: a config is often written on a machine without the cluster's GPUs."""
    import torch

    from .device import DEVICE_NAMES, MODEL_DTYPES
    from .hooks import TOKEN_MODES
    from .store_format import DTYPES

    try:
        known = config.device == "auto" or torch.device(config.device).type in ("cpu", "cuda", "mps")
    except (RuntimeError, TypeError):
        known = False
    choices = {
        "device": (known, ", ".join(DEVICE_NAMES)),
        "model_dtype": (config.model_dtype in ("auto", *MODEL_DTYPES), "auto, " + ", ".join(MODEL_DTYPES)),
        "dtype": (config.dtype in DTYPES, ", ".join(DTYPES)),
        "tokens": (config.tokens in TOKEN_MODES, ", ".join(TOKEN_MODES)),
        "decode": (config.decode in (None, *DECODE_CHOICES), ", ".join(DECODE_CHOICES)),
    }
    for key, (ok, valid) in choices.items():
        if not ok:
            raise ConfigError(f"{where}.{key}: {getattr(config, key)!r} is not valid; valid: {valid}")
    for key, least in (("batch_size", 1), ("num_workers", 0)):
        value = getattr(config, key)
        if value is not None and value < least:
            raise ConfigError(f"{where}.{key}: must be at least {least}, got {value!r}")
    if config.hierarchy is not None:
        _check_hierarchy(config.hierarchy, f"{where}.hierarchy")


def _check_hierarchy(h: HierarchySection, where: str) -> None:
    """The hierarchy's Matryoshka SAE is a valid TrainConfig; it ranks at least 2 top images per latent."""
    if h.top_k < 2:
        raise ConfigError(f"{where}.top_k: the LCA depth needs image pairs: at least 2, got {h.top_k!r}")
    settings = {key: getattr(h, key) for key in ("group_fractions", "steps") if getattr(h, key) is not None}
    try:
        grid_configs(["matryoshka_batch_top_k"], [h.expansion], **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_data(config: SweepConfig, where: str, check_data: bool) -> None:
    """``train`` and ``val`` splits are given; their folders exist (``fixture`` always does) when ``check_data``."""
    for split_name in ("train", "val"):
        if split_name not in config.data:
            raise ConfigError(f"{where}.data: needs 'train' and 'val' entries with data_dir and split")
    for split_name, split in config.data.items():
        if check_data and split.data_dir != "fixture" and not Path(split.data_dir).expanduser().is_dir():
            raise ConfigError(f"{where}.data.{split_name}.data_dir: folder {split.data_dir!r} does not exist")


def _check_lists(config: SweepConfig, where: str) -> None:
    """Layers are block indices or ``last``; models and scorers non-empty (no models: a steering-only config)."""
    for layer in config.layers:
        if layer != "last" and not isinstance(layer, int):
            raise ConfigError(f"{where}.layers: each layer is a block index or 'last', got {layer!r}")
    if not config.scorers:
        raise ConfigError(f"{where}.scorers: a non-empty list of encoder names")
    if not config.models and config.steering is None:
        raise ConfigError(f"{where}.models: a non-empty list of encoder names")
    if config.hierarchy is not None and config.hierarchy_layer() not in config.layers:
        raise ConfigError(
            f"{where}.hierarchy.layer: {config.hierarchy.layer!r} is not one of layers "
            f"{list(config.layers)}; the hierarchy run uses that layer's extraction"
        )


def load_config(path: str | os.PathLike, *, check_data: bool = True) -> SweepConfig:
    """Read a sweep file into one frozen :class:`~vlmsae_utils.sweep_schema.SweepConfig` and check it;
    data folders must exist (``fixture`` always does) unless ``check_data=False`` (to inspect a config
    meant for another machine). Errors name the file, the key and what is expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    where = path.name
    config = SweepConfig.parse(raw, where)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", config.name):
        raise ConfigError(f"{where}.name: use letters, digits, '_', '-' or '.', got {config.name!r}")
    _check_sae_settings(config.sae, f"{where}.sae")
    _check_single_k(config, where)
    _check_data(config, where, check_data)
    _check_lists(config, where)
    _check_hooks(config, where)
    _check_run_values(config, where)
    _check_distinct_slugs(config, where)
    return config


def slug(name: str) -> str:
    """A folder-safe, readable form of an encoder name (``openai/clip-vit-…`` → ``openai_clip-vit-…``);
    names that would give an empty or dot-leading folder get :func:`~.paths.safe_stem` (with a hash)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return readable if readable and not readable.startswith(".") else safe_stem(name)


def _check_distinct_slugs(config: SweepConfig, where: str) -> None:
    """Two different model names must not share a run folder (``a/b`` and ``a_b`` would)."""
    names = set(config.models) | set(config.scorers)
    names |= {config.steering.encoder, config.steering.llava} if config.steering else set()
    seen: dict[str, str] = {}
    for name in sorted(names):
        other = seen.setdefault(slug(name), name)
        if other != name:
            raise ConfigError(f"{where}: models {other!r} and {name!r} would share the run folder {slug(name)!r}")


def _check_hooks(config: SweepConfig, where: str) -> None:
    """``hook`` must be a per-block hook (``last`` in layers is post_projection), ``steering.hook`` a steerable one."""
    checks = [("hook", config.hook, block_hooks(), f"; layers: [last] extracts {EMBEDDING_HOOK}")]
    if config.steering is not None:
        checks.append(("steering.hook", config.steering.hook, steerable_hooks(), ""))
    for key, value, valid, note in checks:
        if value not in valid:
            raise ConfigError(f"{where}.{key}: {value!r} is not a hook this can use; valid: {', '.join(valid)}{note}")
