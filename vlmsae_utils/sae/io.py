"""SAEs on disk: this book's ``sae.safetensors`` + ``config.json`` and dictionary_learning checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes, sha256_file
from .base import CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE, BaseSAE
from .build import build_sae, read_config
from .interop import SAELENS_CONFIG, is_saev_file, load_saelens, load_saev
from .provenance import provenance_from_path
from .registry import _DL_DICT_CLASS_TO_TYPE, SAE_TYPES, sae_class

__all__ = [
    "load_sae",
    "sae_name",
    "save_sae",
]


# ----- save / load -----------------------------------------------------------------------------


def save_sae(
    sae: BaseSAE,
    path: str | os.PathLike,
    training: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``path/sae.safetensors`` (W_enc, b_enc, W_dec, b_dec) and ``path/config.json``; return the
    folder. The config records the weights' SHA-256 (checked at every load), ``training`` (every
    resolved training setting, expansion and data fingerprint included) and ``provenance`` (the
    training store's encoder, hook, block, tokens and hash: :func:`~.provenance.store_provenance`;
    by default the SAE's own, if it has one)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    payload = save(tensors, metadata={"format": FORMAT_NAME})
    atomic_write_bytes(path / WEIGHTS_FILE, payload)
    config = sae.config() | {"weights_sha256": hashlib.sha256(payload).hexdigest()}
    provenance = provenance if provenance is not None else getattr(sae, "provenance", None)
    if provenance:
        config["provenance"] = dict(provenance)
    if training is not None:
        config["training"] = dict(training)
    atomic_write_bytes(path / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return path


def _read_weights(weights: Path, cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``sae.safetensors``, after checking the file against the SHA-256 its config
    recorded (SAEs saved before digests were recorded are read as they are)."""
    from safetensors.torch import load_file

    recorded = cfg.get("weights_sha256")
    if recorded is not None and sha256_file(weights) != recorded:
        raise ValueError(
            f"{weights} does not match the SHA-256 recorded in its {CONFIG_FILE} (corrupted or replaced); "
            "train or copy it again"
        )
    try:
        return load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from None


def _load_ours(folder: Path) -> BaseSAE:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {CONFIG_FILE} next to {WEIGHTS_FILE}")
    cfg = read_config(cfg_path)
    if cfg.get("type") not in SAE_TYPES:
        raise ValueError(
            f"{cfg_path}: unknown SAE type {cfg.get('type')!r}; valid: {', '.join(SAE_TYPES)} "
            "(a type defined outside the package must be registered with register_sae before loading)"
        )
    state = _read_weights(folder / WEIGHTS_FILE, cfg)
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if set(state) != expected:
        raise ValueError(
            f"{folder / WEIGHTS_FILE}: tensors {sorted(state)} do not match the expected {sorted(expected)}"
        )
    sae = build_sae(cfg, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], folder / WEIGHTS_FILE)
    provenance = cfg.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise ValueError(f"{cfg_path}: 'provenance' must be a JSON object, got {type(provenance).__name__}")
    sae.provenance = provenance
    return sae


def _load_dictionary_learning(pt: Path) -> BaseSAE:
    """Read a dictionary_learning ``ae.pt`` (BatchTopK / TopK / Matryoshka / standard layouts)."""
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, corrupt files
        raise ValueError(f"{pt}: not a plain tensor state dict loadable with weights_only=True ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{pt}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    dl_cfg: dict[str, Any] = {}
    cfg_path = pt.parent / CONFIG_FILE
    if cfg_path.is_file():
        raw = read_config(cfg_path)
        trainer = raw.get("trainer", raw)
        dl_cfg = trainer if isinstance(trainer, dict) else {}
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
        sae_type = _DL_DICT_CLASS_TO_TYPE.get(str(dl_cfg.get("dict_class")), "batch_top_k")
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
    sae = build_sae(cfg, W_enc, b_enc, W_dec, b_dec, pt)
    sae.provenance = provenance_from_path(pt.resolve())
    return sae


def _dictionary_learning_file(folder: Path, step: int | None) -> Path:
    """The checkpoint of a dictionary_learning folder (``trainer_0/``, its ``checkpoints/``, or any
    folder of ``ae*.pt``): ``ae_<step>.pt`` when ``step`` is given, else ``ae.pt`` (the last step),
    else its only ``.pt``; several candidates are refused, naming the steps to choose from."""
    places = [folder, folder / "checkpoints"]
    if step is not None:
        for place in places:
            if (place / f"ae_{step}.pt").is_file():
                return place / f"ae_{step}.pt"
        found = sorted(p.name for place in places for p in place.glob("ae_*.pt"))
        raise FileNotFoundError(f"{folder}: no ae_{step}.pt (checkpoints there: {found or 'none'})")
    if (folder / "ae.pt").is_file():
        return folder / "ae.pt"
    pts = sorted(folder.glob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    steps = sorted(p.name for p in pts)
    raise FileNotFoundError(
        f"{folder}: contains neither {WEIGHTS_FILE} nor a single ae.pt (found .pt files: {steps}); "
        "name the file, or give step= (the paper's scripts read ae_100000.pt)"
    )


def load_sae(path: str | os.PathLike, step: int | None = None) -> BaseSAE:
    """Load an SAE from our folder format, a SAELens folder, a saev ``sae.pt`` or a dictionary_learning
    checkpoint: an ``ae*.pt`` file, or its folder (``trainer_0/``, ``checkpoints/``), where ``step``
    picks ``ae_<step>.pt``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}")
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return _load_ours(path)
        if (path / SAELENS_CONFIG).is_file():
            return load_saelens(path)
        path = _dictionary_learning_file(path, step)
    if path.name == WEIGHTS_FILE:
        return _load_ours(path.parent)
    if path.suffix in (".pt", ".pth"):
        return load_saev(path) if is_saev_file(path) else _load_dictionary_learning(path)
    raise ValueError(f"{path}: unrecognised SAE file; expected a folder, {WEIGHTS_FILE} or a .pt file")


def sae_name(path: str | os.PathLike) -> str:
    """How tables and cards name an SAE given by path: its run folder, never its file name (every
    released checkpoint is called ``ae_100000.pt``); a ``released:`` name stays as given."""
    text = str(path)
    if text.startswith("released:"):
        return text.removeprefix("released:")
    target = Path(text)
    if target.suffix in (".pt", ".pth", ".safetensors"):
        target = target.parent
    while target.name == "checkpoints" or re.fullmatch(r"trainer_\d+", target.name):
        target = target.parent
    return target.name or text
