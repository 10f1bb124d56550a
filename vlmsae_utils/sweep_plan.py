"""A sweep as notebook runs: models × layers × SAE types × expansions × scorers, dependencies first."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hierarchy import PAPER_GROUP_FRACTIONS
from .hooks import DEFAULT_HOOK, EMBEDDING_HOOK
from .stages import STAGES
from .sweep_config import ConfigError, slug
from .sweep_schema import SaeSection, SweepConfig, plain
from .train import run_name

__all__ = [
    "TRAIN_RUN_SETTINGS",
    "Run",
    "expand",
]

#: Settings every training run passes to notebook 02 (set or not: they are in today's run fingerprints);
#: any other setting is passed only where the ``sae`` section sets it, so finished sweeps stay finished.
TRAIN_RUN_SETTINGS = ("k", "batch_size", "lr", "seed", "aux_alpha", "decay_start")


@dataclass
class Run:
    """One notebook execution of a sweep."""

    kind: str
    notebook: str
    out_dir: str  # relative to the sweep folder
    parameters: dict[str, Any]
    depends: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)  # model, layer, … for the results tables

    def __post_init__(self) -> None:
        """Parameters as a notebook and JSON hold them (a parsed config's tuples as lists); the
        run's folder starts with its stage's kind (gather, executors and the book read it there)."""
        if self.out_dir.split("/")[0] != self.kind:
            raise ValueError(f"run folder {self.out_dir!r} must start with its kind: {self.kind}/…")
        self.parameters = plain(self.parameters)

    @property
    def id(self) -> str:
        """Unique name of the run (its output folder)."""
        return self.out_dir


def _layer_params(layer: int | str, hook: str = DEFAULT_HOOK) -> dict[str, Any]:
    """Hook and layer parameters of notebook 01 for a config layer (``last`` = post_projection)."""
    return {"hook": EMBEDDING_HOOK, "layer": -1} if layer == "last" else {"hook": hook, "layer": layer}


def _layer_dir(layer: int | str, hook: str = DEFAULT_HOOK) -> str:
    """Folder of a layer's runs: ``L<layer>``, with the hook appended when it is not the default
    (so runs of the default hook keep their folders, parameters and fingerprints)."""
    return f"L{layer}" if layer == "last" or hook == DEFAULT_HOOK else f"L{layer}_{hook}"


def _train_settings(sae: SaeSection, k: int | None) -> dict[str, Any]:
    """Notebook 02's settings of one training run: :data:`TRAIN_RUN_SETTINGS` (unset: TrainConfig's
    defaults), ``k`` of the run (unset: the section's), and every other setting the ``sae`` section
    sets (not ``steps`` and ``group_fractions``, which a run's caller chooses)."""
    settings = {name: sae.setting(name) for name in TRAIN_RUN_SETTINGS if name != "k"}
    settings["k"] = sae.ks[0] if k is None else k
    chosen = ("steps", "group_fractions", *TRAIN_RUN_SETTINGS)
    return settings | {name: value for name, value in sae.settings.items() if name not in chosen}


def expand(config: SweepConfig) -> list[Run]:
    """Every notebook run of a sweep, dependencies first."""
    runs: list[Run] = []
    sae, hook = config.sae, config.hook
    extract = functools.partial(_extract_run, config, runs)
    embed = functools.partial(_embed_run, config, runs)
    train = functools.partial(_train_run, sae, runs)
    val_embeddings = {s: embed(s, "val") for s in config.scorers} if config.models else {}
    for model in config.models:
        for layer in config.layers:
            train_store, val_store = extract(model, layer, "train"), extract(model, layer, "val")
            trained = [
                train(
                    train_store,
                    val_store,
                    t,
                    e,
                    sae.setting("group_fractions"),
                    sae.setting("steps"),
                    # each K in its own folder when k is a list (one K keeps today's folder names)
                    f"train/{slug(model)}/{_layer_dir(layer, hook)}/{t}_x{e:g}" + (f"_k{k}" if sae.sweeps_k else ""),
                    k,
                )
                for t in sae.types
                for e in sae.expansions
                for k in sae.ks
            ]
            for scorer, embedding in val_embeddings.items():
                _add(runs, _score_run(model, layer, hook, scorer, embedding, train_store, val_store, trained))
            if config.hierarchy is not None and layer == config.hierarchy_layer():
                _hierarchy(config, runs, train_store, val_store, model, layer, embed, train)
    if config.steering is not None:
        _steering(config, runs, extract, train)
    for added in STAGES.values():  # stages registered from outside the package plan their own runs
        for run in added.plan(config, list(runs)) if added.plan is not None else []:
            _add(runs, run)
    for run in runs:
        _add_execution_parameters(config, run)
    return runs


def _store_parameters(config: SweepConfig) -> dict[str, Any]:
    """What every extraction of a sweep shares: the storage dtype and the batch size."""
    return {"dtype": config.dtype, "batch_size": config.batch_size}


def _extract_run(
    config: SweepConfig,
    runs: list[Run],
    model: str,
    layer,
    split: str,
    tokens: str | None = None,
    random_k: int = 2,
    hook: str | None = None,
) -> Run:
    """Notebook 01 on one split: a model's activations at ``layer`` (the sweep's tokens and hook unless given)."""
    tokens = config.tokens if tokens is None else tokens
    hook = config.hook if hook is None else hook
    data = config.data[split]
    suffix = "" if tokens == config.tokens else f"_{tokens}{random_k}"
    run = Run(
        "extract",
        "01",
        f"extract/{slug(model)}/{_layer_dir(layer, hook)}{suffix}/{split}",
        {
            "model": model,
            "data_dir": data.data_dir,
            "split": data.split,
            **_layer_params(layer, hook),
            "tokens": tokens,
            "random_k": random_k,
            "scorer": "",
            **_store_parameters(config),
        },
        labels={"model": model, "layer": layer, "split": split},
    )
    return _add(runs, run)


def _embed_run(config: SweepConfig, runs: list[Run], scorer: str, split: str) -> Run:
    """Notebook 01 for a scorer: its image embeddings of one split."""
    data = config.data[split]
    params = {
        "model": scorer,
        "data_dir": data.data_dir,
        "split": data.split,
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
    sae: SaeSection,
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


def _add_execution_parameters(config: SweepConfig, run: Run) -> None:
    """Every notebook gets the sweep's ``device``; extraction also its ``model_dtype``, ``num_workers``
    and ``decode`` (these two only when set: finished sweeps keep their fingerprints)."""
    run.parameters.setdefault("device", config.device)
    if run.kind in ("extract", "embed"):
        run.parameters.setdefault("model_dtype", config.model_dtype)
        if config.num_workers is not None:
            run.parameters.setdefault("num_workers", config.num_workers)
    if run.kind == "extract" and config.decode is not None:
        run.parameters.setdefault("decode", config.decode)
    if run.kind == "steer":
        run.parameters.setdefault("model_dtype", config.model_dtype)


def _hierarchy(config: SweepConfig, runs, train_store, val_store, model, layer, embed, train) -> None:
    """A Matryoshka SAE with the hierarchy's group split, then notebook 04 on the training images."""
    h, folder = config.hierarchy, _layer_dir(layer, config.hook)
    assert h is not None
    matryoshka = train(
        train_store,
        val_store,
        "matryoshka_batch_top_k",
        h.expansion,
        h.group_fractions or PAPER_GROUP_FRACTIONS,
        config.sae.setting("steps") if h.steps is None else h.steps,
        f"train/{slug(model)}/{folder}/hierarchy",
    )
    scorer = embed(config.scorers[0], "train")
    _add(
        runs,
        Run(
            "hierarchy",
            "04",
            f"hierarchy/{slug(model)}/{folder}",
            {
                "train_store": f"{train_store.out_dir}/activations",
                "sae_path": matryoshka.labels["sae_dir"],
                "top_k": h.top_k,
                "scorer_store": f"{scorer.out_dir}/activations",
            },
            [train_store.id, matryoshka.id, scorer.id],
            labels={"model": model, "layer": layer},
        ),
    )


def _steering(config: SweepConfig, runs, extract, train) -> None:
    """An SAE on random tokens per image of the LLaVA vision block, then notebook 05."""
    s = config.steering
    assert s is not None
    # the SAE is trained and clamped at the same hook point
    tokens = extract(s.encoder, s.layer, "train", tokens="random_k", random_k=s.random_k, hook=s.hook)
    folder = _layer_dir(s.layer, s.hook)
    steps = config.sae.setting("steps") if s.steps is None else s.steps
    sae = train(
        tokens, None, "matryoshka_batch_top_k", s.expansion, None, steps, f"train/{slug(s.encoder)}/{folder}/steering"
    )
    params = {
        "llava": s.llava,
        "sae_path": sae.labels["sae_dir"],
        "train_store": f"{tokens.out_dir}/activations",
        "layer": s.layer,
        "num_images": s.num_images,
    }
    params |= {"hook": s.hook} if s.hook != DEFAULT_HOOK else {}  # today's steer runs keep their fingerprint
    params |= s.notebook_settings()
    train = config.data["train"]
    if train.data_dir != "fixture":  # test images: the first train image of each class, as the authors
        params["images_dir"] = str(Path(train.data_dir) / (train.split or ""))
    _add(
        runs,
        Run(
            "steer",
            "05",
            f"steer/{slug(s.llava)}/{folder}",
            params,
            [tokens.id, sae.id],
            labels={"llava": s.llava, "layer": s.layer},
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
