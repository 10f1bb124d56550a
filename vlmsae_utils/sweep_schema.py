"""The sweep file's schema: frozen sections whose fields are its keys, each with its type, default
and meaning (the ``#:`` line above it), so a key is declared once.

:func:`~vlmsae_utils.sweep_config.load_config` parses a YAML file into one :class:`SweepConfig`
(:meth:`Section.parse`): the types it checks are these annotations, and the ``sae`` section's
training settings are typed by :class:`~vlmsae_utils.train_config.TrainConfig`'s. Lists become
tuples and mappings read-only; :func:`plain` turns them back into lists and dicts where a notebook's
parameters are written. Checks across keys (a layer the hierarchy uses, a device name) live in
:mod:`~vlmsae_utils.sweep_config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .executor_config import ExecutorConfig, parse_executor
from .hooks import DEFAULT_HOOK
from .train_config import GRID_FIELDS, TrainConfig

__all__ = [
    "NOTEBOOK_SETTING",
    "ConfigError",
    "DataSplit",
    "FrozenDict",
    "HierarchySection",
    "SaeSection",
    "Section",
    "SteeringSection",
    "SweepConfig",
    "convert",
    "field_docs",
    "parse_fields",
    "plain",
]

#: Metadata key of a field the sweep hands to its stage's notebook only when the file sets it.
NOTEBOOK_SETTING = "notebook_setting"
TRAIN_DEFAULTS = TrainConfig()  # what an unset training setting of the sae section means


class ConfigError(ValueError):
    """A sweep file with unknown keys, wrong types or missing data."""


class FrozenDict(dict):
    """A read-only mapping that still pickles, copies and hashes (a parsed section's mappings)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is read-only: a parsed sweep file is never edited")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))


def _notebook_setting() -> Any:
    """A field passed to its notebook only when set (unset, ``None``: the notebook's own default)."""
    return field(default=None, metadata={NOTEBOOK_SETTING: True})


# ----------------------------------------------------------------------------- reading values


def _describe(hint: Any) -> str:
    """A type as a sweep file's author reads it: ``int or list of int``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_describe(arg) for arg in args if not (arg is int and float in args)]  # int is a number
        return " or ".join(names)
    if origin is tuple:
        return f"list of {_describe(args[0])}"
    if origin in (Mapping, dict) or dataclasses.is_dataclass(hint):
        return "mapping"
    return {type(None): "null", float: "number"}.get(hint, getattr(hint, "__name__", str(hint)))


def convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` read from YAML as the annotation ``hint`` types it: lists become tuples, mappings
    read-only, a section is parsed; a number written ``2e-4`` (YAML reads a string) becomes a float.
    Anything else is a :class:`ConfigError` naming ``where`` and the type expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arg for arg in args if arg is not type(None)]
        if len(arms) == 1 and isinstance(arms[0], type) and issubclass(arms[0], Section):
            return arms[0].parse(value, where)  # a section's own errors name the key inside it
        for arm in arms:
            with contextlib.suppress(ConfigError):
                return convert(value, arm, where)
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
    elif origin in (Mapping, dict) and isinstance(value, Mapping):
        return FrozenDict({key: convert(item, args[1], f"{where}.{key}") for key, item in value.items()})
    elif origin is None and isinstance(hint, type) and issubclass(hint, Section):
        return hint.parse(value, where)
    elif origin is None and _is_instance(value, hint):
        return value
    elif hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r}")


def _is_instance(value: Any, hint: Any) -> bool:
    """``isinstance`` as YAML values need it: a bool is no number, an int is also a float."""
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def plain(value: Any) -> Any:
    """A parsed value as notebook parameters and JSON hold it: tuples as lists, mappings as dicts."""
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Each field's meaning: the ``#:`` lines written above it in the class body."""
    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif pending and (match := re.match(r"(\w+)\s*:", text)):
            docs[match.group(1)], pending = " ".join(pending), []
        else:
            pending = []
    return docs


# ----------------------------------------------------------------------------- sections


class Section:
    """A frozen part of a sweep file; :meth:`parse` reads it from YAML by its fields' annotations."""

    @classmethod
    def parse(cls, raw: Any, where: str) -> Any:
        """The section from a YAML mapping (:func:`parse_fields`)."""
        return parse_fields(cls, raw, where)

    def notebook_settings(self) -> dict[str, Any]:
        """The fields marked as notebook settings that the file sets, as the notebook takes them."""
        return {
            f.name: plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.metadata.get(NOTEBOOK_SETTING) and getattr(self, f.name) is not None
        }


def parse_fields(cls: type, raw: Any, where: str) -> Any:
    """``cls`` built from a YAML mapping by its fields' annotations: unknown or missing keys and
    wrong types are errors that name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = [name for name, f in fields.items() if _required(f)]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a mapping with {', '.join(required) or 'keys'}, got {raw!r}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(fields)}")
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: convert(value, hints[key], f"{where}.{key}") for key, value in raw.items()})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclass(frozen=True)
class DataSplit(Section):
    """One split's images."""

    #: An image folder (one sub-folder per class) or ``fixture``, the generated images.
    data_dir: str
    #: The sub-folder of ``data_dir`` holding this split's classes (``null``: ``data_dir`` itself).
    split: str | None = None


@dataclass(frozen=True)
class SaeSection(Section):
    """The SAE grid, and every :class:`~vlmsae_utils.train_config.TrainConfig` setting besides the
    grid's as a key of its own (typed and documented by TrainConfig)."""

    #: SAE types of the grid (:data:`vlmsae_utils.sae.SAE_TYPES`).
    types: tuple[str, ...]
    #: Expansion factors ε of the grid (dictionary size = ε × the activations' width).
    expansions: tuple[int | float, ...]
    #: Active latents per input; a list sweeps the grid over K (Table 1), each K in its own folder.
    k: int | tuple[int, ...] = TRAIN_DEFAULTS.k
    #: The TrainConfig settings the file sets (the keys besides ``types``, ``expansions`` and ``k``).
    settings: Mapping[str, Any] = field(default_factory=FrozenDict)

    GRID_KEYS: ClassVar[tuple[str, ...]] = ("types", "expansions", "k")

    @classmethod
    def parse(cls, raw: Any, where: str) -> SaeSection:
        """The grid's keys by this class's fields, every other key as TrainConfig types it."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: a mapping with types and expansions, got {raw!r}")
        names = TrainConfig.setting_names()
        unknown = sorted(set(raw) - set(cls.GRID_KEYS) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted({*cls.GRID_KEYS, *names})}")
        hints = typing.get_type_hints(TrainConfig)
        settings = {key: convert(v, hints[key], f"{where}.{key}") for key, v in raw.items() if key not in cls.GRID_KEYS}
        grid = parse_fields(cls, {key: raw[key] for key in cls.GRID_KEYS if key in raw}, where)
        return dataclasses.replace(grid, settings=FrozenDict(settings))

    @property
    def ks(self) -> tuple[int, ...]:
        """The K values of the grid (one when ``k`` is a number)."""
        return self.k if isinstance(self.k, tuple) else (self.k,)

    @property
    def sweeps_k(self) -> bool:
        """Whether ``k`` is a list: each K then trains in a folder of its own."""
        return isinstance(self.k, tuple)

    def setting(self, name: str) -> Any:
        """A training setting as the file sets it, else TrainConfig's default."""
        if name in GRID_FIELDS or name == "k":
            raise KeyError(f"{name} is a grid key of the sae section, not a setting")
        return self.settings.get(name, getattr(TRAIN_DEFAULTS, name))


@dataclass(frozen=True)
class HierarchySection(Section):
    """The Matryoshka SAE whose levels notebook 04 relates to the taxonomy (Section 4.3)."""

    #: The layer of ``layers`` whose extraction it trains on (``null``: the first).
    layer: int | str | None = None
    #: Its expansion factor ε.
    expansion: int | float = 2
    #: Its group sizes as fractions of the dictionary (``null``: the paper's five levels).
    group_fractions: tuple[int | float, ...] | None = None
    #: Top images per latent for the LCA depth (at least 2).
    top_k: int = 16
    #: Its training steps (``null``: the ``sae`` section's).
    steps: int | None = None


@dataclass(frozen=True)
class SteeringSection(Section):
    """The steering study of notebook 05 (Section 4.4): an SAE on a LLaVA vision block's tokens."""

    #: The LLaVA model to steer.
    llava: str
    #: The encoder holding LLaVA's vision tower weights (its tokens train the SAE).
    encoder: str
    #: The vision block the SAE is trained on and clamps.
    layer: int
    #: The hook point there (a steerable hook of :mod:`vlmsae_utils.hooks`).
    hook: str = DEFAULT_HOOK
    #: The steering SAE's expansion factor ε (a Matryoshka BatchTopK SAE).
    expansion: int | float = 4
    #: Its training steps (``null``: the ``sae`` section's).
    steps: int | None = None
    #: Random tokens per image its training activations keep.
    random_k: int = 2
    #: Test images, spread over the classes.
    num_images: int = 4
    #: Clamp values of the α sweep (notebook 05's ``alphas``).
    alphas: tuple[int | float, ...] | None = _notebook_setting()
    #: CLIP with a text tower for the steering score.
    clip_text_model: str | None = _notebook_setting()
    #: Latents to steer (empty: those whose top images agree most on one class).
    latents: tuple[int, ...] | None = _notebook_setting()
    #: ``absolute`` (the paper) or ``max``: α in multiples of each latent's largest activation.
    alpha_scale: str | None = _notebook_setting()
    #: The clamp value of the steering score.
    score_alpha: int | float | None = _notebook_setting()
    #: How a latent's top images are ranked over their tokens: ``mean`` (the authors) or ``max``.
    concept_pool: str | None = _notebook_setting()
    #: Token rows that rank them: ``all`` of each image (the authors) or the ``stored`` rows.
    concept_tokens: str | None = _notebook_setting()
    #: With ``concept_tokens: all``: 0 passes every image, N each latent's N best by the stored rows.
    concept_shortlist: int | None = _notebook_setting()
    #: Latents also shown, swept and compared with DiffMean on the test images.
    image_latents: int | None = _notebook_setting()


@dataclass(frozen=True)
class SweepConfig(Section):
    """A whole sweep file, parsed once (:func:`~vlmsae_utils.sweep_config.load_config`)."""

    #: The sweep's name: its folder under the outputs root and under ``results/``.
    name: str
    #: Image folders by split: ``train`` (SAE training, top images) and ``val`` (R², MS) at least.
    data: Mapping[str, DataSplit]
    #: Encoders whose activations train the grid's SAEs (hub ids, ``fixture:…``, ``rehearsal:…``).
    models: tuple[str, ...]
    #: Block indices (0-based) or ``last`` (the post-projection embedding).
    layers: tuple[int | str, ...]
    #: Encoders whose image embeddings score MS (the paper: DINOv2-B).
    scorers: tuple[str, ...]
    #: The SAE grid and its training settings.
    sae: SaeSection
    #: Tokens stored per image: ``cls``, ``mean``, ``all`` or ``random_k`` (:data:`vlmsae_utils.hooks.TOKEN_MODES`).
    tokens: str = "cls"
    #: Storage dtype of the activations (``float32`` or ``float16``).
    dtype: str = "float32"
    #: Images per extraction batch.
    batch_size: int = 64
    #: Hook point of the numbered layers (:mod:`vlmsae_utils.hooks`).
    hook: str = DEFAULT_HOOK
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; not part of any fingerprint.
    device: str = "auto"
    #: Precision of the encoders and LLaVA (``auto``: as the authors).
    model_dtype: str = "auto"
    #: Image-loading workers per extraction (``null``: the notebook's default); not part of any fingerprint.
    num_workers: int | None = None
    #: Where images are decoded: ``cpu`` (as the authors) or ``gpu`` (``null``: cpu).
    decode: str | None = None
    #: The hierarchy study (absent: none; ``{}``: its defaults).
    hierarchy: HierarchySection | None = None
    #: The steering study (absent: none).
    steering: SteeringSection | None = None
    #: Where the cells run: inline, local workers or Slurm (:mod:`vlmsae_utils.executor_config`).
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @classmethod
    def parse(cls, raw: Any, where: str) -> SweepConfig:
        """The file's sections by their fields; the ``executor`` block by its own parser."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping at the top level")
        for key in ("hierarchy", "steering"):
            if key in raw and raw[key] is None:  # every sub-key commented out: not the same as no study
                raise ConfigError(
                    f"{where}.{key}: empty; write '{key}: {{}}' for its defaults, or remove the key to run no {key} study"
                )
        rest = {key: value for key, value in raw.items() if key != "executor"}
        config = parse_fields(cls, rest, where)
        try:
            executor = parse_executor(raw.get("executor"), f"{where}.executor", device=config.device)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return dataclasses.replace(config, executor=executor)

    def hierarchy_layer(self) -> int | str:
        """The layer the hierarchy study uses (its own, else the first of ``layers``)."""
        if self.hierarchy is None or self.hierarchy.layer is None:
            return self.layers[0]
        return self.hierarchy.layer
