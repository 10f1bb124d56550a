"""One vision encoder behind one interface (:class:`VisionEncoder`): preprocess, capture activations
at a hook point (the forward pass stops right after the captured block), embed, and splice a
function into a hook point (how SAEs enter a model); with the token selections of the stores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from . import hooks
from .hooks import TOKEN_MODES, hook_spec

__all__ = [
    "VisionEncoder",
    "check_tokens",
    "select_tokens",
]


class _StopForward(Exception):
    """Raised by a capture hook to skip the rest of the forward pass."""


@dataclass
class VisionEncoder:
    """A frozen vision encoder with the hook points of :mod:`.hooks` (``post_mlp_residual`` per block,
    ``post_projection``, and any registered ones)."""

    name: str
    family: str
    model: nn.Module
    processor: Callable
    blocks: nn.ModuleList
    projection: nn.Module
    has_cls_token: bool
    hidden_size: int
    projection_dim: int
    sequence_first: bool = False  # open_clip models built with batch_first=False
    take_first_token_of_projection: bool = False  # DINOv2, ViT: pooler = layernorm(seq)[:, 0]
    preprocessing: str = ""  # transformers image-processor backend ("pil", "torchvision"); "" for open_clip

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def hook_points(self) -> tuple[str, ...]:
        """Names of the hook points this encoder offers."""
        return hooks.HOOKS

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the model parameters (pixels are cast to it)."""
        return next(self.model.parameters()).dtype

    def output_dim(self, hook: str) -> int:
        """Width of the activations at ``hook``."""
        return int(getattr(self, hook_spec(hook).width))

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images → pixel tensor ``[B, 3, H, W]`` on the model's device and in its precision."""
        return self.to_model(self.preprocess_cpu(images))

    def preprocess_cpu(self, images: Sequence) -> torch.Tensor:
        """PIL images → float32 pixel tensor on the CPU (what DataLoader workers run)."""
        if not images:
            raise ValueError("preprocess() needs at least one image")
        return self.processor(list(images))

    def to_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels moved to the model's device (asynchronously from pinned memory) and precision."""
        return pixel_values.to(self.device, self.dtype, non_blocking=True)

    def block_index(self, layer: int | None) -> int:
        """0-based block index; negative counts from the end, like Python lists (``None`` is refused)."""
        if not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer!r} is out of range for {self.name}: it has {self.num_layers} blocks, "
                f"valid layers are 0..{self.num_layers - 1} or -{self.num_layers}..-1"
            )
        return layer % self.num_layers

    def hook_module(self, hook: str, layer: int | None) -> nn.Module:
        """The module whose output is the hook point (a per-block hook needs ``layer``, a global one ``None``)."""
        spec = hooks.check_layer(hook, layer)
        return spec.locate(self, self.block_index(layer) if spec.per_block else None)

    def _run(self, pixel_values: torch.Tensor) -> None:
        """Full forward pass of the vision model (outputs are taken by hooks)."""
        if self.family == "open_clip":
            encode_image = cast(Callable, self.model.encode_image)  # open_clip's CLIP; nn.Module to the checker
            encode_image(pixel_values)
        else:
            self.model(pixel_values=pixel_values)

    def capture(self, pixel_values: torch.Tensor, hook: str, layer: int | None = None) -> torch.Tensor:
        """Raw output of a hook point: ``[B, T, D]`` for blocks, ``[B, D]`` after the projection."""
        module = self.hook_module(hook, layer)
        captured: list[torch.Tensor] = []

        def grab(_module, _inputs, output):
            captured.append(_first(output))
            raise _StopForward

        handle = module.register_forward_hook(grab)
        try:
            with torch.inference_mode():
                self._run(self.to_model(pixel_values))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"hook {hook} of {self.name} was never reached in the forward pass")
        return self._normalise_layout(captured[0], hook)

    def _normalise_layout(self, output: torch.Tensor, hook: str) -> torch.Tensor:
        """Bring a captured output to its spec's layout: ``[B, T, D]`` (tokens) or ``[B, D]`` (pooled)."""
        if hook_spec(hook).layout == hooks.TOKENS:
            return output.transpose(0, 1) if self.sequence_first else output
        return output[:, 0] if self.take_first_token_of_projection and output.ndim == 3 else output

    def activations(
        self,
        pixel_values: torch.Tensor,
        hook: str,
        layer: int | None = None,
        tokens: str = "cls",
        random_k: int = 2,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Activations at a hook point with token selection; rows are image-major ``[B*r, D]``."""
        check_tokens(tokens, random_k)
        spec = hooks.check_token_mode(hook, tokens)
        if spec.layout == hooks.TOKENS and tokens == "cls" and not self.has_cls_token:
            raise ValueError(
                f"{self.name} has no CLS token: use tokens='mean' or 'random_k' (the paper uses 2 random tokens)"
            )
        out = self.capture(pixel_values, hook, layer)
        return out if spec.layout == hooks.POOLED else select_tokens(out, tokens, random_k, generator)

    def rows_per_image(self, hook: str, tokens: str, random_k: int = 2, num_tokens: int | None = None) -> int:
        """How many activation rows one image yields for this hook and token mode."""
        check_tokens(tokens, random_k)
        if hook_spec(hook).layout == hooks.POOLED or tokens in ("cls", "mean"):
            return 1
        if tokens == "random_k":
            return random_k
        if num_tokens is None:
            raise ValueError("tokens='all' needs the sequence length (num_tokens)")
        return num_tokens

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scoring embedding: CLIP ``image_embeds``, DINOv2/SigLIP ``pooler_output``, open_clip ``encode_image``."""
        return self.capture(pixel_values, hooks.EMBEDDING_HOOK)

    @contextlib.contextmanager
    def splice(self, hook: str, layer: int | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the hook point's output (``[B, T, D]`` or ``[B, D]``) is replaced by ``fn(output)``."""
        module = self.hook_module(hook, layer)
        handle = module.register_forward_hook(self._splice_hook(hook, fn), prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def _splice_hook(self, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """A forward hook that swaps the first output for ``fn`` of it, in the module's own layout."""
        transpose = hook_spec(hook).layout == hooks.TOKENS and self.sequence_first

        def replace(_module, _inputs, output):
            value = _first(output)
            new = fn(value.transpose(0, 1)) if transpose else fn(value)
            new = new.transpose(0, 1) if transpose else new
            if new.shape != value.shape:
                raise ValueError(f"spliced function changed the shape {tuple(value.shape)} → {tuple(new.shape)}")
            return (new, *tuple(output[1:])) if isinstance(output, tuple) else new

        return replace


def _first(output) -> torch.Tensor:
    """Hidden states of a module output that may be a tensor, a tuple or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]  # transformers ModelOutput supports indexing


def check_tokens(tokens: str, random_k: int = 2) -> None:
    """Fail with the valid names when ``tokens`` is unknown or ``random_k`` < 1."""
    if tokens not in TOKEN_MODES:
        raise ValueError(f"unknown token mode {tokens!r}; valid modes: {', '.join(TOKEN_MODES)}")
    if tokens == "random_k" and (not isinstance(random_k, int) or random_k < 1):
        raise ValueError(f"random_k must be an integer >= 1, got {random_k!r}")


def select_tokens(
    hidden: torch.Tensor, tokens: str, random_k: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Token selection on ``[B, T, D]``: CLS (token 0), mean over all tokens, k random tokens
    per image drawn with replacement, or every token; returns image-major rows ``[B*r, D]``."""
    check_tokens(tokens, random_k)
    batch, length, dim = hidden.shape
    if tokens == "cls":
        return hidden[:, 0]
    if tokens == "mean":
        return hidden.mean(dim=1)
    if tokens == "all":
        return hidden.reshape(batch * length, dim)
    index = torch.randint(0, length, (batch, random_k), generator=generator, device="cpu").to(hidden.device)
    return torch.gather(hidden, 1, index[..., None].expand(-1, -1, dim)).reshape(batch * random_k, dim)
