"""Prompting and greedy generation with a transformers LLaVA model and its processor.

No loading and no steering here (:mod:`.llava` loads the models, :mod:`.steering` changes the vision
tower), and no import of the rest of the package: the fixture's mini-LLaVA trainer uses these too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

__all__ = [
    "DEFAULT_PROMPT",
    "chat_prompt",
    "first_word",
    "generate",
    "pixel_values",
    "prepare_inputs",
    "verbatim_first_word",
]

DEFAULT_PROMPT = "What is shown in this image? Use exactly one word!"


def chat_prompt(processor, prompt: str) -> str:
    """The model's chat template around one image and the user's prompt."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def prepare_inputs(processor, images: Sequence, prompt: str):
    """Left-padded processor inputs for batched generation."""
    processor.tokenizer.padding_side = "left"
    text = chat_prompt(processor, prompt)
    return processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True)


def pixel_values(processor, images: Sequence) -> torch.Tensor:
    """LLaVA's own image preprocessing of a list of PIL images."""
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def generate(
    model: nn.Module,
    processor,
    images: Sequence,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 5,
    *,
    steering: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[str]:
    """Greedy answers for a batch of images; ``steering`` builds a context entered around the
    generation (e.g. an SAE clamp or a DiffMean shift, :mod:`.steering`)."""
    if not images:
        return []
    inputs = prepare_inputs(processor, images, prompt).to(model.device)
    context = steering() if steering is not None else contextlib.nullcontext()
    with context, torch.inference_mode():
        output = cast(Callable, model.generate)(  # a transformers generator (nn.Module to the checker)
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def verbatim_first_word(answer: str) -> str:
    """The answer up to its first space, punctuation and case kept: what the authors embed for the
    steering score (``answer.split(" ")[0]``)."""
    return answer.split(" ")[0]


def first_word(answer: str) -> str:
    """First word of an answer, lower-case, without punctuation: for matching an answer to a class
    name (the steering score embeds :func:`verbatim_first_word` instead, as the authors)."""
    for token in answer.replace("\n", " ").split():
        word = token.strip(".,;:!?\"'()[]").lower()
        if word:
            return word
    return ""
