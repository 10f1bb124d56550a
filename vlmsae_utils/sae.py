"""Sparse autoencoders (BatchTopK, Matryoshka BatchTopK, TopK, ReLU), their registry and on-disk formats.

Formulas (Pach et al. 2025): ``z = ReLU((x·s − b_dec) W_enc + b_enc)``, ``x̂ = (f W_dec + b_dec) / s``
where ``s = input_scale`` (1 for imported checkpoints). Shapes: ``W_enc [d, ω]``, ``b_enc [ω]``,
``W_dec [ω, d]``, ``b_dec [d]``.

Every SAE type is a :class:`BaseSAE` subclass registered with :func:`register_sae`: the class owns
its type name, table label, dictionary_learning class name, training selection rule
(:meth:`BaseSAE.select` / :meth:`BaseSAE.select_indices`) and loss terms
(:meth:`BaseSAE.sparse_reconstruction`, :meth:`BaseSAE.sparsity_penalty`). :data:`SAE_TYPES`,
:data:`SAE_CLASSES`, :data:`SAE_LABELS` and the dictionary_learning name map are live views of
the registry, so a type registered from another module is known everywhere (make_sae, load_sae,
train_sae, TrainConfig, sweeps) without editing the package.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write_bytes

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "INITS",
    "SAE_CLASSES",
    "SAE_LABELS",
    "SAE_TYPES",
    "WEIGHTS_FILE",
    "BaseSAE",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "TopKSAE",
    "bag_offsets",
    "batch_topk_indices",
    "batch_topk_mask",
    "load_sae",
    "make_sae",
    "random_directions",
    "register_sae",
    "sae_class",
    "save_sae",
    "topk_mask",
    "unregister_sae",
]

FORMAT_NAME = "vlmsae-sae"
#: Initial decoder directions (TrainConfig ``init``): ``"uniform"`` rows drawn in a cube and
#: normalised — dictionary_learning's ``kaiming_uniform_`` / ``nn.Linear`` init, the authors' — or
#: ``"gaussian"`` rows, normalised: directions uniform on the sphere (isotropic).
INITS = ("uniform", "gaussian")


def random_directions(n: int, dim: int, init: str = "uniform") -> torch.Tensor:
    """``n`` random unit rows of width ``dim`` from the global torch generator (see :data:`INITS`)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    w = torch.empty(n, dim).uniform_(-1.0, 1.0) if init == "uniform" else torch.randn(n, dim)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class BaseSAE(nn.Module):
    """Shared encoder/decoder of all SAE variants; subclasses choose which latents survive and the
    loss terms, and declare themselves with the class attributes below (see :func:`register_sae`)."""

    #: Registry name (``config.json`` ``type``, TrainConfig ``sae_type``, run folder names).
    sae_type: str = "base"
    #: Human label in tables and plots, e.g. ``"BatchTopK"``.
    label: str = "base"
    #: dictionary_learning ``dict_class`` name read as this type by :func:`load_sae` (``None``: none).
    dl_class: str | None = None
    #: Whether the type needs ``k`` (active latents per input); without it ``k`` is ignored.
    needs_k: bool = True
    #: Whether inference codes use the learned threshold θ (set by an EMA of the smallest kept value).
    uses_threshold: bool = False
    #: Whether the type has ordered latent groups (``group_sizes``; TrainConfig ``group_fractions``).
    uses_groups: bool = False
    #: ``train.sae_loss`` path: True = only the entries kept by :meth:`select_indices` carry gradient
    #: (sparse; auxiliary-K loss for dead latents); False = dense loss of :meth:`select` + L1 penalty.
    sparse_training: bool = True
    #: Whether the sparse path adds the auxiliary-K loss that revives dead latents.
    uses_aux_loss: bool = True

    def __init__(self, activation_dim: int, dict_size: int, k: int | None = None):
        super().__init__()
        if int(activation_dim) < 1 or int(dict_size) < 1:
            raise ValueError(f"activation_dim and dict_size must be >= 1, got {activation_dim}, {dict_size}")
        if k is not None and not (1 <= int(k) <= int(dict_size)):
            raise ValueError(f"k must be in [1, dict_size={dict_size}], got {k}")
        self.activation_dim = int(activation_dim)
        self.dict_size = int(dict_size)
        self.k = None if k is None else int(k)
        w = random_directions(self.dict_size, self.activation_dim, "uniform")
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.dict_size))
        self.b_dec = nn.Parameter(torch.zeros(self.activation_dim))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("input_scale", torch.tensor(1.0))

    # ----- encoder -------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.activation_dim:
            raise ValueError(f"input has last dim {x.shape[-1]}, SAE expects activation_dim={self.activation_dim}")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense post-ReLU pre-activations ``ReLU((x·s − b_dec) W_enc + b_enc)`` of raw inputs."""
        self._check_x(x)
        xs = x.to(self.W_enc.dtype) * self.input_scale
        return F.relu((xs - self.b_dec) @ self.W_enc + self.b_enc)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        """Training-time sparsification of post-ReLU activations (identity for ReLU SAEs)."""
        return z

    def select_indices(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rule in sparse form: ``(rows, cols)`` of the entries of the post-ReLU ``pre [B, ω]``
        that keep their value and gradient, rows ascending; default: the nonzeros of :meth:`select`."""
        rows, cols = self.select(pre).nonzero(as_tuple=True)
        return rows, cols

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Sparse codes ``f [B, ω]``: learned threshold at inference, (batch) top-k in training
        or while no threshold is set (``threshold < 0``). ``use_threshold=None`` means
        ``not self.training``."""
        z = self.pre_acts(x)
        if use_threshold is None:
            use_threshold = not self.training
        if use_threshold and self.uses_threshold and float(self.threshold) >= 0:
            return z * (z > self.threshold)
        return self.select(z)

    def encode_sparse(self, x: torch.Tensor, use_threshold: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes as ``(indices [B, m], values [B, m])`` with m = max active per row (zero-padded)."""
        f = self.encode(x, use_threshold=use_threshold)
        m = max(1, int((f != 0).sum(dim=-1).max())) if f.numel() else 1
        values, indices = f.topk(min(m, self.dict_size), dim=-1)
        return indices, values

    # ----- decoder -------------------------------------------------------------------------
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw input scale: ``(f W_dec + b_dec) / s``."""
        if f.shape[-1] != self.dict_size:
            raise ValueError(f"codes have last dim {f.shape[-1]}, SAE expects dict_size={self.dict_size}")
        return (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`decode` from sparse codes ``(indices [B, m], values [B, m])`` via embedding_bag."""
        if indices.shape != values.shape or indices.dim() != 2:
            raise ValueError(
                f"indices and values must both be [B, m], got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.dict_size):
            raise ValueError(
                f"indices must lie in [0, {self.dict_size}), got range [{int(indices.min())}, {int(indices.max())}]"
            )
        out = F.embedding_bag(indices.long(), self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction of ``x`` (and the codes when ``output_features``)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    # ----- loss terms (called by train.sae_loss) ---------------------------------------------
    def sparse_reconstruction(
        self, xs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Reconstruction term of the sparse training loss on scaled inputs ``xs [B, d]`` from the kept
        values ``vals`` at ``(rows, cols)``: ``(l2, x̂, extra outputs)``, ``l2 = mean_b ||xs − x̂||²``."""
        x_hat = (
            F.embedding_bag(cols, self.W_dec, bag_offsets(rows, xs.shape[0]), mode="sum", per_sample_weights=vals)
            + self.b_dec
        )
        return (xs - x_hat).pow(2).sum(-1).mean(), x_hat, {}

    def sparsity_penalty(self, f: torch.Tensor) -> torch.Tensor:
        """Penalty of the dense training path (weighted by ``l1_coeff``): L1 of the codes, mean over the batch."""
        return f.sum(-1).mean()

    @classmethod
    def create(
        cls, activation_dim: int, dict_size: int, k: int | None = None, group_sizes: list[int] | None = None
    ) -> BaseSAE:
        """Construct from the fields of ``config.json`` (what :func:`make_sae` and :func:`load_sae` call)."""
        if cls.needs_k and k is None:
            raise ValueError(f"sae_type {cls.sae_type!r} needs k (active latents per input), got None")
        if group_sizes is not None and not cls.uses_groups:
            raise ValueError(f"group_sizes only apply to types with latent groups, not {cls.sae_type!r}")
        extra = {"group_sizes": group_sizes} if cls.uses_groups else {}
        return cls(activation_dim, dict_size, k, **extra) if cls.needs_k else cls(activation_dim, dict_size, **extra)

    @property
    def revives_dead_latents(self) -> bool:
        """Whether training adds the auxiliary-K loss over dead latents (sparse types that declare it)."""
        return self.sparse_training and self.uses_aux_loss

    @property
    def prefix_sizes(self) -> list[int]:
        """Sizes of the nested prefixes that each reconstruct the input (none: a flat dictionary)."""
        return []

    @torch.no_grad()
    def update_threshold(self, min_kept: float | None, beta: float) -> None:
        """One EMA step of the inference threshold θ towards a batch's smallest kept activation
        (dictionary_learning's BatchTopK; the first step sets it); nothing for types without θ."""
        if not self.uses_threshold or min_kept is None:
            return
        theta = float(self.threshold)
        self.threshold.fill_(min_kept if theta < 0 else beta * theta + (1 - beta) * min_kept)

    @torch.no_grad()
    def init_directions(self, init: str) -> None:
        """Redraw the decoder rows as unit ``init`` directions (:func:`random_directions`) and tie the
        encoder to them (``W_enc = W_decᵀ``), as every dictionary_learning SAE starts."""
        w = random_directions(self.dict_size, self.activation_dim, init)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)

    # ----- bookkeeping ---------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the constraint of Pach et al. 2025)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def config(self) -> dict:
        """JSON-able description used by :func:`save_sae`."""
        return {
            "format": FORMAT_NAME,
            "version": 1,
            "type": self.sae_type,
            "activation_dim": self.activation_dim,
            "dict_size": self.dict_size,
            "k": self.k,
            "group_sizes": getattr(self, "group_sizes", None),
            "input_scale": float(self.input_scale),
            "threshold": float(self.threshold),
        }

    def extra_repr(self) -> str:
        return f"activation_dim={self.activation_dim}, dict_size={self.dict_size}, k={self.k}"


def batch_topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``B·k`` largest entries of the whole batch (flattened), zero the rest."""
    flat = z.flatten()
    n = min(k * z.shape[0], flat.numel())
    vals, idx = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)


def topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each row."""
    vals, idx = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, idx, vals)


def batch_topk_indices(pre: torch.Tensor, n: int, sample_size: int = 65536, margin: float = 2.0) -> torch.Tensor:
    """Flat indices of the ``n`` largest entries of ``pre`` (exact, like ``flatten().topk``).

    Fast path: a strided sample gives a cut ``t`` expected to leave ~``margin·n`` entries above it;
    the exact top-n among the entries ``> t`` is the global top-n whenever at least n survive
    (checked; otherwise a full top-k runs)."""
    flat = pre.flatten()
    N = flat.numel()
    if 8 * sample_size > N or margin * n >= N / 4:
        return flat.topk(n, sorted=False).indices
    stride = max(1, N // sample_size)
    while math.gcd(stride, pre.shape[-1]) != 1:  # avoid sampling the same columns
        stride += 1
    sample = flat[::stride]
    rank = max(1, int(sample.numel() * (1.0 - margin * n / N)))
    t = sample.kthvalue(rank).values
    cand = (flat > t).nonzero().squeeze(1)
    if cand.numel() < n:
        return flat.topk(n, sorted=False).indices
    return cand[flat[cand].topk(n, sorted=False).indices]


def bag_offsets(keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    """``embedding_bag`` offsets of ``n_bags`` consecutive bags from the (ascending) bag id of each entry."""
    counts = torch.bincount(keys, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


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

    def __getitem__(self, index):
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

    def __getitem__(self, key):
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
        return batch_topk_mask(z, self.k)

    def select_indices(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``B·k`` largest entries of the batch (fast exact top-n), sorted row-major."""
        omega = pre.shape[1]
        idx = batch_topk_indices(pre, min(self.k * pre.shape[0], pre.numel())).sort().values
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
        recons = contrib.cumsum(1) + self.b_dec
        prefix_l2 = (xs[:, None, :] - recons).pow(2).sum(-1).mean(0)
        l2 = prefix_l2.sum() / G**2  # dictionary_learning: weight 1/G per prefix, then the mean over G
        return l2, recons[:, -1], {"prefix_l2": prefix_l2.detach()}


@register_sae
class TopKSAE(BaseSAE):
    """TopK SAE (Gao et al. 2024): per-sample top-k, no threshold."""

    sae_type = "top_k"
    label = "TopK"
    dl_class = "AutoEncoderTopK"

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__(activation_dim, dict_size, k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return topk_mask(z, self.k)

    def select_indices(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest entries of each row (rows ascending, columns unordered)."""
        cols = pre.topk(self.k, dim=-1, sorted=False).indices.flatten()
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)
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


# ----- save / load -----------------------------------------------------------------------------


def save_sae(sae: BaseSAE, path: str | os.PathLike, training: Mapping[str, Any] | None = None) -> Path:
    """Write ``path/sae.safetensors`` (W_enc, b_enc, W_dec, b_dec) and ``path/config.json``; return the
    folder. ``training`` (every resolved training setting, expansion and data fingerprint included)
    is recorded under the config's ``"training"`` key; loading does not need it."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT_NAME}))
    config = sae.config() | ({"training": dict(training)} if training is not None else {})
    atomic_write_bytes(path / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return path


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], src: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _positive_int(cfg: dict, key: str, src: Path) -> int:
    """``cfg[key]`` as a positive integer, or an error naming the file and key."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{src}: config key {key!r} must be a positive integer, got {value!r}")
    return value


def _check_config(cfg: dict, src: Path) -> tuple[int, int]:
    """Activation width and dictionary size of a saved config, after checking every key a load
    reads (k where the type needs it, a positive finite input scale, a finite threshold)."""
    d, w = _positive_int(cfg, "activation_dim", src), _positive_int(cfg, "dict_size", src)
    if sae_class(cfg["type"]).needs_k and not 1 <= _positive_int(cfg, "k", src) <= w:
        raise ValueError(f"{src}: config key 'k' must be at most dict_size {w}, got {cfg['k']}")
    scale = cfg.get("input_scale")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{src}: config key 'input_scale' must be a positive finite number, got {scale!r}")
    threshold = cfg.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"{src}: config key 'threshold' must be a finite number, got {threshold!r}")
    return d, w


def _build(cfg: dict, W_enc, b_enc, W_dec, b_dec, src: Path) -> BaseSAE:
    d, w = _check_config(cfg, src)
    for name, t, shape in (
        ("W_enc", W_enc, (d, w)),
        ("b_enc", b_enc, (w,)),
        ("W_dec", W_dec, (w, d)),
        ("b_dec", b_dec, (d,)),
    ):
        _check_shape(name, t, shape, src)
        if not torch.isfinite(t).all():
            raise ValueError(f"{src}: tensor {name!r} holds NaN or infinite values")
    sae = make_sae(cfg["type"], d, w, cfg.get("k"), cfg.get("group_sizes"))
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.float())
        sae.threshold.fill_(float(cfg.get("threshold", -1.0) if cfg.get("threshold") is not None else -1.0))
        sae.input_scale.fill_(float(cfg["input_scale"]) if cfg.get("input_scale") is not None else 1.0)
    return sae.eval()


def _load_ours(folder: Path) -> BaseSAE:
    from safetensors.torch import load_file

    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {CONFIG_FILE} next to {WEIGHTS_FILE}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type") not in SAE_TYPES:
        raise ValueError(
            f"{cfg_path}: unknown SAE type {cfg.get('type')!r}; valid: {', '.join(SAE_TYPES)} "
            "(a type defined outside the package must be registered with register_sae before loading)"
        )
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if set(state) != expected:
        raise ValueError(
            f"{folder / WEIGHTS_FILE}: tensors {sorted(state)} do not match the expected {sorted(expected)}"
        )
    return _build(cfg, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], folder / WEIGHTS_FILE)


def _load_dictionary_learning(pt: Path) -> BaseSAE:
    """Read a dictionary_learning ``ae.pt`` (BatchTopK / TopK / Matryoshka / standard layouts)."""
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, corrupt files
        raise ValueError(f"{pt}: not a plain tensor state dict loadable with weights_only=True ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{pt}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    dl_cfg = {}
    cfg_path = pt.parent / CONFIG_FILE
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
            dl_cfg = raw.get("trainer", raw) if isinstance(raw, dict) else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path}: invalid JSON ({exc})") from exc
    keys = set(state)
    linear = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}
    matry = {"W_enc", "b_enc", "W_dec", "b_dec"}
    standard = {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
    buffers = {"k", "threshold", "group_sizes"}
    if matry <= keys:
        base, W_enc, b_enc, W_dec, b_dec = matry, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
        sae_type = "matryoshka_batch_top_k"
    elif linear <= keys:
        base = linear
        W_enc, b_enc = state["encoder.weight"].T, state["encoder.bias"]
        W_dec, b_dec = state["decoder.weight"].T, state["b_dec"]
        sae_type = _DL_DICT_CLASS_TO_TYPE.get(dl_cfg.get("dict_class"), "batch_top_k")
    elif standard <= keys:
        base = standard
        W_enc, b_enc = state["encoder.weight"].T, state["encoder.bias"]
        W_dec, b_dec = state["decoder.weight"].T, state["bias"]
        sae_type = "relu"
    else:
        raise ValueError(
            f"{pt}: keys {sorted(keys)} match no known dictionary_learning layout "
            f"(BatchTopK {sorted(linear)}, Matryoshka {sorted(matry)}, standard {sorted(standard)})"
        )
    unknown = keys - base - buffers - ({"decoder.bias"} if base is standard else set())
    if unknown:
        raise ValueError(f"{pt}: unknown keys {sorted(unknown)} for the {sae_type} layout")
    if W_enc.dim() != 2:
        raise ValueError(f"{pt}: encoder weight must be 2-D, got shape {tuple(W_enc.shape)}")
    d, w = W_enc.shape
    k = int(state["k"]) if "k" in state else dl_cfg.get("k")
    cls = sae_class(sae_type)
    if cls.needs_k and k is None:
        raise ValueError(f"{pt}: no 'k' buffer and no k in {CONFIG_FILE}")
    group_sizes = None
    if cls.uses_groups:
        if "group_sizes" in state:
            group_sizes = [int(g) for g in state["group_sizes"].tolist()]
        else:
            group_sizes = [int(w)]
    cfg = {
        "type": sae_type,
        "activation_dim": d,
        "dict_size": w,
        "k": k,
        "group_sizes": group_sizes,
        "threshold": float(state["threshold"]) if "threshold" in state else -1.0,
        "input_scale": 1.0,
    }
    return _build(cfg, W_enc, b_enc, W_dec, b_dec, pt)


def load_sae(path: str | os.PathLike) -> BaseSAE:
    """Load an SAE from our folder format or a dictionary_learning ``ae.pt`` (file or its folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}")
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return _load_ours(path)
        pts = sorted(path.glob("*.pt"))
        if (path / "ae.pt").is_file():
            return _load_dictionary_learning(path / "ae.pt")
        if len(pts) == 1:
            return _load_dictionary_learning(pts[0])
        raise FileNotFoundError(
            f"{path}: contains neither {WEIGHTS_FILE} nor a single ae.pt (found .pt files: {[p.name for p in pts]})"
        )
    if path.name == WEIGHTS_FILE:
        return _load_ours(path.parent)
    if path.suffix in (".pt", ".pth"):
        return _load_dictionary_learning(path)
    raise ValueError(f"{path}: unrecognised SAE file; expected a folder, {WEIGHTS_FILE} or a .pt file")
