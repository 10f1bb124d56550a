"""Steering's scores (Table 3): concept embeddings of a latent's top images, the CLIP score of an
answer against them, the class-name baseline, and the helpers of chapter 5's experiments."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

# Loading (.llava) and prompting (.generation) live in their own modules; their names stay importable from here.
from .generation import first_word, verbatim_first_word
from .labels import class_text
from .llava import ClipTextImage

__all__ = [
    "class_name_baseline",
    "class_pure_latents",
    "concept_embeddings",
    "latent_concepts",
    "mean_std",
    "names_class",
    "score_answers",
    "steering_scores",
    "sweep_rows",
    "top_class",
]


# ----------------------------------------------------------------------------- steering score


def concept_embeddings(image_embeddings: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    """Mean image embedding of each latent's top images ``[L, k]`` (−1 = absent) → ``[L, E]``: the raw
    (not unit-normalised) CLIP ``image_embeds`` averaged, as the authors; the score's cosine normalises."""
    embeddings = image_embeddings.float()
    present = top_indices >= 0
    if not present.any(dim=1).all():
        raise ValueError("a latent has no top images; it cannot be scored")
    gathered = embeddings[top_indices.clamp(min=0)] * present[..., None]
    return gathered.sum(dim=1) / present.sum(dim=1, keepdim=True)


def steering_scores(text_embeddings: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Cosine between each answer's text embedding and its latent's concept embedding (row-wise)."""
    return torch.nn.functional.cosine_similarity(text_embeddings.float(), concepts.float(), dim=-1)


def class_name_baseline(
    image_embeddings: torch.Tensor, class_text_embeddings: torch.Tensor, labels: Sequence[int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Similarity of each image to its true class name and to a shuffled (other) class name."""
    labels_t = torch.as_tensor(list(labels))
    unit = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    true = (unit * class_text_embeddings[labels_t]).sum(-1)
    generator = torch.Generator().manual_seed(seed)
    shuffled = labels_t[torch.randperm(len(labels_t), generator=generator)]
    clash = shuffled == labels_t
    n_classes = class_text_embeddings.shape[0]
    shuffled[clash] = (
        shuffled[clash] + 1 + torch.randint(0, n_classes - 1, (int(clash.sum()),), generator=generator)
    ) % n_classes
    wrong = (unit * class_text_embeddings[shuffled]).sum(-1)
    return {"true class": true, "shuffled class": wrong}


# ----------------------------------------------------------------------------- experiments of chapter 5


def top_class(top_indices: torch.Tensor, class_names: Sequence[str], latent: int) -> str:
    """The most common class among a latent's top images."""
    return Counter(class_names[i] for i in top_indices[latent].tolist() if i >= 0).most_common(1)[0][0]


def names_class(answer: str, class_name: str) -> bool:
    """Whether the first word of an answer is one of the words of a class (e.g. its shape)."""
    return first_word(answer) in class_text(class_name).lower().split()


def class_pure_latents(top_indices: torch.Tensor, class_names: Sequence[str], n: int) -> list[int]:
    """``n`` latents with a full top-k whose top images agree most on one class (ties: lower id).

    These are concepts a one-word answer can name; a latent for "blue" or "striped" cannot be
    named by the shape the fixture's LLaVA answers with, whatever it encodes.
    """
    full = (top_indices >= 0).all(dim=1)
    if not full.any():
        raise ValueError(f"no latent fires on {top_indices.shape[1]} or more training images; train longer")
    purity = []
    for latent in torch.nonzero(full).flatten().tolist():
        counts = Counter(class_names[i] for i in top_indices[latent].tolist())
        purity.append((-counts.most_common(1)[0][1], latent))
    return [latent for _, latent in sorted(purity)[:n]]


def score_answers(clip: ClipTextImage, answers: Sequence[str], concepts: torch.Tensor) -> torch.Tensor:
    """Steering score of each answer: cosine of its first word's CLIP text embedding with its concept
    (the word verbatim, as the authors; an empty answer embeds the empty text)."""
    words = [verbatim_first_word(a) for a in answers]
    return steering_scores(clip.embed_text(words), concepts)


def sweep_rows(images: Sequence, latents: Sequence[int]) -> tuple[list, list[int], list[int]]:
    """Every (image, latent) combination as batch rows: images, image index, latent."""
    pairs = [(i, latent) for i in range(len(images)) for latent in latents]
    return [images[i] for i, _ in pairs], [i for i, _ in pairs], [latent for _, latent in pairs]


def mean_std(scores: torch.Tensor) -> str:
    """``mean ± std`` with three decimals, as in the paper's tables."""
    return f"{float(scores.mean()):.3f} ± {float(scores.std(unbiased=False)):.3f}"


def latent_concepts(
    clip: ClipTextImage, top_indices: torch.Tensor, latents: Sequence[int], load: Callable[[int], object]
) -> torch.Tensor:
    """Mean CLIP image embedding of each latent's top training images ``[L, E]`` (only those images are embedded)."""
    chosen = top_indices[list(latents)]
    needed = sorted({int(i) for i in chosen.flatten().tolist() if i >= 0})
    if not needed:
        raise ValueError("the chosen latents have no top images")
    embedded = clip.embed_images([load(i) for i in needed], unit=False)
    table = torch.zeros(max(needed) + 1, embedded.shape[1])
    table[needed] = embedded
    return concept_embeddings(table, chosen)
