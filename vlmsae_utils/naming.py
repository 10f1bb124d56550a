"""What a latent means: a name from a vocabulary, with a score that says how well it fits.

*Vocabulary* naming embeds each word of a vocabulary with a CLIP text tower and a latent's top
images with the same CLIP's image tower; the name is the word closest to the mean of the unit top-image
embeddings (in direction close to the steering score's concept vector, which averages the raw
embeddings, §7 of the paper), the runner-up the next one. The score is how much closer the name's text embedding lies to the latent's top
images than to random images of the same set: 0 means the name fits any image as well.

The vocabulary is data: the data set's class names plus :func:`attribute_vocabulary` (the 11 basic
colour terms of Berlin & Kay 1969 and the 47 texture words of the Describable Textures Dataset,
Cimpoi et al. 2014), or any list the caller gives.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = [
    "BASIC_COLOURS",
    "DTD_TEXTURES",
    "NAME_COLUMNS",
    "LatentNames",
    "attribute_vocabulary",
    "name_accuracy",
    "name_by_steering",
    "name_by_vocabulary",
    "name_latents",
    "name_top_images",
    "random_images",
    "random_name_accuracy",
]

#: Berlin & Kay (1969), Basic Color Terms: the 11 basic colour terms of English.
BASIC_COLOURS = ("black", "white", "red", "green", "yellow", "blue", "brown", "purple", "pink", "orange", "grey")
#: Cimpoi et al. (2014), Describing Textures in the Wild: the 47 categories of the DTD.
DTD_TEXTURES = [
    "banded",
    "blotchy",
    "braided",
    "bubbly",
    "bumpy",
    "chequered",
    "cobwebbed",
    "cracked",
    "crosshatched",
    "crystalline",
    "dotted",
    "fibrous",
    "flecked",
    "freckled",
    "frilly",
    "gauzy",
    "grid",
    "grooved",
    "honeycombed",
    "interlaced",
    "knitted",
    "lacelike",
    "lined",
    "marbled",
    "matted",
    "meshed",
    "paisley",
    "perforated",
    "pitted",
    "pleated",
    "polka-dotted",
    "porous",
    "potholed",
    "scaly",
    "smeared",
    "spiralled",
    "sprinkled",
    "stained",
    "stratified",
    "striped",
    "studded",
    "swirly",
    "veined",
    "waffled",
    "woven",
    "wrinkled",
    "zigzagged",
]
#: The columns of a names table (one row per latent).
NAME_COLUMNS = ("latent", "label", "score", "method", "runner_up")


def attribute_vocabulary() -> list[str]:
    """Colour and texture words that name what a class list does not (sources in the module text)."""
    return [*BASIC_COLOURS, *DTD_TEXTURES]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _baseline_means(judge, baseline_images: Sequence, text: torch.Tensor) -> torch.Tensor:
    """Mean cosine ``[V]`` of the baseline images with each word: what a name scores on any image."""
    if not baseline_images:
        raise ValueError("baseline_images is empty: the score compares with random images of the same set")
    return (_unit(judge.embed_images(list(baseline_images))) @ text.T).mean(0)


def _fit(tops: torch.Tensor, words: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Scores ``[L]``: mean cosine of each latent's word ``words [L, d]`` with its unit top-image
    embeddings ``tops [L, k, d]``, minus that word's mean cosine with the baseline images (``[L]``)."""
    return torch.einsum("lkd,ld->lk", tops, words).mean(1) - baseline


def _vocabulary_rows(
    latents: Sequence[int], tops: torch.Tensor, words: list[str], text: torch.Tensor, baseline: torch.Tensor
) -> list[dict]:
    """Names of latents with unit top-image embeddings ``tops [L, k, d]``: the word nearest their mean
    embedding, its score (:func:`_fit`) and the runner-up."""
    ranking = (_unit(tops.mean(1)) @ text.T).topk(2, dim=1).indices
    best, second = ranking[:, 0], ranking[:, 1]
    scores = _fit(tops, text[best], baseline[best])
    return [
        {"latent": int(j), "label": words[b], "score": float(v), "method": "vocabulary", "runner_up": words[r]}
        for j, b, r, v in zip(latents, best.tolist(), second.tolist(), scores.tolist())
    ]


def _words_and_text(judge, vocabulary: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct words of ``vocabulary`` (at least two) and their unit text embeddings."""
    words = list(dict.fromkeys(str(w) for w in vocabulary))
    if len(words) < 2:
        raise ValueError(f"the vocabulary needs at least two distinct words, got {words}")
    return words, _unit(judge.embed_text(words))


def random_images(load, count: int, n: int, seed: int = 0) -> list:
    """``n`` of ``count`` images (``load(i)``) drawn without replacement with ``seed``: a score's baseline."""
    picks = np.random.default_rng(seed).choice(count, min(n, count), replace=False)
    return [load(int(i)) for i in picks]


def name_by_vocabulary(
    judge,
    top_images: Sequence[Sequence],
    vocabulary: Sequence[str],
    baseline_images: Sequence,
    latents: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per latent (``NAME_COLUMNS``): the vocabulary word closest to the mean CLIP embedding
    of its top images (``top_images[i]``: PIL images of latent ``latents[i]``), the runner-up, and the
    score ``mean cos(word, top images) − mean cos(word, baseline images)``. ``judge`` embeds texts
    and images (:class:`~.llava.ClipTextImage`)."""
    words, text = _words_and_text(judge, vocabulary)
    latents = list(range(len(top_images))) if latents is None else [int(j) for j in latents]
    if len(latents) != len(top_images):
        raise ValueError(f"{len(latents)} latents but {len(top_images)} lists of top images")
    baseline = _baseline_means(judge, baseline_images, text)
    rows = []
    for latent, images in zip(latents, top_images):
        rows += _vocabulary_rows([latent], _top_embeddings(judge, latent, images)[None], words, text, baseline)
    return pd.DataFrame(rows, columns=list(NAME_COLUMNS))


def _top_embeddings(judge, latent: int, images: Sequence) -> torch.Tensor:
    """Unit CLIP embeddings of a latent's top images (at least one)."""
    if not images:
        raise ValueError(f"latent {latent} has no top images to name it by")
    return _unit(judge.embed_images(list(images)))


def name_by_steering(
    judge, answers: Mapping[int, str], top_images: Mapping[int, Sequence], baseline_images: Sequence
) -> pd.DataFrame:
    """Names from steering (chapter 5): each latent's name is the first word of the MLLM's answer on
    the white image with the latent clamped (§7 of the paper's protocol), scored as the vocabulary
    names are — ``mean cos(word, top images) − mean cos(word, baseline images)``."""
    from .generation import verbatim_first_word

    latents = list(answers)
    words = [verbatim_first_word(answers[j]) for j in latents]
    text = _unit(judge.embed_text(words))
    baseline = _baseline_means(judge, baseline_images, text)
    rows = []
    for i, latent in enumerate(latents):
        tops = _top_embeddings(judge, latent, top_images[latent])[None]
        score = float(_fit(tops, text[i : i + 1], baseline[i : i + 1]))
        rows.append({"latent": latent, "label": words[i], "score": score, "method": "steering", "runner_up": ""})
    return pd.DataFrame(rows, columns=list(NAME_COLUMNS))


def random_name_accuracy(truths: Sequence[set[str]], vocabulary: Sequence[str]) -> float:
    """Expected share of latents whose name is one of their true words when names are drawn uniformly
    from ``vocabulary``: the baseline a naming method must beat."""
    words = set(vocabulary)
    return float(np.mean([len(truth & words) / len(words) for truth in truths])) if truths else float("nan")


@dataclass
class LatentNames:
    """Names of the latents that fire on at least ``top_k`` images, with the top images they were read from."""

    names: pd.DataFrame  # NAME_COLUMNS, one row per named latent
    top_indices: dict[int, list[int]]  # latent → its top image indices in the store
    seconds: float = 0.0  # time the naming took (top images, embeddings, names)

    def summary(self) -> str:
        """One line: how many latents were named from how many distinct images, in how long."""
        distinct = len({i for tops in self.top_indices.values() for i in tops})
        return f"named {len(self.names):,} latents from {distinct:,} distinct top images in {self.seconds:.1f} s"

    def best(self, count: int = 3) -> pd.DataFrame:
        """The ``count`` names with the highest score."""
        return self.names.sort_values("score", ascending=False).head(count)

    def example_image(self) -> int:
        """The top image of the best-named latent (image 0 when nothing was named)."""
        best = self.best(1)
        return self.top_indices[int(best.latent.iloc[0])][0] if len(best) else 0

    def labels(self) -> dict[int, str]:
        """Latent → name."""
        return {int(j): str(label) for j, label in zip(self.names.latent, self.names.label)}


def name_latents(
    sae,
    store,
    judge,
    vocabulary: Sequence[str],
    *,
    top_k: int = 16,
    order: Sequence[int] | None = None,
    limit: int | None = None,
    baseline_images: int = 64,
    seed: int = 0,
    device: str | torch.device | None = "auto",
) -> LatentNames:
    """Vocabulary names of the latents of ``sae`` whose ``top_k``-th activation on ``store`` (one row
    per image) is positive — the latents the paper shows exemplars of (§5) — taken in ``order`` (e.g.
    by MS; default: by index) and at most ``limit`` of them (``None``: all). Each distinct top image
    is embedded once, however many latents share it, and the names are chosen for blocks of latents
    at once, so naming all latents costs about one embedding of the images that are someone's top
    image; the score's baseline is ``baseline_images`` images of the store drawn with ``seed``."""
    from .exemplars import top_k_images
    from .scoring import per_image, sae_codes, store_image_loader

    started = time.perf_counter()
    store = per_image(store)
    top = top_k_images(sae_codes(sae, store, device=device), top_k, device=device)
    candidates = range(sae.dict_size) if order is None else [int(j) for j in order]
    live = [j for j in candidates if float(top.values[j, -1]) > 0][:limit]
    if not live:
        raise ValueError(f"no latent fires on {top_k} images of {store.path}: nothing to name")
    load = store_image_loader(store)
    tops = {j: [int(i) for i in top.indices[j].tolist()] for j in live}
    baseline = random_images(load, len(store.image_ids), baseline_images, seed)
    names = name_top_images(judge, load, tops, vocabulary, baseline)
    return LatentNames(names, tops, time.perf_counter() - started)


def name_top_images(
    judge, load, tops: Mapping[int, Sequence[int]], vocabulary: Sequence[str], baseline_images: Sequence
) -> pd.DataFrame:
    """Vocabulary names (``NAME_COLUMNS``) of latents given by their top image indices
    (``tops[latent]``, the same number each; ``load(i)`` gives image ``i``): every distinct image is
    embedded once and names are chosen for blocks of latents at once."""
    if not tops:
        raise ValueError("no latents to name")
    words, text = _words_and_text(judge, vocabulary)
    baseline = _baseline_means(judge, baseline_images, text)
    latents = [int(j) for j in tops]
    counts = {len(tops[j]) for j in latents}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every latent needs the same positive number of top images, got {sorted(counts)}")
    embedded, row_of = _embed_once(judge, load, tops.values())
    positions = torch.tensor([[row_of[int(i)] for i in tops[j]] for j in latents])
    rows = []
    for start in range(0, len(latents), _LATENT_BLOCK):
        block = slice(start, start + _LATENT_BLOCK)
        rows += _vocabulary_rows(latents[block], embedded[positions[block]], words, text, baseline)
    return pd.DataFrame(rows, columns=list(NAME_COLUMNS))


#: Latents named at once ([block, top_k, d] embeddings: 64 MiB at 16 × 512 in float32).
_LATENT_BLOCK = 2048
#: Images the judge embeds per call.
_EMBED_BATCH = 64


def _embed_once(judge, load, top_lists) -> tuple[torch.Tensor, dict[int, int]]:
    """Unit embeddings ``[U, d]`` of every distinct image index in ``top_lists`` (each embedded once)
    and the row of each index."""
    distinct = sorted({int(i) for indices in top_lists for i in indices})
    parts = [
        _unit(judge.embed_images([load(i) for i in distinct[s : s + _EMBED_BATCH]]))
        for s in range(0, len(distinct), _EMBED_BATCH)
    ]
    return torch.cat(parts), {index: row for row, index in enumerate(distinct)}


def name_accuracy(names: pd.DataFrame, truths: Sequence[set[str]], vocabulary: Sequence[str]) -> dict[str, float]:
    """Share of latents (those with a known truth) whose name is one of their true words, beside the
    same share for names drawn at random from the vocabulary."""
    known = [(label, truth) for label, truth in zip(names["label"], truths) if truth]
    return {
        "latents": float(len(known)),
        "accuracy": float(np.mean([label in truth for label, truth in known])) if known else float("nan"),
        "random names": random_name_accuracy([truth for _, truth in known], vocabulary),
    }
