"""SAEs that travel: SAELens folders and saev ``sae.pt`` files, written and read.

Both libraries encode raw activations with no input scale, so :func:`export_saelens` and
:func:`export_saev` fold ours into the weights: with ``s`` the input scale,
``(x·s − b_dec) W_enc = (x − b_dec/s)(s·W_enc)`` and ``(f W_dec + b_dec)/s = f (W_dec/s) + b_dec/s``,
so the codes are the same numbers. What each format cannot say about our SAE (its type, Matryoshka
groups, θ, provenance) rides along in the format's free-form metadata, so our own loader restores
the SAE exactly; the other library reads what it can:

- SAELens (``cfg.json`` + ``sae_weights.safetensors``): BatchTopK and Matryoshka as ``jumprelu``
  with θ in every latent's threshold (their conversion of BatchTopK), TopK as ``topk``, ReLU as
  ``standard``; same codes in SAELens as here.
- saev (one JSON header line, then a ``torch.save`` state dict; schema 2): saev encodes
  ``x W_enc + b_enc`` (``b_dec`` folded into ``b_enc``) and has no threshold activation, so a
  BatchTopK or Matryoshka SAE is written with saev's per-sample ``BatchTopK(k)``: saev will keep k
  latents per input where we keep those above θ.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import BaseSAE
from .build import build_sae, read_config
from .registry import sae_class

__all__ = [
    "SAELENS_CONFIG",
    "SAELENS_WEIGHTS",
    "export_saelens",
    "export_saev",
    "is_saev_file",
    "load_saelens",
    "load_saev",
]

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
#: Our types as SAELens architectures (a thresholded batch top-k is a JumpReLU with one θ).
_SAELENS_ARCH = {"batch_top_k": "jumprelu", "matryoshka_batch_top_k": "jumprelu", "top_k": "topk", "relu": "standard"}
#: Our types as saev activations (saev has no threshold: the batch types become its per-sample top-k).
_SAEV_ACTIVATION = {"batch_top_k": "BatchTopK", "matryoshka_batch_top_k": "BatchTopK", "top_k": "TopK", "relu": "Relu"}
_OURS = "vlmsae"  # the metadata key holding what only this package reads back


def _raw_unit_weights(sae: BaseSAE) -> dict[str, torch.Tensor]:
    """W_enc, b_enc, W_dec, b_dec acting on raw activations (input scale folded in), float32 on the CPU."""
    s = float(sae.input_scale)
    w = {n: getattr(sae, n).detach().float().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return {"W_enc": w["W_enc"] * s, "b_enc": w["b_enc"], "W_dec": w["W_dec"] / s, "b_dec": w["b_dec"] / s}


def _our_metadata(sae: BaseSAE) -> dict[str, Any]:
    """What our loader needs beyond the weights: type, k, groups, θ (in scaled units: unchanged by the fold)."""
    return {
        "type": sae.sae_type,
        "k": sae.k,
        "group_sizes": getattr(sae, "group_sizes", None),
        "threshold": float(sae.threshold),
        "provenance": getattr(sae, "provenance", None),
    }


def _checked_threshold(sae: BaseSAE, target: str) -> float:
    """θ of a thresholded type, refused when it was never set (the SAE would encode per batch only)."""
    theta = float(sae.threshold)
    if sae.uses_threshold and theta < 0:
        raise ValueError(
            f"this {sae.label} SAE has no inference threshold yet (train past threshold_start_step); "
            f"{target} cannot encode it without one"
        )
    return theta


def export_saelens(sae: BaseSAE, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` that SAELens loads with
    ``SAE.load_from_disk``; the hook, model, layer and token mode go into its ``metadata``."""
    from safetensors.torch import save_file

    arch = _SAELENS_ARCH.get(sae.sae_type)
    if arch is None:
        raise ValueError(f"SAE type {sae.sae_type!r} has no SAELens architecture; exportable: {sorted(_SAELENS_ARCH)}")
    tensors = _raw_unit_weights(sae)
    if arch == "jumprelu":
        tensors["threshold"] = torch.full((sae.dict_size,), _checked_threshold(sae, "SAELens' jumprelu"))
    provenance = getattr(sae, "provenance", None) or {}
    layer = provenance.get("layer")
    metadata = {
        "model_name": model_name or provenance.get("encoder") or "unknown",
        "hook_name": f"{provenance.get('hook', 'unknown')}" + (f".{layer}" if layer is not None else ""),
        "sae_lens_version": "6",
        _OURS: _our_metadata(sae),
    }
    cfg = {
        "architecture": arch,
        "d_in": sae.activation_dim,
        "d_sae": sae.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        **({"k": sae.k} if arch == "topk" else {}),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
    return folder


def _from_raw(
    sae_type: str,
    weights: Mapping[str, torch.Tensor],
    k: int | None,
    group_sizes: list[int] | None,
    threshold: float,
) -> BaseSAE:
    """An SAE (input scale 1) from raw-unit weights, its shapes and values checked like our own files."""
    d, w = weights["W_enc"].shape
    cfg = {"type": sae_type, "activation_dim": int(d), "dict_size": int(w), "k": k, "group_sizes": group_sizes}
    cfg |= {"threshold": threshold, "input_scale": 1.0}
    return build_sae(cfg, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], Path("<import>"))


def _saelens_type(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], src: Path) -> tuple[str, Any, float]:
    """Our type, k and θ for a SAELens folder written elsewhere (ours carry them in their metadata)."""
    arch = cfg.get("architecture")
    if arch == "standard":
        return "relu", None, -1.0
    if arch == "topk":
        return "top_k", int(cfg["k"]), -1.0
    if arch == "jumprelu":
        theta = tensors["threshold"]
        if not torch.all(theta == theta.flatten()[0]):
            raise ValueError(f"{src}: a JumpReLU SAE with a threshold per latent has no type here (one θ only)")
        return "batch_top_k", 1, float(theta.flatten()[0])  # k is not in the file; inference reads θ only
    raise ValueError(f"{src}: SAELens architecture {arch!r} has no type here; readable: jumprelu, topk, standard")


def load_saelens(folder: str | os.PathLike) -> BaseSAE:
    """Read a SAELens folder: ours exactly (type, groups, θ, provenance from the metadata), others by
    architecture. ``apply_b_dec_to_input=False`` is folded into ``b_enc``; normalised inputs are refused."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_config(folder / SAELENS_CONFIG)
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    weights = {n: tensors[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if not cfg.get("apply_b_dec_to_input", True):  # theirs: x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc)
        weights["b_enc"] = weights["b_enc"] + weights["b_dec"] @ weights["W_enc"]
    ours = (cfg.get("metadata") or {}).get(_OURS)
    if ours:
        sae = _from_raw(ours["type"], weights, ours["k"], ours["group_sizes"], ours["threshold"])
        sae.provenance = ours.get("provenance")
        return sae
    sae_type, k, theta = _saelens_type(cfg, tensors, folder)
    k = k if sae_class(sae_type).needs_k else None
    return _from_raw(sae_type, weights, k, None, theta)


def export_saev(sae: BaseSAE, file: str | os.PathLike) -> Path:
    """Write a saev checkpoint (schema 2: a JSON header line, then the state dict); ``b_dec`` is folded
    into ``b_enc`` since saev does not subtract it before encoding."""
    weights = _raw_unit_weights(sae)
    theta = _checked_threshold(sae, "saev") if sae.uses_threshold else -1.0
    activation = _SAEV_ACTIVATION.get(sae.sae_type)
    if activation is None:
        raise ValueError(f"SAE type {sae.sae_type!r} has no saev activation; exportable: {sorted(_SAEV_ACTIVATION)}")
    state = {**weights, "b_enc": weights["b_enc"] - weights["b_dec"] @ weights["W_enc"]}
    header = {
        "schema": 2,
        "cfg": {
            "d_vit": sae.activation_dim,
            "exp_factor": sae.dict_size // sae.activation_dim,
            "activation": {"cls": activation, "params": {} if activation == "Relu" else {"top_k": sae.k}},
        },
        "commit": "unknown",
        "lib": "vlmsae",
        _OURS: _our_metadata(sae) | {"threshold": theta},
    }
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as stream:
        stream.write((json.dumps(header) + "\n").encode())
        torch.save({n: t.contiguous() for n, t in state.items()}, stream)
    return file


def is_saev_file(file: Path) -> bool:
    """Whether a ``.pt`` file opens with saev's JSON header line (a pickle opens with byte 0x80)."""
    with open(file, "rb") as stream:
        return stream.read(1) == b"{"


def load_saev(file: str | os.PathLike) -> BaseSAE:
    """Read a saev checkpoint: ours exactly; saev's own Relu / TopK / BatchTopK (per-sample top-k in
    saev) as our ReLU and TopK types. saev keeps the top-k pre-activations even when negative where
    we apply the ReLU first: codes agree whenever k pre-activations are positive."""
    file = Path(file)
    with open(file, "rb") as stream:
        try:
            header = json.loads(stream.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file}: its first line is not saev's JSON header ({err})") from None
        try:
            state = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled objects, a truncated file
            raise ValueError(f"{file}: not a plain tensor state dict after the header ({exc})") from None
    weights = {n: state[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    weights["b_enc"] = weights["b_enc"] + weights["b_dec"] @ weights["W_enc"]  # saev does not subtract b_dec
    ours = header.get(_OURS) if isinstance(header, dict) else None
    if ours:
        sae = _from_raw(ours["type"], weights, ours["k"], ours["group_sizes"], ours["threshold"])
        sae.provenance = ours.get("provenance")
        return sae
    activation = ((header.get("cfg") or {}).get("activation") or {}) if isinstance(header, dict) else {}
    kind, params = activation.get("cls", "Relu"), activation.get("params") or {}
    if kind == "Relu":
        return _from_raw("relu", weights, None, None, -1.0)
    if kind in ("TopK", "BatchTopK"):
        return _from_raw("top_k", weights, int(params.get("top_k", 32)), None, -1.0)
    raise ValueError(f"{file}: saev activation {kind!r} has no type here; readable: Relu, TopK, BatchTopK")
