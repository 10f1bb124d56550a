"""Building an SAE from a saved config and tensors, every value checked (shared by every format)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .base import BaseSAE
from .registry import make_sae, sae_class

__all__ = [
    "build_sae",
    "read_config",
]


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


def build_sae(
    cfg: dict, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, src: Path
) -> BaseSAE:
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


def read_config(cfg_path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict, or an error naming the file (invalid JSON, or not an object)."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg
