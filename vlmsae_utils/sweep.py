"""Experiment grids: a YAML config → papermill runs of notebooks 01–05, resumable, gathered into tables.

``python -m vlmsae_utils.run --config configs/fixture.yaml [--dry-run]`` expands models × layers ×
SAE types × expansions × scorers into notebook runs, skips runs whose outputs are complete,
runs the rest in dependency order (extract → train → score → hierarchy / steer), keeps each
executed notebook and log beside its outputs, and writes ``results/<name>/*.csv``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from . import kernels
from .executor_config import ExecutorConfig, parse_executor
from .hierarchy import LEVELS_FILE, PAPER_GROUP_FRACTIONS
from .hooks import DEFAULT_HOOK, EMBEDDING_HOOK, block_hooks, steerable_hooks
from .io import LOCK_FILE, FolderLockedError, atomic_write_json, folder_lock, read_json, read_yaml, sha256_json
from .paths import outputs_root, results_root, safe_stem
from .scoring import MS_SUMMARY_FILE
from .steering_study import STEERING_SCORES_FILE
from .train import run_name
from .train_config import TrainConfig, grid_configs

__all__ = [
    "DONE_FILE",
    "EXECUTION_ONLY",
    "EXPECTED_OUTPUTS",
    "HIERARCHY_KEYS",
    "JOB_FILE",
    "KEPT_ON_REDO",
    "LOCK_FILE",
    "REQUIRED",
    "RESULTS_NOTEBOOK",
    "RUNS_FILE",
    "SAE_KEYS",
    "SAE_SETTINGS",
    "SPLIT_KEYS",
    "STARTED_FILE",
    "STEERING_KEYS",
    "STEERING_REQUIRED",
    "TOP_KEYS",
    "TRAIN_DEFAULTS",
    "ConfigError",
    "Run",
    "SweepLockedError",
    "SweepResults",
    "complete_runs",
    "ensure_fixture_results",
    "execute",
    "execute_results_chapter",
    "execute_run",
    "executor_settings",
    "expand",
    "gather",
    "is_complete",
    "load_config",
    "load_results",
    "notebook_runner",
    "resolved_parameters",
    "run_sweep",
    "slug",
    "start_run",
    "sweep_dir",
    "sweep_lock",
]

DONE_FILE = "_sweep_run.json"
STARTED_FILE = "_sweep_started.json"  # written when a run starts: which parameters and inputs it is making
JOB_FILE = "_job.json"  # written by the executor: the job that runs the cell
#: What a run folder keeps when its outputs are cleared for a redo: the lock, the job record and its logs.
KEPT_ON_REDO = (LOCK_FILE, JOB_FILE, "job.out", "job.err")
log = logging.getLogger(__name__)
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


class SweepLockedError(FolderLockedError):
    """Another process is running the same sweep."""


@dataclass
class Run:
    """One notebook execution of a sweep."""

    kind: str
    notebook: str
    out_dir: str  # relative to the sweep folder
    parameters: dict[str, Any]
    depends: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)  # model, layer, … for the results tables

    @property
    def id(self) -> str:
        """Unique name of the run (its output folder)."""
        return self.out_dir


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
        _check_keys(split, SPLIT_KEYS, f"{where}.data.{split_name}")
        if check_data and split["data_dir"] != "fixture" and not Path(split["data_dir"]).expanduser().is_dir():
            raise ConfigError(f"{where}.data.{split_name}.data_dir: folder {split['data_dir']!r} does not exist")
    for layer in config["layers"]:
        if layer != "last" and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ConfigError(f"{where}.layers: each layer is a block index or 'last', got {layer!r}")
    _check_hooks(config, where)
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


# ----------------------------------------------------------------------------- expansion


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


def _layer_params(layer: int | str, hook: str = DEFAULT_HOOK) -> dict[str, Any]:
    """Hook and layer parameters of notebook 01 for a config layer (``last`` = post_projection)."""
    return {"hook": EMBEDDING_HOOK, "layer": -1} if layer == "last" else {"hook": hook, "layer": layer}


def _layer_dir(layer: int | str, hook: str = DEFAULT_HOOK) -> str:
    """Folder of a layer's runs: ``L<layer>``, with the hook appended when it is not the default
    (so runs of the default hook keep their folders, parameters and fingerprints)."""
    return f"L{layer}" if layer == "last" or hook == DEFAULT_HOOK else f"L{layer}_{hook}"


def _train_settings(sae: dict[str, Any], k: int | None) -> dict[str, Any]:
    """Notebook 02's settings of one training run: :data:`TRAIN_RUN_SETTINGS` (unset: TrainConfig's
    defaults), ``k`` of the run, and every other setting the ``sae`` section sets (not ``steps`` and
    ``group_fractions``, which a run's caller chooses)."""
    settings = {name: sae.get(name, getattr(TRAIN_DEFAULTS, name)) for name in TRAIN_RUN_SETTINGS}
    settings["k"] = settings["k"] if k is None else k
    chosen = ("steps", "group_fractions", *TRAIN_RUN_SETTINGS)
    return settings | {name: sae[name] for name in SAE_SETTINGS if name in sae and name not in chosen}


def expand(config: dict[str, Any]) -> list[Run]:
    """Every notebook run of a sweep, dependencies first."""
    runs: list[Run] = []
    sae = config["sae"]
    k_sweep = isinstance(sae.get("k"), list)  # each K in its own folder (one K keeps today's folder names)
    hook = config.get("hook", DEFAULT_HOOK)
    extract = functools.partial(_extract_run, config, runs)
    embed = functools.partial(_embed_run, config, runs)
    train = functools.partial(_train_run, sae, runs)
    val_embeddings = {s: embed(s, "val") for s in config["scorers"]} if config["models"] else {}
    for model in config["models"]:
        for layer in config["layers"]:
            train_store, val_store = extract(model, layer, "train"), extract(model, layer, "val")
            trained = [
                train(
                    train_store,
                    val_store,
                    t,
                    e,
                    sae.get("group_fractions"),
                    sae.get("steps", TRAIN_DEFAULTS.steps),
                    f"train/{slug(model)}/{_layer_dir(layer, hook)}/{t}_x{e:g}" + (f"_k{k}" if k_sweep else ""),
                    k,
                )
                for t in sae["types"]
                for e in sae["expansions"]
                for k in grid_ks(sae)
            ]
            for scorer, embedding in val_embeddings.items():
                _add(runs, _score_run(model, layer, hook, scorer, embedding, train_store, val_store, trained))
            if "hierarchy" in config and layer == config["hierarchy"].get("layer", config["layers"][0]):
                _hierarchy(config, runs, train_store, val_store, model, layer, embed, train)
    if "steering" in config:
        _steering(config, runs, extract, train)
    for run in runs:
        _add_execution_parameters(config, run)
    return runs


def _store_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """What every extraction of a sweep shares: the storage dtype and the batch size."""
    return {"dtype": config.get("dtype", "float32"), "batch_size": config.get("batch_size", 64)}


def _extract_run(
    config: dict[str, Any],
    runs: list[Run],
    model: str,
    layer,
    split: str,
    tokens: str | None = None,
    random_k: int = 2,
    hook: str | None = None,
) -> Run:
    """Notebook 01 on one split: a model's activations at ``layer`` (the sweep's tokens and hook unless given)."""
    tokens = config.get("tokens", "cls") if tokens is None else tokens
    hook = config.get("hook", DEFAULT_HOOK) if hook is None else hook
    data = config["data"][split]
    suffix = "" if tokens == config.get("tokens", "cls") else f"_{tokens}{random_k}"
    run = Run(
        "extract",
        "01",
        f"extract/{slug(model)}/{_layer_dir(layer, hook)}{suffix}/{split}",
        {
            "model": model,
            "data_dir": data["data_dir"],
            "split": data.get("split"),
            **_layer_params(layer, hook),
            "tokens": tokens,
            "random_k": random_k,
            "scorer": "",
            **_store_parameters(config),
        },
        labels={"model": model, "layer": layer, "split": split},
    )
    return _add(runs, run)


def _embed_run(config: dict[str, Any], runs: list[Run], scorer: str, split: str) -> Run:
    """Notebook 01 for a scorer: its image embeddings of one split."""
    data = config["data"][split]
    params = {
        "model": scorer,
        "data_dir": data["data_dir"],
        "split": data.get("split"),
        "hook": EMBEDDING_HOOK,
        "layer": -1,
        "tokens": "cls",
        "scorer": "",
        **_store_parameters(config),
    }
    return _add(
        runs, Run("embed", "01", f"embed/{slug(scorer)}/{split}", params, labels={"scorer": scorer, "split": split})
    )


def _train_run(
    sae: dict[str, Any],
    runs: list[Run],
    source: Run,
    validation: Run | None,
    sae_type: str,
    expansion,
    group_fractions,
    steps: int,
    folder: str,
    k: int | None = None,
) -> Run:
    """Notebook 02 for one (type, expansion, K) on ``source``'s activations, validated on ``validation``'s."""
    settings = _train_settings(sae, k)
    params = {
        "train_store": f"{source.out_dir}/activations",
        "val_store": f"{(validation or source).out_dir}/activations",
        "sae_types": [sae_type],
        "expansions": [expansion],
        "k": settings.pop("k"),
        "group_fractions": group_fractions,
        "steps": steps,
        **settings,
    }
    labels = dict(
        source.labels,
        sae_type=sae_type,
        expansion=expansion,
        k=params["k"],
        sae_dir=f"{folder}/{run_name(sae_type, expansion, params['k'])}",
    )
    return _add(
        runs, Run("train", "02", folder, params, [source.id] + ([validation.id] if validation else []), labels=labels)
    )


def _score_run(
    model: str, layer, hook: str, scorer: str, embedding: Run, train_store: Run, val_store: Run, trained: list[Run]
) -> Run:
    """Notebook 03: MS of every SAE of one (model, layer) with one scorer; uniqueness on the train store."""
    return Run(
        "score",
        "03",
        f"score/{slug(model)}/{_layer_dir(layer, hook)}/{slug(scorer)}",
        {
            "activations_store": f"{val_store.out_dir}/activations",
            "scorer_store": f"{embedding.out_dir}/activations",
            "sae_paths": [r.labels["sae_dir"] for r in trained],
            "top_k": 16,
            "uniqueness_store": f"{train_store.out_dir}/activations",
        },
        [val_store.id, embedding.id, train_store.id] + [r.id for r in trained],
        labels={"model": model, "layer": layer, "scorer": scorer},
    )


def _add_execution_parameters(config: dict[str, Any], run: Run) -> None:
    """Every notebook gets the sweep's ``device``; extraction also its ``model_dtype`` and ``num_workers``."""
    run.parameters.setdefault("device", config.get("device", "auto"))
    if run.kind in ("extract", "embed"):
        run.parameters.setdefault("model_dtype", config.get("model_dtype", "auto"))
        if "num_workers" in config:
            run.parameters.setdefault("num_workers", config["num_workers"])
    if run.kind == "steer":
        run.parameters.setdefault("model_dtype", config.get("model_dtype", "auto"))


def _hierarchy(config, runs, train_store, val_store, model, layer, embed, train) -> None:
    """A Matryoshka SAE with the hierarchy's group split, then notebook 04 on the training images."""
    h, folder = config["hierarchy"], _layer_dir(layer, config.get("hook", DEFAULT_HOOK))
    matryoshka = train(
        train_store,
        val_store,
        "matryoshka_batch_top_k",
        h.get("expansion", 2),
        h.get("group_fractions", list(PAPER_GROUP_FRACTIONS)),
        h.get("steps", config["sae"].get("steps", TRAIN_DEFAULTS.steps)),
        f"train/{slug(model)}/{folder}/hierarchy",
    )
    scorer = embed(config["scorers"][0], "train")
    _add(
        runs,
        Run(
            "hierarchy",
            "04",
            f"hierarchy/{slug(model)}/{folder}",
            {
                "train_store": f"{train_store.out_dir}/activations",
                "sae_path": matryoshka.labels["sae_dir"],
                "top_k": h.get("top_k", 16),
                "scorer_store": f"{scorer.out_dir}/activations",
            },
            [train_store.id, matryoshka.id, scorer.id],
            labels={"model": model, "layer": layer},
        ),
    )


def _steering(config, runs, extract, train) -> None:
    """An SAE on 2 random tokens per image of the LLaVA vision block, then notebook 05."""
    s = config["steering"]
    hook = s.get("hook", DEFAULT_HOOK)  # SAE trained and clamped at the same hook point
    tokens = extract(s["encoder"], s["layer"], "train", tokens="random_k", random_k=s.get("random_k", 2), hook=hook)
    folder = _layer_dir(s["layer"], hook)
    sae = train(
        tokens,
        None,
        "matryoshka_batch_top_k",
        s.get("expansion", 4),
        None,
        s.get("steps", config["sae"].get("steps", TRAIN_DEFAULTS.steps)),
        f"train/{slug(s['encoder'])}/{folder}/steering",
    )
    params = {
        "llava": s["llava"],
        "sae_path": sae.labels["sae_dir"],
        "train_store": f"{tokens.out_dir}/activations",
        "layer": s["layer"],
        "num_images": s.get("num_images", 4),
    }
    params |= {"hook": hook} if hook != DEFAULT_HOOK else {}  # today's steer runs keep their fingerprint
    params |= {
        key: s[key]
        for key in (
            "alphas",
            "clip_text_model",
            "latents",
            "alpha_scale",
            "score_alpha",
            "concept_pool",
            "concept_tokens",
            "concept_shortlist",
            "image_latents",
        )
        if key in s
    }
    train = config["data"]["train"]
    if train["data_dir"] != "fixture":  # test images: the first train image of each class, as the authors
        params["images_dir"] = str(Path(train["data_dir"]) / (train.get("split") or ""))
    _add(
        runs,
        Run(
            "steer",
            "05",
            f"steer/{slug(s['llava'])}/{folder}",
            params,
            [tokens.id, sae.id],
            labels={"llava": s["llava"], "layer": s["layer"]},
        ),
    )


def _add(runs: list[Run], run: Run) -> Run:
    """Append a run unless an identical one is already planned (shared extractions)."""
    for existing in runs:
        if existing.id == run.id:
            if existing.parameters != run.parameters:
                raise ConfigError(f"two different runs would write {run.id}")
            return existing
    runs.append(run)
    return run


# ----------------------------------------------------------------------------- execution


EXPECTED_OUTPUTS = {
    "extract": ["activations/manifest.json"],
    "embed": ["activations/manifest.json"],
    "train": ["results.csv"],
    "score": [MS_SUMMARY_FILE],
    "hierarchy": [LEVELS_FILE],
    "steer": [STEERING_SCORES_FILE],
}


def sweep_dir(name: str) -> Path:
    """Folder of a sweep's runs under the outputs root."""
    return outputs_root() / "sweeps" / name


def is_complete(run: Run, root: Path) -> bool:
    """Finished with the same parameters, and its key outputs are still there."""
    folder = root / run.out_dir
    marker = folder / DONE_FILE
    if not marker.is_file() or read_json(marker).get("fingerprint") != _fingerprint(run, root):
        return False
    return all((folder / name).exists() for name in EXPECTED_OUTPUTS[run.kind])


def complete_runs(runs: list[Run], root: Path) -> set[str]:
    """Runs complete *with complete inputs* (``runs`` in dependency order). A run whose input was
    re-run with new parameters but not finished (killed, failed) still matches the old input's
    marker; it must not be gathered beside the half-redone input's new files."""
    done: set[str] = set()
    for run in runs:
        if all(dep in done for dep in run.depends) and is_complete(run, root):
            done.add(run.id)
    return done


def _fingerprint(run: Run, root: Path) -> str:
    """What determines a run's outputs: notebook, resolved parameters and the fingerprints its
    inputs were made with (chained: a redone training run makes its score run stale)."""
    params = {k: v for k, v in resolved_parameters(run, root).items() if k not in EXECUTION_ONLY}
    inputs = {dep: _marker_fingerprint(root / dep) for dep in run.depends}
    return sha256_json({"notebook": run.notebook, "parameters": params, "inputs": inputs})


def _marker_fingerprint(folder: Path) -> str:
    """The fingerprint a finished run recorded ("" for a run not finished)."""
    marker = folder / DONE_FILE
    return str(read_json(marker).get("fingerprint", "")) if marker.is_file() else ""


def resolved_parameters(run: Run, root: Path) -> dict[str, Any]:
    """Parameters with sweep-relative store and SAE paths made absolute, and the run's own out_dir."""
    params = dict(run.parameters)
    for key in SWEEP_RELATIVE_PATHS:
        if params.get(key):
            params[key] = str(root / params[key])
    if "sae_paths" in params:
        params["sae_paths"] = [str(root / p) for p in params["sae_paths"]]
    params["out_dir"] = str(root / run.out_dir)
    return params


def notebook_runner(notebook: str, params: dict[str, Any], out: Path) -> Path:
    """How a cell runs by default: its notebook through papermill, executed copy and log in ``out``."""
    from .run import run_notebook

    return run_notebook(notebook, params, out)


def execute(
    runs: list[Run],
    root: Path,
    *,
    dry_run: bool = False,
    progress: bool = True,
    runner: Callable[[str, dict, Path], Any] | None = None,
) -> pd.DataFrame:
    """Run what is not complete, in order; a failure blocks only the runs that depend on it."""
    from tqdm.auto import tqdm

    status: dict[str, str] = {}
    rows = []
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress or dry_run)
    with bar, kernels.warm_kernels():  # each cell's kernel starts while the previous cell runs
        for run in runs:
            blocked = [d for d in run.depends if status.get(d) in ("failed", "blocked")]
            if blocked:
                state, message = "blocked", f"needs {blocked[0]}"
            elif dry_run and any(status.get(d) == "would run" for d in run.depends):
                state, message = "would run", "an input is redone"
            elif is_complete(run, root):
                state, message = "done earlier", ""
            elif dry_run:
                state, message = "would run", ""
            else:
                state, message = execute_run(run, root, runner)
            status[run.id] = state
            rows.append({"run": run.id, "notebook": run.notebook, "status": state, "message": message})
            bar.set_postfix_str(run.id[-40:])
            bar.update()
    return pd.DataFrame(rows)


def execute_run(run: Run, root: Path, runner: Callable[[str, dict, Path], Any] | None = None) -> tuple[str, str]:
    """One cell, its folder locked: runs the notebook and marks it complete (``"ran"``), or returns
    ``("failed", first line of the error)``. A second process on the same cell fails, naming the holder."""
    from .run import NotebookError

    folder = root / run.out_dir
    try:
        with folder_lock(folder, "run folder"):
            start_run(run, root)
            (runner or notebook_runner)(run.notebook, resolved_parameters(run, root), folder)
            _mark_complete(run, root)
    except (NotebookError, FolderLockedError, ValueError, FileNotFoundError) as err:
        return "failed", str(err).splitlines()[0]
    return "ran", ""


def start_run(run: Run, root: Path) -> None:
    """Before a run: outputs left by a run with other parameters or inputs (finished, or killed
    half-way) are cleared, so the notebook starts afresh instead of refusing (or resuming) them;
    outputs of an interrupted run with the same ones are kept, so it resumes."""
    folder, fingerprint = root / run.out_dir, _fingerprint(run, root)
    markers = [folder / name for name in (DONE_FILE, STARTED_FILE)]
    recorded = [read_json(marker).get("fingerprint") for marker in markers if marker.is_file()]
    if any(value != fingerprint for value in recorded):
        log.warning("%s was made with other parameters or inputs: clearing it to run again", run.id)
        for child in folder.iterdir():
            if child.name in KEPT_ON_REDO:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    atomic_write_json(folder / STARTED_FILE, {"fingerprint": fingerprint})


def _mark_complete(run: Run, root: Path) -> None:
    """The marker that makes a run complete: its fingerprint (chained to its inputs'), parameters, labels."""
    atomic_write_json(
        root / run.out_dir / DONE_FILE,
        {
            "fingerprint": _fingerprint(run, root),
            "notebook": run.notebook,
            "parameters": resolved_parameters(run, root),
            "labels": run.labels,
        },
    )


# ----------------------------------------------------------------------------- results


def gather(config: dict[str, Any], runs: list[Run], root: Path) -> dict[str, pd.DataFrame]:
    """Collect the finished runs' tables into ``results/<name>/{sae,raw,hierarchy,steering}.csv``."""
    tables: dict[str, list[pd.DataFrame]] = {"sae": [], "raw": [], "hierarchy": [], "steering": []}
    by_sae_dir = {r.labels["sae_dir"]: r for r in runs if r.kind == "train"}
    complete = complete_runs(runs, root)
    for run in runs:
        folder = root / run.out_dir
        if run.id not in complete:
            continue
        if run.kind == "score":
            tables["sae"].append(_score_rows(run, folder, by_sae_dir, root))
            summary = pd.read_csv(folder / MS_SUMMARY_FILE)
            raw = summary[summary.neurons.str.startswith("raw")]
            tables["raw"].append(
                raw.assign(model=run.labels["model"], layer=str(run.labels["layer"]), scorer=run.labels["scorer"])
            )
        elif run.kind == "hierarchy":
            tables["hierarchy"].append(
                pd.read_csv(folder / LEVELS_FILE).assign(model=run.labels["model"], layer=str(run.labels["layer"]))
            )
        elif run.kind == "steer":
            tables["steering"].append(pd.read_csv(folder / STEERING_SCORES_FILE).assign(**run.labels))
    out = results_root() / config["name"]
    out.mkdir(parents=True, exist_ok=True)
    gathered = {}
    for name, frames in tables.items():
        if frames:
            gathered[name] = pd.concat(frames, ignore_index=True)
            gathered[name].to_csv(out / f"{name}.csv", index=False)
        else:
            (out / f"{name}.csv").unlink(missing_ok=True)  # no stale table from an earlier config
    return gathered


def _r2_columns(trained: pd.Series) -> dict[str, float]:
    """The paper's per-batch "R² %" and the "global R² %" of a training run's results row; a row
    written before the two were separated (global "R² %", shuffled "R² batch-mean %") is relabelled."""
    if "R² batch-mean %" in trained:
        return {"R² %": trained["R² batch-mean %"], "global R² %": trained["R² %"]}
    return {"R² %": trained["R² %"], "global R² %": trained["global R² %"]}


def _score_rows(run: Run, folder: Path, by_sae_dir: dict[str, Run], root: Path) -> pd.DataFrame:
    """One row per SAE of a score run: its training metrics next to its MS."""
    summary = pd.read_csv(folder / MS_SUMMARY_FILE).set_index("neurons")
    rows = []
    for sae_dir in run.parameters["sae_paths"]:
        train_run = by_sae_dir[sae_dir]
        trained = pd.read_csv(root / train_run.out_dir / "results.csv").iloc[0]
        ms = summary.loc[Path(sae_dir).name]
        rows.append(
            {
                "model": run.labels["model"],
                "layer": str(run.labels["layer"]),
                "scorer": run.labels["scorer"],
                "SAE": trained["SAE"],
                "expansion": trained["expansion"],
                "K": trained["k"],
                "latents": trained["latents"],
                **_r2_columns(trained),
                "L0": trained["L0"],
                "dead %": trained["dead %"],
                "MS mean": ms["mean MS"],
                "MS std": ms["std"],
                "MS max": ms["best MS"],
                "dead latents (MS)": ms["dead"],
            }
        )
    return pd.DataFrame(rows)


def run_sweep(
    config_path: str | os.PathLike,
    *,
    dry_run: bool = False,
    progress: bool = True,
    runner: Callable[[str, dict, Path], Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Load, expand, execute and gather a sweep; returns the status table and the results tables."""
    config = load_config(config_path)
    runs = expand(config)
    root = sweep_dir(config["name"])
    if dry_run:
        return execute(runs, root, dry_run=True, progress=progress, runner=runner), {}
    root.mkdir(parents=True, exist_ok=True)
    with sweep_lock(root):
        status = execute(runs, root, progress=progress, runner=runner)
        status.to_csv(root / RUNS_FILE, index=False)  # the run order and states, for a book of this sweep
        return status, gather(config, runs, root)


@contextlib.contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """Hold the sweep folder for one process at a time (released when the process dies); a second
    run of the same sweep gets ``SweepLockedError`` naming the holder."""
    with folder_lock(root, "sweep folder", SweepLockedError):
        yield


def execute_results_chapter(name: str) -> Path:
    """Chapter 6 executed on ``results/<name>/`` into the sweep's folder (``results/06_results.ipynb``),
    so a book of the sweep shows its own tables without executing anything at build time."""
    from .run import run_notebook

    return run_notebook(RESULTS_NOTEBOOK, {"results_dir": str(results_root() / name)}, sweep_dir(name) / "results")


@dataclass
class SweepResults:
    """The gathered tables of one sweep, filtered to one scorer (what chapter 6 draws)."""

    folder: Path
    scorer: str
    sae: pd.DataFrame  # one row per SAE (layer as text)
    raw: pd.DataFrame  # one row per model and layer: the raw neurons' MS
    tables: dict[str, pd.DataFrame]  # every results table by name (sae, raw, hierarchy, steering)

    def describe(self) -> str:
        """One line: which sweep (by folder name, never a machine path), how many runs, which tables."""
        return (
            f"sweep {self.folder.name}: {len(self.sae)} SAE runs, scorer {self.scorer}; "
            f"tables: {', '.join(self.tables)}"
        )


def load_results(folder: str | os.PathLike, scorer: str = "") -> SweepResults:
    """Read ``results/<name>/*.csv`` written by `gather`; ``scorer`` empty means the first in the tables."""
    folder = Path(folder)
    tables = {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}
    if "sae" not in tables:
        raise FileNotFoundError(
            f"{folder} has no sae.csv: run the sweep first (python -m vlmsae_utils.run --config ...)"
        )
    scorers = tables["sae"].scorer.unique().tolist()
    scorer = scorer or scorers[0]
    if scorer not in scorers:
        raise ValueError(f"scorer {scorer!r} is not in {folder / 'sae.csv'}; it has {', '.join(scorers)}")
    sae = tables["sae"][lambda d: d.scorer == scorer].assign(layer=lambda d: d.layer.astype(str))
    raw = tables["raw"][lambda d: d.scorer == scorer].assign(layer=lambda d: d.layer.astype(str))
    return SweepResults(folder, scorer, sae, raw, tables)


def ensure_fixture_results(config_path: str | os.PathLike | None = None) -> Path:
    """The fixture sweep's results folder, brought up to date first: finished runs with the same
    parameters are skipped, so this costs seconds once the sweep has run (and never shows tables
    left over from an older config); while another process runs the sweep, this waits for it."""
    from .paths import repo_root

    path = Path(config_path) if config_path else (repo_root() or Path.cwd()) / "configs" / "fixture.yaml"
    try:
        status, _ = run_sweep(path, progress=False)
    except SweepLockedError:  # another process runs it (make demo runs it beside the chapters): wait for it
        with folder_lock(sweep_dir(load_config(path)["name"]), "sweep folder", blocking=True):
            pass
        status, _ = run_sweep(path, progress=False)
    failed = status[status.status.isin(["failed", "blocked"])]
    if len(failed):
        raise RuntimeError(f"fixture sweep failed: {failed.iloc[0].run}: {failed.iloc[0].message}")
    return results_root() / load_config(path)["name"]
