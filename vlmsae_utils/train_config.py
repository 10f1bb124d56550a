"""One training configuration: every setting of :func:`vlmsae_utils.train.train_sae`, its default
defined once and validated in one place (:class:`TrainConfig`).

Defaults reproduce the authors' runs (Pach et al. 2025, with dictionary_learning's trainer):
K = 20 active latents per input, Adam at ``2e-4 / sqrt(ω / 2**14)``, auxiliary-K weight 0.03 (their
scripts; the paper text says 1/32), no learning-rate decay, Matryoshka groups of 1/16, 1/8, 1/4
and 9/16 of the latents. Settings that depend on the data width (``k ≤ ω``, group sizes) are
checked by :meth:`TrainConfig.sizes` once the width is known.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .sae import INITS, SAE_TYPES, sae_class

__all__ = [
    "BATCH_ORDERS",
    "DATA_MEMORY_FRACTION",
    "DECAY_LAST_20PCT",
    "DEFAULT_AUX_ALPHA",
    "DEFAULT_GROUP_FRACTIONS",
    "FIXTURE_SETTINGS",
    "GRID_FIELDS",
    "TrainConfig",
    "check_group_fractions",
    "default_lr",
    "grid_configs",
    "group_sizes_from_fractions",
    "resolve_decay_start",
]

#: Matryoshka group sizes as fractions of the dictionary (Pach et al. 2025).
DEFAULT_GROUP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5625)
#: Weight of the auxiliary-K loss: the authors' training scripts pass 0.03 (the paper text and
#: dictionary_learning's default say 1/32 = 0.03125).
DEFAULT_AUX_ALPHA = 0.03
#: ``decay_start`` of the schedule this package used before matching the authors: linear decay
#: to 0 over the last 20 % of the steps (``decay_start=0.8``).
DECAY_LAST_20PCT = 0.8
#: Orders of the training batches (TrainConfig ``batch_order``): ``"cycled"``, the authors' — one
#: seeded permutation cut into ``ceil(N / B)`` batches (the last one short) and replayed every
#: epoch, as ``itertools.cycle`` over their shuffled ``DataLoader``; ``"reshuffled"`` — a new
#: permutation each epoch and every batch ``B`` rows (batches may straddle two epochs).
BATCH_ORDERS = ("cycled", "reshuffled")
#: The embedded fixture's scale, the one place these small values live (:meth:`TrainConfig.fixture`):
#: K = 8 and ε = 4 on its 320 narrow activations, 600 steps of 256 rows — minutes on a CPU.
FIXTURE_SETTINGS = {"expansion": 4, "k": 8, "steps": 600, "batch_size": 256}
#: Fields a grid sets per run (notebook 02 and sweeps take them as lists: ``sae_types``, ``expansions``).
GRID_FIELDS = ("sae_type", "expansion")
#: Share of the device's free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: available RAM) the
#: training data may take for ``data_on_device="auto"`` to put it there whole.
DATA_MEMORY_FRACTION = 0.5


def default_lr(dict_size: int) -> float:
    """Reference learning rate ``2e-4 / sqrt(ω / 2**14)`` (the code's, not the paper text's)."""
    return 2e-4 / math.sqrt(dict_size / 2**14)


def check_group_fractions(group_fractions: Any) -> tuple[float, ...]:
    """Matryoshka group fractions as a tuple of floats: positive, summing to 1."""
    if isinstance(group_fractions, (str, bytes)) or not isinstance(group_fractions, Iterable):
        raise ValueError(f"group_fractions must be a list of positive fractions summing to 1, got {group_fractions!r}")
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in group_fractions):
        raise ValueError(f"group_fractions must be a list of numbers, got {list(group_fractions)!r}")
    fr = [float(f) for f in group_fractions]
    if not fr or any(not (f > 0) for f in fr):
        raise ValueError(f"group_fractions must be positive, got {list(group_fractions)}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"group_fractions must sum to 1, got {list(group_fractions)} (sum {sum(fr):.6g})")
    return tuple(fr)


def group_sizes_from_fractions(group_fractions: Any, dict_size: int) -> list[int]:
    """Group sizes as dictionary_learning computes them: ``int(f·ω)`` for all but the last group."""
    fr = check_group_fractions(group_fractions)
    sizes = [int(f * dict_size) for f in fr[:-1]]
    sizes.append(dict_size - sum(sizes))
    if any(s < 1 for s in sizes):
        raise ValueError(f"group_fractions {list(fr)} give an empty group for dict_size={dict_size}: sizes {sizes}")
    return sizes


def resolve_decay_start(decay_start: int | float | None, steps: int) -> int | None:
    """The step where the linear LR decay starts, or ``None`` for no decay.

    ``None`` (default): no decay — the authors train 110k steps with decay from step 109,999 and
    keep the 100k checkpoint, so their SAEs never see a decayed rate. An ``int`` is a step
    (``>= steps`` also means no decay); a ``float`` in ``[0, 1]`` is a fraction of ``steps``
    (:data:`DECAY_LAST_20PCT` ``= 0.8`` is this package's former schedule: decay over the last 20 %).
    """
    if decay_start is None:
        return None
    if isinstance(decay_start, bool) or not isinstance(decay_start, numbers.Real):
        raise ValueError(
            f"decay_start must be None, a step (int) or a fraction of steps (float in [0, 1]), got {decay_start!r}"
        )
    if not isinstance(decay_start, numbers.Integral):
        decay_start = float(decay_start)
        if not 0.0 <= decay_start <= 1.0:
            raise ValueError(f"decay_start as a fraction of steps must be in [0, 1], got {decay_start}")
        decay_start = int(decay_start * steps)
    if decay_start < 0:
        raise ValueError(f"decay_start must be >= 0, got {decay_start}")
    return None if decay_start >= steps else int(decay_start)


def _integer(name: str, value: Any, low: int | None, optional: bool = False) -> int | None:
    """``value`` as an ``int`` (not a bool) ``>= low``, or ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        what = "an integer" + (f" >= {low}" if low is not None else "") + (" or None" if optional else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _real(
    name: str, value: Any, low: float, high: float = math.inf, optional: bool = False, open_low: bool = False
) -> Any:
    """Check that ``value`` is a number (not a bool) in the range, or ``None`` when ``optional``; return it."""
    if value is None and optional:
        return None
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and (float(value) > low if open_low else float(value) >= low)
        and float(value) <= high
    )
    if not ok:
        if high < math.inf:
            where = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        else:
            where = f"{'>' if open_low else '>='} {low:g}"
        raise ValueError(f"{name} must be a number {where}{' or None' if optional else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting of :func:`~vlmsae_utils.train.train_sae` (except the data, the device,
    progress bars and where checkpoints go), with the authors' defaults; invalid values raise
    ``ValueError`` naming the field and what is valid."""

    #: A registered SAE type (:data:`vlmsae_utils.sae.SAE_TYPES`).
    sae_type: str = "batch_top_k"
    #: Dictionary size ω = round(expansion × activation width).
    expansion: float = 8
    #: Active latents per input (BatchTopK: on average over the batch); ignored by types without k (ReLU).
    k: int = 20
    #: Matryoshka group sizes as fractions of ω (``None``: :data:`DEFAULT_GROUP_FRACTIONS`); only for group types.
    group_fractions: tuple[float, ...] | None = None
    #: Optimiser steps.
    steps: int = 1000
    #: Rows per step.
    batch_size: int = 4096
    #: Adam learning rate (``None``: :func:`default_lr` of ω).
    lr: float | None = None
    #: Seed of the initialisation and of the batch order.
    seed: int = 0
    #: Initial decoder directions (:data:`vlmsae_utils.sae.INITS`; ``"uniform"``: the authors').
    init: str = "uniform"
    #: Order of the training batches (:data:`BATCH_ORDERS`; ``"cycled"``: the authors').
    batch_order: str = "cycled"
    #: Linear warm-up steps (``None``: ``min(1000, max(1, steps // 20))``).
    warmup_steps: int | None = None
    #: Linear LR decay start (``None``: no decay; an int is a step, a float in [0, 1] a fraction of steps).
    decay_start: int | float | None = None
    #: The threshold EMA runs on steps after this one (``None``: ``min(1000, steps // 4)``; dictionary_learning: 1000).
    threshold_start_step: int | None = None
    #: EMA factor of the inference threshold θ.
    threshold_beta: float = 0.999
    #: A latent is dead after this many tokens without firing (auxiliary-K loss, dead fraction).
    dead_tokens: int = 10_000_000
    #: Weight of the auxiliary-K loss.
    aux_alpha: float = DEFAULT_AUX_ALPHA
    #: Latents of the auxiliary-K loss (``None``: ``activation_dim // 2``).
    k_aux: int | None = None
    #: Weight of the L1 penalty of the dense (ReLU) loss.
    l1_coeff: float = 1e-1
    #: Gradient-norm clip (``None`` or 0: none).
    grad_clip: float | None = 1.0
    #: bf16 encoder forward on CUDA (``False``: float32, the authors' ``autocast_dtype``; ``None``: bf16
    #: when the GPU supports it; never on the CPU). bf16 rounds the codes the top-k keeps.
    autocast: bool | None = False
    #: Steps between history rows (``None``: ``max(1, steps // 20)``).
    eval_every: int | None = None
    #: Steps between checkpoints (``None``: ``eval_every``).
    checkpoint_every: int | None = None
    #: Put the whole training data on the device (``"auto"``: when it fits ``memory_fraction``).
    data_on_device: bool | str = "auto"
    #: Share of the device's free memory the data may take for ``data_on_device="auto"``.
    memory_fraction: float = DATA_MEMORY_FRACTION

    def __post_init__(self) -> None:
        """Validate every field; integers become ``int`` and ``group_fractions`` a tuple of floats."""
        if not isinstance(self.sae_type, str) or self.sae_type not in SAE_TYPES:
            raise ValueError(f"unknown sae_type {self.sae_type!r}; valid: {', '.join(SAE_TYPES)}")
        cls = sae_class(self.sae_type)
        _real("expansion", self.expansion, 0.0, open_low=True)
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("k", _integer("k", self.k, 1, optional=not cls.needs_k))
        if self.group_fractions is not None:
            if not cls.uses_groups:
                with_groups = [t for t in SAE_TYPES if sae_class(t).uses_groups]
                raise ValueError(
                    f"group_fractions only apply to {', '.join(map(repr, with_groups))}, not {self.sae_type!r}"
                )
            set_("group_fractions", check_group_fractions(self.group_fractions))
        for name in ("steps", "batch_size", "dead_tokens"):
            set_(name, _integer(name, getattr(self, name), 1))
        set_("seed", _integer("seed", self.seed, None))
        for name, choices in (("init", INITS), ("batch_order", BATCH_ORDERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")
        for name, low in (
            ("warmup_steps", 0),
            ("threshold_start_step", 0),
            ("k_aux", 1),
            ("eval_every", 1),
            ("checkpoint_every", 1),
        ):
            set_(name, _integer(name, getattr(self, name), low, optional=True))
        _real("lr", self.lr, 0.0, optional=True)
        resolve_decay_start(self.decay_start, self.steps)
        _real("threshold_beta", self.threshold_beta, 0.0, 1.0)
        _real("aux_alpha", self.aux_alpha, 0.0)
        _real("l1_coeff", self.l1_coeff, 0.0)
        _real("grad_clip", self.grad_clip, 0.0, optional=True)
        if self.autocast is not None and not isinstance(self.autocast, bool):
            raise ValueError(f"autocast must be None, True or False, got {self.autocast!r}")
        if not (isinstance(self.data_on_device, bool) or self.data_on_device == "auto"):
            raise ValueError(f"data_on_device must be 'auto', True or False, got {self.data_on_device!r}")
        _real("memory_fraction", self.memory_fraction, 0.0, 1.0, open_low=True)

    def updated(self, **overrides: Any) -> TrainConfig:
        """A copy with ``overrides`` (field names) replaced, validated again."""
        names = self.field_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; TrainConfig fields: {', '.join(names)}")
        return dataclasses.replace(self, **overrides)

    def sizes(self, activation_dim: int) -> tuple[int, list[int] | None]:
        """``(dict_size, group_sizes)`` for activations ``activation_dim`` wide; checks ``k <= dict_size``."""
        dict_size = int(round(self.expansion * activation_dim))  # noqa: RUF046 (numpy floats round to floats)
        if dict_size < 1:
            raise ValueError(f"expansion {self.expansion} × d={activation_dim} gives an empty dictionary")
        cls = sae_class(self.sae_type)
        if cls.needs_k and self.k > dict_size:
            raise ValueError(f"k must be an integer in [1, dict_size={dict_size}], got {self.k!r}")
        if not cls.uses_groups:
            return dict_size, None
        return dict_size, group_sizes_from_fractions(self.group_fractions or DEFAULT_GROUP_FRACTIONS, dict_size)

    @classmethod
    def fixture(cls, **overrides: Any) -> TrainConfig:
        """The authors' defaults at the embedded fixture's scale (:data:`FIXTURE_SETTINGS`), with ``overrides``."""
        return cls(**{**FIXTURE_SETTINGS, **overrides})

    @classmethod
    def settings_in(cls, namespace: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting ``namespace`` names (e.g. a notebook's ``globals()`` after its parameter cell),
        as overrides for :func:`~vlmsae_utils.train.train_grid`: a parameter cell never lists them twice."""
        return {name: namespace[name] for name in cls.setting_names() if name in namespace}

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The settings besides the grid's (:data:`GRID_FIELDS`): notebook 02's and a sweep's ``sae`` keys."""
        return tuple(name for name in cls.field_names() if name not in GRID_FIELDS)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))


def grid_configs(
    sae_types: Iterable[str], expansions: Iterable[float], config: TrainConfig | None = None, **overrides: Any
) -> dict[tuple[str, float], TrainConfig]:
    """One validated :class:`TrainConfig` per (type, expansion) of a grid: ``config`` (default
    ``TrainConfig()``) with ``overrides`` applied; ``group_fractions`` only reach types with latent groups."""
    base = (config or TrainConfig()).updated(**{key: v for key, v in overrides.items() if key != "group_fractions"})
    fractions = overrides.get("group_fractions", base.group_fractions)
    out = {}
    for sae_type in sae_types:
        cls = sae_class(sae_type)
        for expansion in expansions:
            out[sae_type, expansion] = base.updated(
                sae_type=sae_type, expansion=expansion, group_fractions=fractions if cls.uses_groups else None
            )
    return out
