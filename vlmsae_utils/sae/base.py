"""The SAE every type shares (:class:`BaseSAE`: encoder, decoder, hooks a type overrides) and its kernels."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "INITS",
    "WEIGHTS_FILE",
    "BaseSAE",
    "bag_offsets",
    "batch_topk_indices",
    "batch_topk_mask",
    "random_directions",
    "topk_mask",
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
    #: Buffers (saved with the weights): the inference threshold θ (< 0: none yet) and the input scale s.
    threshold: torch.Tensor
    input_scale: torch.Tensor
    #: What the SAE was trained on (encoder, hook, layer, tokens, store hash; ``None``: not recorded),
    #: checked by :func:`~.provenance.check_provenance` before it encodes a store or enters a model.
    provenance: dict[str, Any] | None = None

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
        self.W_enc = nn.Parameter(w.T.contiguous())  # [d, ω] row-major: its gradient and Adam need no copy
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

    def decode_prefixes(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions of the nested prefixes (:attr:`prefix_sizes`); a flat dictionary has one, the whole."""
        return [self.decode(f)]

    def required_k(self) -> int:
        """``k`` of a type that needs it (set and checked by the constructor)."""
        if self.k is None:
            raise ValueError(f"sae_type {self.sae_type!r} has no k")
        return self.k

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

    def forward(
        self, x: torch.Tensor, output_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        extra: dict[str, Any] = {"group_sizes": group_sizes} if cls.uses_groups else {}
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
    cand = _entries_above(flat, float(sample.kthvalue(rank).values))
    if cand.numel() < n:
        return flat.topk(n, sorted=False).indices
    return cand[flat[cand].topk(n, sorted=False).indices]


def _entries_above(flat: torch.Tensor, cut: float, block: int = 64) -> torch.Tensor:
    """Ascending flat indices of the entries ``> cut`` (as ``(flat > cut).nonzero()``), reading the
    whole tensor once as maxima of ``block``-entry blocks and scanning only the blocks above the cut."""
    if flat.numel() % block:
        return (flat > cut).nonzero().squeeze(1)
    blocks = flat.view(-1, block)
    hot = (blocks.amax(1) > cut).nonzero().squeeze(1)
    inner = (blocks[hot] > cut).nonzero()
    return hot[inner[:, 0]] * block + inner[:, 1]


def bag_offsets(keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    """``embedding_bag`` offsets of ``n_bags`` consecutive bags from the (ascending) bag id of each entry."""
    counts = torch.bincount(keys, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts
