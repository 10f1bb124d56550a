"""Sparse autoencoders (BatchTopK, Matryoshka BatchTopK, TopK, ReLU) and their on-disk formats.

Formulas (Pach et al. 2025): ``z = ReLU((x·s − b_dec) W_enc + b_enc)``, ``x̂ = (f W_dec + b_dec) / s``
where ``s = input_scale`` (1 for imported checkpoints). Shapes: ``W_enc [d, ω]``, ``b_enc [ω]``,
``W_dec [ω, d]``, ``b_dec [d]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write_bytes

SAE_TYPES = ("batch_top_k", "matryoshka_batch_top_k", "top_k", "relu")
FORMAT_NAME = "vlmsae-sae"
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class BaseSAE(nn.Module):
    """Shared encoder/decoder of all SAE variants; subclasses only choose which latents survive."""

    sae_type: str = "base"

    def __init__(self, activation_dim: int, dict_size: int, k: int | None = None):
        super().__init__()
        if int(activation_dim) < 1 or int(dict_size) < 1:
            raise ValueError(f"activation_dim and dict_size must be >= 1, got {activation_dim}, {dict_size}")
        if k is not None and not (1 <= int(k) <= int(dict_size)):
            raise ValueError(f"k must be in [1, dict_size={dict_size}], got {k}")
        self.activation_dim = int(activation_dim)
        self.dict_size = int(dict_size)
        self.k = None if k is None else int(k)
        w = torch.randn(self.dict_size, self.activation_dim)
        w = w / w.norm(dim=1, keepdim=True)
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

    uses_threshold: bool = False

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
            raise ValueError(f"indices and values must both be [B, m], got {tuple(indices.shape)} and {tuple(values.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.dict_size):
            raise ValueError(f"indices must lie in [0, {self.dict_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        out = F.embedding_bag(indices.long(), self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction of ``x`` (and the codes when ``output_features``)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    # ----- bookkeeping ---------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the constraint of Pach et al. 2025)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def config(self) -> dict:
        """JSON-able description used by :func:`save_sae`."""
        return {"format": FORMAT_NAME, "version": 1, "type": self.sae_type,
                "activation_dim": self.activation_dim, "dict_size": self.dict_size, "k": self.k,
                "group_sizes": getattr(self, "group_sizes", None),
                "input_scale": float(self.input_scale), "threshold": float(self.threshold)}

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


class BatchTopKSAE(BaseSAE):
    """BatchTopK SAE (Bussmann et al. 2024): batch-wide top ``B·k`` in training, threshold θ at inference."""

    sae_type = "batch_top_k"
    uses_threshold = True

    def __init__(self, activation_dim: int, dict_size: int, k: int = 20):
        super().__init__(activation_dim, dict_size, k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return batch_topk_mask(z, self.k)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: ordered latent groups whose nested prefixes each reconstruct ``x``."""

    sae_type = "matryoshka_batch_top_k"

    def __init__(self, activation_dim: int, dict_size: int, k: int = 20, group_sizes: list[int] | None = None):
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
            acc = acc + f[:, start:start + g].to(self.W_dec.dtype) @ self.W_dec[start:start + g]
            start += g
            outs.append(acc / self.input_scale)
        return outs


class TopKSAE(BaseSAE):
    """TopK SAE (Gao et al. 2024): per-sample top-k, no threshold."""

    sae_type = "top_k"

    def __init__(self, activation_dim: int, dict_size: int, k: int = 20):
        super().__init__(activation_dim, dict_size, k)

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return topk_mask(z, self.k)


class ReLUSAE(BaseSAE):
    """Plain ReLU SAE trained with an L1 penalty (baseline)."""

    sae_type = "relu"

    def __init__(self, activation_dim: int, dict_size: int, k: int | None = None):
        super().__init__(activation_dim, dict_size, None)


SAE_CLASSES: dict[str, type[BaseSAE]] = {
    "batch_top_k": BatchTopKSAE, "matryoshka_batch_top_k": MatryoshkaBatchTopKSAE,
    "top_k": TopKSAE, "relu": ReLUSAE,
}


def make_sae(sae_type: str, activation_dim: int, dict_size: int, k: int | None = 20,
             group_sizes: list[int] | None = None) -> BaseSAE:
    """Construct an SAE by type name (one of :data:`SAE_TYPES`)."""
    if sae_type not in SAE_CLASSES:
        raise ValueError(f"unknown sae_type {sae_type!r}; valid: {', '.join(SAE_TYPES)}")
    if sae_type == "matryoshka_batch_top_k":
        return MatryoshkaBatchTopKSAE(activation_dim, dict_size, k, group_sizes)
    if sae_type == "relu":
        return ReLUSAE(activation_dim, dict_size)
    return SAE_CLASSES[sae_type](activation_dim, dict_size, k)


# ----- save / load -----------------------------------------------------------------------------

def save_sae(sae: BaseSAE, path: str | os.PathLike) -> Path:
    """Write ``path/sae.safetensors`` (W_enc, b_enc, W_dec, b_dec) and ``path/config.json``; return the folder."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT_NAME}))
    atomic_write_bytes(path / CONFIG_FILE, json.dumps(sae.config(), indent=2).encode())
    return path


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], src: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _build(cfg: dict, W_enc, b_enc, W_dec, b_dec, src: Path) -> BaseSAE:
    d, w = int(cfg["activation_dim"]), int(cfg["dict_size"])
    for name, t, shape in (("W_enc", W_enc, (d, w)), ("b_enc", b_enc, (w,)), ("W_dec", W_dec, (w, d)), ("b_dec", b_dec, (d,))):
        _check_shape(name, t, shape, src)
    sae = make_sae(cfg["type"], d, w, cfg.get("k"), cfg.get("group_sizes"))
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.float())
        sae.threshold.fill_(float(cfg.get("threshold", -1.0) if cfg.get("threshold") is not None else -1.0))
        sae.input_scale.fill_(float(cfg.get("input_scale", 1.0) or 1.0))
    return sae.eval()


def _load_ours(folder: Path) -> BaseSAE:
    from safetensors.torch import load_file

    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {CONFIG_FILE} next to {WEIGHTS_FILE}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type") not in SAE_TYPES:
        raise ValueError(f"{cfg_path}: unknown SAE type {cfg.get('type')!r}; valid: {', '.join(SAE_TYPES)}")
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if set(state) != expected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: tensors {sorted(state)} do not match the expected {sorted(expected)}")
    return _build(cfg, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], folder / WEIGHTS_FILE)


_DL_DICT_CLASS_TO_TYPE = {"BatchTopKSAE": "batch_top_k", "MatryoshkaBatchTopKSAE": "matryoshka_batch_top_k",
                          "AutoEncoderTopK": "top_k", "AutoEncoder": "relu"}


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
        raise ValueError(f"{pt}: keys {sorted(keys)} match no known dictionary_learning layout "
                         f"(BatchTopK {sorted(linear)}, Matryoshka {sorted(matry)}, standard {sorted(standard)})")
    unknown = keys - base - buffers - ({"decoder.bias"} if base is standard else set())
    if unknown:
        raise ValueError(f"{pt}: unknown keys {sorted(unknown)} for the {sae_type} layout")
    if W_enc.dim() != 2:
        raise ValueError(f"{pt}: encoder weight must be 2-D, got shape {tuple(W_enc.shape)}")
    d, w = W_enc.shape
    k = int(state["k"]) if "k" in state else dl_cfg.get("k")
    if sae_type != "relu" and k is None:
        raise ValueError(f"{pt}: no 'k' buffer and no k in {CONFIG_FILE}")
    group_sizes = None
    if sae_type == "matryoshka_batch_top_k":
        if "group_sizes" in state:
            group_sizes = [int(g) for g in state["group_sizes"].tolist()]
        else:
            group_sizes = [int(w)]
    cfg = {"type": sae_type, "activation_dim": d, "dict_size": w, "k": k, "group_sizes": group_sizes,
           "threshold": float(state["threshold"]) if "threshold" in state else -1.0, "input_scale": 1.0}
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
        raise FileNotFoundError(f"{path}: contains neither {WEIGHTS_FILE} nor a single ae.pt "
                                f"(found .pt files: {[p.name for p in pts]})")
    if path.name == WEIGHTS_FILE:
        return _load_ours(path.parent)
    if path.suffix in (".pt", ".pth"):
        return _load_dictionary_learning(path)
    raise ValueError(f"{path}: unrecognised SAE file; expected a folder, {WEIGHTS_FILE} or a .pt file")
