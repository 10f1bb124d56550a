"""Hook points as data: one :class:`HookSpec` per place in a vision encoder whose activations
the book reads (extraction), replaces (SAE splicing) or clamps (steering).

Every stage reads the table instead of comparing hook names: :func:`check_hook` and the error
messages list :data:`HOOKS`, a spec's ``per_block`` says whether it needs a layer, its
``layout`` which token modes apply, its ``width`` the activation width, its ``locate`` the module
whose forward output is the hook point, and ``steerable`` whether :mod:`.steering` may clamp
there. Adding a hook point is one :func:`register_hook` call (or one entry in
``_BUILT_IN``); the names stored in manifests (``post_mlp_residual``, ``post_projection``) never change.

This module imports nothing heavy (no torch): encoders are duck-typed (``.blocks``, ``.projection``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_HOOK",
    "EMBEDDING_HOOK",
    "HOOKS",
    "LAYOUTS",
    "POOLED",
    "POOLED_TOKEN_MODES",
    "TOKENS",
    "TOKEN_MODES",
    "HookSpec",
    "Locator",
    "block_child",
    "block_hooks",
    "block_output",
    "check_hook",
    "check_layer",
    "check_steerable",
    "check_token_mode",
    "hook_spec",
    "projection_output",
    "register_hook",
    "specs",
    "steerable_hooks",
    "unregister_hook",
]

TOKEN_MODES = ("cls", "mean", "random_k", "all")
TOKENS = "tokens"  # layout [B, T, D]: a sequence of CLS/register/patch tokens
POOLED = "pooled"  # layout [B, D]: one vector per image
LAYOUTS = (TOKENS, POOLED)
#: Token modes that apply to one vector per image (they all return that vector).
POOLED_TOKEN_MODES = ("cls", "mean", "all")

DEFAULT_HOOK = "post_mlp_residual"  # extraction, sweeps and steering when no hook is named
EMBEDDING_HOOK = "post_projection"  # scorer embeddings; a sweep's ``last`` layer

Locator = Callable[[Any, "int | None"], Any]


def block_output(encoder: Any, block: int | None) -> Any:
    """Transformer block ``block`` itself: its output is the residual stream after attention and MLP."""
    return encoder.blocks[block]


def projection_output(encoder: Any, block: int | None) -> Any:
    """The encoder's projection / pooling head (CLIP ``visual_projection``, SigLIP head, DINOv2 layer norm)."""
    return encoder.projection


def block_child(*path: str) -> Locator:
    """A locator for a sub-module of block ``block``, e.g. ``block_child("mlp")`` or ``("layer_norm2",)``."""

    def locate(encoder: Any, block: int | None) -> Any:
        module = encoder.blocks[block]
        for name in path:
            if not hasattr(module, name):
                raise ValueError(
                    f"{encoder.name}: block {block} ({type(module).__name__}) has no sub-module {'.'.join(path)!r}"
                )
            module = getattr(module, name)
        return module

    return locate


@dataclass(frozen=True)
class HookSpec:
    """One hook point: where it sits, what it looks like, who may use it."""

    name: str  # the string stored in manifests and sweep configs
    per_block: bool  # True: one per transformer block, needs a layer; False: global, ``layer=None``
    layout: str  # TOKENS ([B, T, D]) or POOLED ([B, D]) after the encoder normalises its layout
    locate: Locator  # (encoder, 0-based block or None) → module whose first forward output is the hook point
    width: str = "hidden_size"  # encoder attribute giving the activation width
    steerable: bool = False  # steering may clamp an SAE / add a vector here (token layout, per block)
    description: str = ""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"hook {self.name!r}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.steerable and not (self.per_block and self.layout == TOKENS):
            raise ValueError(f"hook {self.name!r}: only per-block hooks with a token layout can be steerable")

    @property
    def token_modes(self) -> tuple[str, ...]:
        """Token modes that apply at this hook (random_k needs a token sequence)."""
        return TOKEN_MODES if self.layout == TOKENS else POOLED_TOKEN_MODES


_BUILT_IN = (
    # The residual stream after block ℓ: what the paper's SAEs read and its steering clamps
    # (Pach et al. 2025, CLIP blocks 11–23 and LLaVA's vision block 22).
    HookSpec(
        "post_mlp_residual",
        per_block=True,
        layout=TOKENS,
        locate=block_output,
        width="hidden_size",
        steerable=True,
        description="output of a transformer block (residual stream after attention and MLP)",
    ),
    # The model's own image embedding (Pach et al. 2025: the "last" layer, and the scorer's embedding).
    HookSpec(
        "post_projection",
        per_block=False,
        layout=POOLED,
        locate=projection_output,
        width="projection_dim",
        steerable=False,
        description="pooled, projected image embedding (CLIP image_embeds, pooler output)",
    ),
)
_TABLE: dict[str, HookSpec] = {spec.name: spec for spec in _BUILT_IN}
HOOKS: tuple[str, ...] = tuple(_TABLE)  # rebound by register_hook / unregister_hook


def specs() -> tuple[HookSpec, ...]:
    """Every hook spec, built-in first, then registered ones in registration order."""
    return tuple(_TABLE.values())


def check_hook(hook: str) -> None:
    """Fail with the valid names when ``hook`` is unknown."""
    if hook not in _TABLE:
        raise ValueError(f"unknown hook {hook!r}; valid hooks: {', '.join(HOOKS)}")


def hook_spec(hook: str) -> HookSpec:
    """The spec of ``hook``, or an error listing the valid names."""
    check_hook(hook)
    return _TABLE[hook]


def block_hooks() -> tuple[str, ...]:
    """Names of the per-block hooks (those that take a layer)."""
    return tuple(s.name for s in _TABLE.values() if s.per_block)


def steerable_hooks() -> tuple[str, ...]:
    """Names of the hooks steering can clamp at."""
    return tuple(s.name for s in _TABLE.values() if s.steerable)


def check_layer(hook: str, layer: int | None) -> HookSpec:
    """A per-block hook needs a layer, a global one takes none; returns the spec."""
    spec = hook_spec(hook)
    if spec.per_block and layer is None:
        raise ValueError(f"hook {hook!r} needs a layer (0-based block index, negative from the end)")
    if not spec.per_block and layer is not None:
        raise ValueError(
            f"hook {hook!r} is global (one per model, after the last block): it takes layer=None, "
            f"got {layer!r}; per-block hooks: {', '.join(block_hooks())}"
        )
    return spec


def check_token_mode(hook: str, tokens: str) -> HookSpec:
    """The token mode must apply to the hook's layout; returns the spec."""
    spec = hook_spec(hook)
    if tokens not in spec.token_modes:
        raise ValueError(f"{hook} has one vector per image: use tokens='cls' (or 'mean'/'all', the same)")
    return spec


def check_steerable(hook: str) -> HookSpec:
    """Steering can clamp at ``hook``, or an error naming the hooks where it can; returns the spec."""
    spec = hook_spec(hook)
    if not spec.steerable:
        raise ValueError(
            f"steering cannot clamp at hook {hook!r} (LLaVA reads a vision block's token outputs); "
            f"valid steering hooks: {', '.join(steerable_hooks())}"
        )
    return spec


def register_hook(spec: HookSpec, *, replace: bool = False) -> HookSpec:
    """Add a hook point to the table (``replace=True`` overwrites a registered one; built-ins are fixed)."""
    global HOOKS
    if spec.name in {s.name for s in _BUILT_IN}:
        raise ValueError(f"hook {spec.name!r} is built in and cannot be replaced")
    if spec.name in _TABLE and not replace:
        raise ValueError(f"hook {spec.name!r} is already registered; pass replace=True to overwrite it")
    _TABLE[spec.name] = spec
    HOOKS = tuple(_TABLE)
    return spec


def unregister_hook(name: str) -> None:
    """Remove a registered hook point (built-ins stay)."""
    global HOOKS
    if name in {s.name for s in _BUILT_IN}:
        raise ValueError(f"hook {name!r} is built in and cannot be removed")
    check_hook(name)
    del _TABLE[name]
    HOOKS = tuple(_TABLE)
