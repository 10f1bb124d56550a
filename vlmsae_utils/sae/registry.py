"""The registry of SAE types and the built-in types: BatchTopK, Matryoshka BatchTopK, TopK, ReLU."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from .base import BaseSAE, bag_offsets, batch_topk_indices, batch_topk_mask, topk_mask

__all__ = [
    "SAE_CLASSES",
    "SAE_LABELS",
    "SAE_TYPES",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "TopKSAE",
    "make_sae",
    "register_sae",
    "sae_class",
    "unregister_sae",
]


# ----- registry --------------------------------------------------------------------------------

_REGISTRY: dict[str, type[BaseSAE]] = {}
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_sae(cls: type[BaseSAE]) -> type[BaseSAE]:
    """Class decorator: make ``cls`` an SAE type known to make_sae, load_sae, train_sae, TrainConfig and
    the tables, under the ``sae_type`` and ``label`` its class body declares."""
    if not (isinstance(cls, type) and issubclass(cls, BaseSAE)) or cls is BaseSAE:
        raise TypeError(f"register_sae expects a subclass of BaseSAE, got {cls!r}")
    name, label = cls.__dict__.get("sae_type"), cls.__dict__.get("label")
    if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
        raise ValueError(
            f"{cls.__qualname__} must declare its own sae_type (lower-case letters, digits, '_'), got {name!r}"
        )
    if not isinstance(label, str) or not label:
        raise ValueError(f"{cls.__qualname__} must declare its own label (a non-empty str), got {label!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"sae_type {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            "call unregister_sae first"
        )
    dl_class = cls.__dict__.get("dl_class")
    clash = [t for t, c in _REGISTRY.items() if c is not cls and c.__dict__.get("dl_class") == dl_class]
    if dl_class is not None and clash:
        raise ValueError(f"dictionary_learning class {dl_class!r} already loads as {clash[0]!r}")
    _REGISTRY[name] = cls
    return cls


def unregister_sae(sae_type: str) -> type[BaseSAE]:
    """Remove a registered SAE type (e.g. a test's toy type); returns its class."""
    cls = sae_class(sae_type)
    del _REGISTRY[sae_type]
    return cls


def sae_class(sae_type: str) -> type[BaseSAE]:
    """The class registered under ``sae_type``."""
    if not isinstance(sae_type, str) or sae_type not in _REGISTRY:
        raise ValueError(f"unknown sae_type {sae_type!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[sae_type]


class _RegisteredNames(Sequence):
    """Live, read-only, tuple-like view of the registered type names, in registration order."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _REGISTRY

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (tuple, list, _RegisteredNames)) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class _RegistryMap(Mapping):
    """Live, read-only mapping recomputed from the registry on every access."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build

    def __getitem__(self, key: Any) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


#: Registered type names (live view, registration order).
SAE_TYPES: Sequence[str] = _RegisteredNames()
#: Type name → class (live, read-only; add types with :func:`register_sae`).
SAE_CLASSES: Mapping[str, type[BaseSAE]] = MappingProxyType(_REGISTRY)
#: Type name → human label, e.g. ``"matryoshka_batch_top_k"`` → ``"Matryoshka"`` (live).
SAE_LABELS: Mapping[str, str] = _RegistryMap(lambda: {t: c.label for t, c in _REGISTRY.items()})
_DL_DICT_CLASS_TO_TYPE: Mapping[str, str] = _RegistryMap(
    lambda: {c.__dict__["dl_class"]: t for t, c in _REGISTRY.items() if c.__dict__.get("dl_class")}
)


@register_sae
class BatchTopKSAE(BaseSAE):
    """BatchTopK SAE (Bussmann et al. 2024): batch-wide top ``B·k`` in training, threshold θ at inference."""

    sae_type = "batch_top_k"
    label = "BatchTopK"
    dl_class = "BatchTopKSAE"
    uses_threshold = True

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__(activation_dim, dict_size, k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return batch_topk_mask(z, self.required_k())

    def select_indices(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``B·k`` largest entries of the batch (fast exact top-n), sorted row-major."""
        omega = pre.shape[1]
        idx = batch_topk_indices(pre, min(self.required_k() * pre.shape[0], pre.numel())).sort().values
        return idx // omega, idx % omega


@register_sae
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: ordered latent groups whose nested prefixes each reconstruct ``x``."""

    sae_type = "matryoshka_batch_top_k"
    label = "Matryoshka"
    dl_class = "MatryoshkaBatchTopKSAE"
    uses_groups = True

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int] | None = None):
        super().__init__(activation_dim, dict_size, k)
        group_sizes = [int(g) for g in (group_sizes if group_sizes is not None else [dict_size])]
        if any(g < 1 for g in group_sizes) or sum(group_sizes) != self.dict_size:
            raise ValueError(f"group_sizes must be positive and sum to dict_size={dict_size}, got {group_sizes}")
        self.group_sizes = group_sizes

    @property
    def prefix_sizes(self) -> list[int]:
        """Cumulative prefix sizes ``M_m``."""
        out, acc = [], 0
        for g in self.group_sizes:
            acc += g
            out.append(acc)
        return out

    def decode_prefix(self, f: torch.Tensor, m: int) -> torch.Tensor:
        """Reconstruction (raw scale) from the first ``m`` latents only."""
        if not 0 <= m <= self.dict_size:
            raise ValueError(f"prefix size must be in [0, {self.dict_size}], got {m}")
        return (f[..., :m].to(self.W_dec.dtype) @ self.W_dec[:m] + self.b_dec) / self.input_scale

    def decode_prefixes(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions of every nested prefix, computed incrementally (one pass over W_dec)."""
        outs, acc, start = [], self.b_dec.expand(f.shape[0], -1), 0
        for g in self.group_sizes:
            acc = acc + f[:, start : start + g].to(self.W_dec.dtype) @ self.W_dec[start : start + g]
            start += g
            outs.append(acc / self.input_scale)
        return outs

    def sparse_reconstruction(
        self, xs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Nested-prefix reconstruction as dictionary_learning's ``MatryoshkaBatchTopKTrainer`` (Pach et al.
        2025): each prefix error ``l2_m = mean_b ||xs − x̂_m||²`` weighted ``1/G``, then averaged over
        the G prefixes, so ``l2 = Σ_m l2_m / G²``; extra output ``prefix_l2`` (the unweighted ``l2_m``)."""
        if len(self.group_sizes) <= 1:
            return super().sparse_reconstruction(xs, rows, cols, vals)
        B, G = xs.shape[0], len(self.group_sizes)
        bounds = torch.tensor(self.prefix_sizes, device=xs.device)
        gid = torch.bucketize(cols, bounds, right=True)
        keys = rows * G + gid
        order = keys.argsort(stable=True)
        contrib = F.embedding_bag(
            cols[order], self.W_dec, bag_offsets(keys[order], B * G), mode="sum", per_sample_weights=vals[order]
        ).view(B, G, -1)
        resid, errors = xs - self.b_dec, []
        for group in contrib.unbind(1):  # residual of each prefix: [B, d] passes, not a [B, G, d] cumsum
            resid = resid - group
            errors.append(resid.pow(2).sum(-1).mean())
        prefix_l2 = torch.stack(errors)
        l2 = prefix_l2.sum() / G**2  # dictionary_learning: weight 1/G per prefix, then the mean over G
        return l2, xs - resid, {"prefix_l2": prefix_l2.detach()}


@register_sae
class TopKSAE(BaseSAE):
    """TopK SAE (Gao et al. 2024): per-sample top-k, no threshold."""

    sae_type = "top_k"
    label = "TopK"
    dl_class = "AutoEncoderTopK"

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__(activation_dim, dict_size, k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return topk_mask(z, self.required_k())

    def select_indices(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest entries of each row (rows ascending, columns unordered)."""
        k = self.required_k()
        cols = pre.topk(k, dim=-1, sorted=False).indices.flatten()
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, cols


@register_sae
class ReLUSAE(BaseSAE):
    """Plain ReLU SAE trained with an L1 penalty (baseline)."""

    sae_type = "relu"
    label = "ReLU"
    dl_class = "AutoEncoder"
    needs_k = False
    sparse_training = False
    uses_aux_loss = False

    def __init__(self, activation_dim: int, dict_size: int, k: int | None = None):
        super().__init__(activation_dim, dict_size, None)


def make_sae(
    sae_type: str, activation_dim: int, dict_size: int, k: int | None = None, group_sizes: list[int] | None = None
) -> BaseSAE:
    """Construct an SAE by type name (one of :data:`SAE_TYPES`); ``k`` is required by the types that need it."""
    return sae_class(sae_type).create(activation_dim, dict_size, k, group_sizes)
