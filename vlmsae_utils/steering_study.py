"""Stage 5 glue: one steering study as chapter 5 runs it, each step writing its own files.

`prepare` loads LLaVA, the SAE, the latents' concept images and the test images once; the
steps after it (`alpha_sweep`, `score_settings`, `class_name_baselines`, `diffmean_comparison`)
each take that :class:`SteeringStudy`, so the chapter's cells stay short and a sweep reads the
files they write (`STEERING_SCORES_FILE`) under names defined here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from . import defaults, steering
from .data import FLAT_CLASS, ImageFolderDataset, first_image_of_each_class
from .exemplars import TopK
from .extract import open_dataset
from .hooks import DEFAULT_HOOK, check_steerable
from .labels import baseline_text, class_text
from .llava import ClipTextImage, feature_block, load_clip_text_image, load_llava, vision_tower
from .paths import resolve_out_dir
from .sae import BaseSAE
from .scoring import sae_codes, store_image_loader
from .stages import STEERING_SCORES_FILE
from .store import ActivationStore

__all__ = [
    "ALPHA_SWEEP_FILE",
    "CONCEPT_IMAGES",
    "CONCEPT_TOKENS",
    "FIXTURE_STEERING_TOKENS",
    "LATENT_CONCEPTS_FILE",
    "LATENT_NAMES_FILE",
    "PLAIN_ANSWER_FILE",
    "STEERING_SCORES_FILE",
    "WHITE_IMAGE_SIZE",
    "SteeringStudy",
    "all_token_top_images",
    "alpha_sweep",
    "class_name_baselines",
    "diffmean_comparison",
    "evenly_spaced",
    "pick_test_images",
    "prepare",
    "score_setting",
    "score_settings",
    "steering_names",
]

ALPHA_SWEEP_FILE = "alpha_sweep.csv"  # one answer per (image, latent, α)
LATENT_NAMES_FILE = "latent_names.csv"  # each swept latent named by its steered answer (naming.name_by_steering)
LATENT_CONCEPTS_FILE = "latent_concepts.csv"  # the classes of each shown latent's top images
PLAIN_ANSWER_FILE = "plain_answer.txt"  # the unsteered answer on the white image
CONCEPT_IMAGES = 16  # top training images that define a latent's concept (the paper's 16)
#: Which token rows rank a latent's concept images: "all" tokens of each image, CLS included (the
#: authors' mean-pooled pass), or only the rows of the train store ("stored", e.g. 2 random tokens).
CONCEPT_TOKENS = ("all", "stored")
WHITE_IMAGE_SIZE = 336  # LLaVA-1.5's input size: the white image is not resized
FIXTURE_STEERING_TOKENS = 16  # token rows per image of the fixture steering SAE (320 images only)


@dataclass
class SteeringStudy:
    """Everything the steps of chapter 5 share: models, SAE, latents and images."""

    model: torch.nn.Module
    processor: object
    sae: BaseSAE
    layer: int
    hook: str
    train: ActivationStore
    top: TopK  # exemplars.TopK over training images, pooled over each image's token rows
    latents: list[int]  # all scored on the white image
    focus: list[int]  # the first `image_latents` of them: shown, swept, scored on the test images
    units: dict[int, float]  # raw activation units of one α per latent
    clip: ClipTextImage
    concepts: torch.Tensor  # [len(latents), E] mean CLIP embedding of each latent's top images
    test_images: list
    test_classes: list[str]
    white: Image.Image
    out: Path
    load_train: Callable[[int], Image.Image]
    silent: list[int]  # requested latents that never fire on the training images (not scored)

    def concept_of(self, latents: Sequence[int]) -> torch.Tensor:
        """Concept embeddings of the given latents (rows of `concepts`), in their order."""
        return self.concepts[[self.latents.index(j) for j in latents]]

    def describe(self) -> str:
        """One line on what is steered where."""
        text = (
            f"steering block {self.layer} ({self.hook}) with {self.sae.dict_size} latents; "
            f"{len(self.latents)} latents on the white image, latents {self.focus} on the test images"
        )
        if self.silent:
            text += (
                f"; {len(self.silent)} latents never fire on the training images and are not scored: {self.silent[:20]}"
            )
        return text


def evenly_spaced(n_items: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n_items)``, first and last included."""
    if n_items < 1 or count < 1:
        raise ValueError(f"need at least one item and one pick, got {n_items} items and {count} picks")
    count = min(count, n_items)  # never the same item twice
    return [round(i * (n_items - 1) / max(1, count - 1)) for i in range(count)]


def pick_test_images(dataset: ImageFolderDataset, count: int) -> list[int]:
    """The steering test images, as the authors pick them: the first image of each class, ``count`` of
    them spread evenly over the classes (all when ``count`` ≥ the classes: the paper's 1000). A flat
    folder (no class folders) gives ``count`` images spread evenly over it."""
    firsts = first_image_of_each_class(dataset)
    if dataset.classes == [FLAT_CLASS]:
        return evenly_spaced(len(dataset), count)
    return [firsts[i] for i in evenly_spaced(len(firsts), count)]


def _steering_sae(sae_path: str, train: ActivationStore, layer: int) -> BaseSAE:
    """The SAE a parameter names, or a Matryoshka SAE trained on the fixture's token rows of ``layer``."""
    if sae_path:
        return defaults.open_sae(sae_path)
    return defaults.default_sae("matryoshka_batch_top_k", store=train, name=f"tokens{FIXTURE_STEERING_TOKENS}_L{layer}")


def _all_token_means(tower, processor, sae, layer: int, hook: str, images: list, latents: torch.Tensor) -> torch.Tensor:
    """``[len(latents), len(images)]``: each latent's SAE code averaged over every token of each image."""
    hidden = tower.capture(steering.pixel_values(processor, images), hook, layer)  # [B, T, D]
    with torch.inference_mode():
        codes = sae.encode(hidden.reshape(-1, hidden.shape[-1]).to(sae.W_enc.device, torch.float32))
    return codes.view(len(images), hidden.shape[1], -1)[:, :, latents].mean(1).T.float().cpu()


def all_token_top_images(
    model: torch.nn.Module,
    processor,
    sae: BaseSAE,
    layer: int,
    hook: str,
    latents: Sequence[int],
    load: Callable[[int], Image.Image],
    num_images: int,
    shortlist: TopK | None = None,
    top_k: int = CONCEPT_IMAGES,
    batch_size: int = 8,
) -> TopK:
    """Top-``top_k`` images of each of ``latents`` by its SAE code averaged over *all* tokens of an image
    (CLS included), as the authors rank concept images: one streaming pass of LLaVA's tower over
    the ``num_images`` training images (``O(len(latents)·top_k)`` state). With a ``shortlist`` (e.g. each
    latent's top images by the stored rows) only those images pass through the tower and each latent
    ranks only its own. Rows follow ``latents``; ``count_positive`` counts the images ranked > 0."""
    chosen = torch.as_tensor(list(latents), dtype=torch.int64)
    allowed = None if shortlist is None else shortlist.indices[chosen]  # [L, S], −1 = absent
    images = (
        list(range(num_images)) if allowed is None else sorted({int(i) for i in allowed.flatten().tolist() if i >= 0})
    )
    values = torch.full((len(chosen), top_k), float("-inf"))
    indices = torch.full((len(chosen), top_k), -1, dtype=torch.int64)
    count = torch.zeros(len(chosen), dtype=torch.int64)
    tower = vision_tower(model)
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start : start + batch_size], dtype=torch.int64)
        means = _all_token_means(tower, processor, sae, layer, hook, [load(int(i)) for i in batch], chosen)
        if allowed is not None:  # each latent ranks only its own shortlisted images
            means = means.masked_fill(~(allowed[:, :, None] == batch[None, None, :]).any(1), 0.0)
        count += (means > 0).sum(1)
        values, pick = torch.cat([values, means], 1).topk(top_k, dim=1)
        indices = torch.cat([indices, batch.expand(len(chosen), -1)], 1).gather(1, pick)
    absent = ~(values > 0)
    return TopK(values.masked_fill(absent, float("nan")), indices.masked_fill(absent, -1), count)


def _all_token_concepts(model, processor, sae, layer, hook, train, codes, latents, pool: str, shortlist: int) -> TopK:
    """:func:`all_token_top_images` over every training image (``shortlist`` 0, the authors'), or
    over each latent's ``shortlist`` best images by the stored rows."""
    short = None
    if shortlist:
        short = steering.concept_top_images(codes, train.row_image_index(), max(shortlist, CONCEPT_IMAGES), pool=pool)
    load = store_image_loader(train)
    return all_token_top_images(model, processor, sae, layer, hook, latents, load, len(train.image_ids), short)


def _with_rows(top: TopK, latents: Sequence[int], rows: TopK) -> TopK:
    """``top`` with the rows of ``latents`` replaced by ``rows`` (in the order of ``latents``)."""
    chosen = torch.as_tensor(list(latents), dtype=torch.int64)
    values, indices, count = top.values.clone(), top.indices.clone(), top.count_positive.clone()
    values[chosen], indices[chosen], count[chosen] = rows.values, rows.indices, rows.count_positive
    return TopK(values, indices, count)


def _split_silent(latents: Sequence[int], top) -> tuple[list[int], list[int]]:
    """The latents that fire on some training image (they have a concept), and those that never do."""
    return [j for j in latents if int(top.indices[j, 0]) >= 0], [j for j in latents if int(top.indices[j, 0]) < 0]


def _check_concept_settings(hook: str, concept_tokens: str, concept_shortlist: int) -> None:
    """Refuse a hook that cannot be steered and bad concept-image settings before any model loads."""
    check_steerable(hook)
    if concept_tokens not in CONCEPT_TOKENS:
        raise ValueError(f"concept_tokens must be one of {', '.join(CONCEPT_TOKENS)}, got {concept_tokens!r}")
    if not isinstance(concept_shortlist, int) or concept_shortlist < 0:
        raise ValueError(
            f"concept_shortlist must be 0 (every training image) or a positive count, got {concept_shortlist!r}"
        )


def _steering_store(train_store: str, layer: int, hook: str):
    """The SAE's training store (default: the fixture's random tokens at ``layer``), extracted at ``hook``."""
    train = defaults.store_or_default(
        train_store, "train", tokens="random_k", random_k=FIXTURE_STEERING_TOKENS, layer=layer
    )
    trained_at = train.params.get("hook", DEFAULT_HOOK)
    if trained_at != hook:
        raise ValueError(
            f"the SAE's activations come from hook {trained_at!r} but steering clamps at {hook!r}: "
            "give a train_store and SAE extracted at the hook you steer"
        )
    return train


def prepare(
    llava: str,
    *,
    sae_path: str = "",
    train_store: str = "",
    layer: int = 2,
    hook: str = DEFAULT_HOOK,
    latents: Sequence[int] = (),
    image_latents: int = 10,
    alpha_scale: str = "max",
    concept_pool: str = "mean",
    concept_tokens: str = "all",
    concept_shortlist: int = 0,
    clip_text_model: str = "fixture:mini_clip",
    images_dir: str = "",
    num_images: int = 4,
    device: str = "auto",
    model_dtype: str = "auto",
    out_dir: str | os.PathLike = "steer",
) -> SteeringStudy:
    """Load everything chapter 5 needs; empty ``sae_path`` / ``train_store`` / ``images_dir`` / ``latents``
    mean the fixture defaults (an SAE on 16 random tokens per image, its 6 most class-pure latents,
    the fixture's train images). The test images are :func:`pick_test_images` of ``images_dir``.
    ``concept_tokens="all"`` ranks concept images over every token (:func:`all_token_top_images`;
    ``concept_shortlist`` > 0 re-ranks only each latent's best images by the stored rows)."""
    _check_concept_settings(hook, concept_tokens, concept_shortlist)
    model, processor = load_llava(llava, device=device, model_dtype=model_dtype)
    if layer > feature_block(model):
        raise ValueError(f"layer {layer} is after LLaVA's feature block {feature_block(model)}")
    train = _steering_store(train_store, layer, hook)
    sae = _steering_sae(sae_path, train, layer)
    codes = sae_codes(sae, train, device=device)
    top = steering.concept_top_images(codes, train.row_image_index(), CONCEPT_IMAGES, pool=concept_pool)
    chosen = list(latents) or steering.class_pure_latents(top.indices, train.class_names, 6)
    chosen, silent = _split_silent(chosen, top)
    if not chosen:
        raise ValueError(f"none of the latents {list(latents)} fires on the training images: nothing to steer")
    load_train = store_image_loader(train)
    if concept_tokens == "all":  # the authors rank concept images over every token of each image
        top = _with_rows(
            top,
            chosen,
            _all_token_concepts(
                model, processor, sae, layer, hook, train, codes, chosen, concept_pool, concept_shortlist
            ),
        )
    clip = load_clip_text_image(clip_text_model, device=device, model_dtype=model_dtype)
    test_set = open_dataset(images_dir or "fixture", None if images_dir else "train")
    picks = pick_test_images(test_set, num_images)
    out = resolve_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return SteeringStudy(
        model=model,
        processor=processor,
        sae=sae,
        layer=layer,
        hook=hook,
        train=train,
        top=top,
        latents=chosen,
        focus=chosen[:image_latents],
        units=steering.alpha_units(sae, codes, chosen, alpha_scale),
        clip=clip,
        concepts=steering.latent_concepts(clip, top.indices, chosen, load_train),
        test_images=[test_set.load(i) for i in picks],
        test_classes=[test_set[i].class_name for i in picks],
        white=Image.new("RGB", (WHITE_IMAGE_SIZE, WHITE_IMAGE_SIZE), "white"),
        out=out,
        load_train=load_train,
        silent=silent,
    )


def _generate(study: SteeringStudy, images: Sequence, prompt: str, max_new_tokens: int, **steer) -> list[str]:
    """LLaVA's answers on ``images`` (steered when ``steer`` holds clamps or a steering context)."""
    return steering.generate(study.model, study.processor, images, prompt, max_new_tokens, **steer)


def alpha_sweep(
    study: SteeringStudy, alphas: Sequence[float], prompt: str, max_new_tokens: int = 5
) -> tuple[str, pd.DataFrame]:
    """The unsteered answer on the white image and a latent × α table of steered answers, with
    each latent's top class and whether the answer at the largest α names it; writes
    `PLAIN_ANSWER_FILE`, `ALPHA_SWEEP_FILE` and `LATENT_CONCEPTS_FILE`."""
    plain = _generate(study, [study.white], prompt, max_new_tokens)[0]
    sweep = pd.DataFrame(
        steering.latent_sweep(
            study.model,
            study.processor,
            study.sae,
            study.layer,
            [study.white],
            study.focus,
            alphas,
            prompt,
            max_new_tokens,
            alpha_units=study.units,
            hook=study.hook,
        )
    )
    (study.out / PLAIN_ANSWER_FILE).write_text(plain)
    sweep.to_csv(study.out / ALPHA_SWEEP_FILE, index=False)
    names = study.train.class_names
    classes = [" ".join(names[i] for i in study.top.indices[j].tolist() if i >= 0) for j in study.focus]
    pd.DataFrame({"latent": study.focus, "top image classes": classes}).to_csv(
        study.out / LATENT_CONCEPTS_FILE, index=False
    )
    table = sweep.pivot(index="latent", columns="alpha", values="answer")
    top_classes = [steering.top_class(study.top.indices, names, j) for j in table.index]
    table["top class"] = [class_text(c) for c in top_classes]
    table["names it at the largest α"] = [
        steering.names_class(table.loc[j, max(alphas)], c) for j, c in zip(table.index, top_classes)
    ]
    return plain, table


def steering_names(study: SteeringStudy, table: pd.DataFrame, baseline_images: int = 64, seed: int = 0) -> pd.DataFrame:
    """The swept latents named by their answer at the largest α, scored against ``baseline_images``
    random training images; writes `LATENT_NAMES_FILE`."""
    from .naming import name_by_steering, random_images

    alpha = max(c for c in table.columns if isinstance(c, (int, float)))
    tops = {j: [study.load_train(i) for i in study.top.indices[j].tolist() if i >= 0] for j in table.index}
    baseline = random_images(study.load_train, len(study.train.image_ids), baseline_images, seed)
    names = name_by_steering(study.clip, table[alpha].to_dict(), tops, baseline)
    names.to_csv(study.out / LATENT_NAMES_FILE, index=False)
    return names


def score_setting(
    study: SteeringStudy,
    name: str,
    images: Sequence,
    latents: Sequence[int],
    score_alpha: float,
    prompt: str,
    max_new_tokens: int = 5,
) -> tuple[dict, torch.Tensor]:
    """Steering score of every (image, latent) pair, steered at ``score_alpha`` and not steered
    (the paper's Table 3 row ``name``); returns the row and the steered scores."""
    rows, image_of, latent_of = steering.sweep_rows(images, latents)
    concept = study.concept_of(latent_of)
    steered = _generate(
        study,
        rows,
        prompt,
        max_new_tokens,
        sae=study.sae,
        layer=study.layer,
        hook=study.hook,
        clamp=[{j: score_alpha * study.units[j]} for j in latent_of],
    )
    plain = _generate(study, images, prompt, max_new_tokens)
    s = steering.score_answers(study.clip, steered, concept)
    u = steering.score_answers(study.clip, [plain[i] for i in image_of], concept)
    return {
        "setting": name,
        "pairs": len(rows),
        "steered": steering.mean_std(s),
        "not steered": steering.mean_std(u),
    }, s


def score_settings(
    study: SteeringStudy, score_alpha: float, prompt: str, max_new_tokens: int = 5
) -> tuple[pd.DataFrame, torch.Tensor]:
    """Table 3's two settings — the white image × every latent, the test images × the focus
    latents — written to `STEERING_SCORES_FILE`; returns the table and the test images' steered scores."""
    white_row, _ = score_setting(
        study,
        f"white image × {len(study.latents)} latents",
        [study.white],
        study.latents,
        score_alpha,
        prompt,
        max_new_tokens,
    )
    image_row, image_scores = score_setting(
        study,
        f"{len(study.test_images)} images × {len(study.focus)} latents",
        study.test_images,
        study.focus,
        score_alpha,
        prompt,
        max_new_tokens,
    )
    scores = pd.DataFrame([white_row, image_row]).set_index("setting")
    scores.to_csv(study.out / STEERING_SCORES_FILE)
    return scores, image_scores


def class_name_baselines(study: SteeringStudy, names: str = "authors") -> pd.DataFrame | None:
    """CLIP similarity of each test image with its true class name and a shuffled one (the range a
    steering score is read against); None when the test images have fewer than two classes.
    ``names``: the ImageNet names embedded (:func:`~vlmsae_utils.labels.baseline_text`; the authors')."""
    classes = sorted(set(study.test_classes))
    if len(classes) < 2:
        return None
    texts = [baseline_text(c, names) for c in classes]
    base = steering.class_name_baseline(
        study.clip.embed_images(study.test_images),
        study.clip.embed_text(texts),
        [classes.index(c) for c in study.test_classes],
    )
    return pd.DataFrame({k: [steering.mean_std(v)] for k, v in base.items()}, index=["image vs class name"])


def diffmean_comparison(
    study: SteeringStudy,
    image_scores: torch.Tensor,
    score_alpha: float,
    diffmean_scale: float,
    prompt: str,
    max_new_tokens: int = 5,
) -> pd.DataFrame:
    """Steering score of DiffMean vectors built from the same top images, next to the SAE clamp's
    (``image_scores`` from `score_settings`), on the same test images and latents."""
    rows, _, latent_of = steering.sweep_rows(study.test_images, study.focus)
    vectors = steering.diffmean_vectors(
        study.model,
        study.processor,
        study.layer,
        study.top.indices,
        study.focus,
        study.load_train,
        len(study.train.image_ids),
        hook=study.hook,
    )
    per_row = vectors[[study.focus.index(j) for j in latent_of]]
    answers = _generate(
        study,
        rows,
        prompt,
        max_new_tokens,
        steering=lambda: steering.add_vector(study.model, study.layer, per_row, diffmean_scale, hook=study.hook),
    )
    diffmean = steering.score_answers(study.clip, answers, study.concept_of(latent_of))
    return pd.DataFrame(
        {
            "method": [f"SAE clamp α = {score_alpha}", f"DiffMean × {diffmean_scale}"],
            "steering score": [steering.mean_std(image_scores), steering.mean_std(diffmean)],
        }
    ).set_index("method")
