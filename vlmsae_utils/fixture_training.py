"""Trained fixture models: a mini-CLIP, an independent scorer and a mini-LLaVA.

The random fixture models prove the code runs; these three make the embedded default show the
paper's effects. All are trained on the fixture's train images plus more images drawn by the same
generator on a separate random stream (see :func:`training_images`; never the val images), deterministically
from the fixture seed, on first use, and cached under ``<fixture>/trained/<name>/`` (built in a
temporary folder, then renamed) next to a ``training.json`` with their measured quality:

- ``mini_clip``: transformers ``CLIPModel`` trained contrastively against captions composed from
  the image attributes ("a red striped triangle", "a triangle", "red", ...), with augmentations;
- ``scorer``: transformers ``Dinov2Model`` trained to predict shape family, shape, colour and
  texture (heads dropped at save time): an encoder independent of CLIP for the MS;
- ``mini_llava``: ``LlavaForConditionalGeneration`` whose frozen vision tower is mini_clip's,
  with projector and a small Llama trained to answer one-word questions about the image.

Run ``python -m vlmsae_utils.fixture_training`` to build them and print their metrics.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .fixtures import (CHAT_TEMPLATE, COLOURS, MODEL_IMAGE_SIZE, MODEL_PATCH_SIZE, SHAPE_FAMILIES, TEXTURES,
                       Fixture, FixtureClass, build_tokenizer, fixture_classes)

if TYPE_CHECKING:
    import pandas as pd

TRAINED_MODELS = ("mini_clip", "scorer", "mini_llava")
DEPENDENCIES = {"mini_clip": (), "scorer": (), "mini_llava": ("mini_clip",)}
METRICS_FILE = "training.json"
#: Optimiser steps per model (batch sizes in ``BATCH``); sized for ~5 minutes in all on 2 CPU cores.
STEPS = {"mini_clip": 1600, "scorer": 1000, "mini_llava": 800}
BATCH = {"mini_clip": 64, "scorer": 64, "mini_llava": 32}
SEED_OFFSET = {"mini_clip": 101, "scorer": 202, "mini_llava": 303}
WIDTH = 64
#: Extra generated training images per class (stream ``EXTRA_STREAM``; the fixture uses 0 = train, 1 = val).
EXTRA_PER_CLASS = 100
EXTRA_STREAM = 7
#: Input size of the mini-CLIP (and so of the mini-LLaVA): patch 8 gives a 4 × 4 token grid.
CLIP_IMAGE_SIZE = 32
SHAPE_PROMPT = "What is shown in this image? Use exactly one word!"
#: The mini-LLaVA's tasks: prompt and the attribute (or ``caption``) it must answer.
LLAVA_TASKS = {
    "shape": (SHAPE_PROMPT, "shape"),
    "colour": ("What colour is it? Use exactly one word!", "colour"),
    "texture": ("What texture is it? Use exactly one word!", "texture"),
    "describe": ("Describe the image.", "caption"),
}
LLAVA_TASK_WEIGHTS = {"shape": 0.4, "colour": 0.2, "texture": 0.2, "describe": 0.2}


# ----------------------------------------------------------------------------- attributes and captions


SHAPES = tuple(shape for shapes in SHAPE_FAMILIES.values() for shape in shapes)
FAMILIES = tuple(SHAPE_FAMILIES)
COLOUR_NAMES = tuple(COLOURS)


def attributes(cls: FixtureClass) -> dict[str, str]:
    """Lower-case attribute words of a class: family, shape, colour, texture."""
    return {"family": cls.phylum.lower(), "shape": cls.shape.lower(), "colour": cls.colour.lower(),
            "texture": cls.texture.lower()}


def caption_universe() -> list[tuple[str, dict[str, str]]]:
    """Every caption the mini-CLIP is trained on, with the attributes it asserts.

    Full captions ("a red striped triangle"), partial ones ("a red triangle", "a striped shape",
    "a round shape") and bare words ("triangle", "red"), so single words get meaningful embeddings.
    """
    out: dict[str, dict[str, str]] = {}
    colours = [None] + [c.lower() for c in COLOUR_NAMES]
    textures = [None] + [t.lower() for t in TEXTURES]
    nouns = [("shape", {})] + [(s.lower(), {"shape": s.lower()}) for s in SHAPES] + \
        [(f"{f.lower()} shape", {"family": f.lower()}) for f in FAMILIES]
    for colour in colours:
        for texture in textures:
            for noun, constraint in nouns:
                words = [w for w in (colour, texture) if w] + [noun]
                if words == ["shape"]:
                    continue
                attrs = dict(constraint)
                if colour:
                    attrs["colour"] = colour
                if texture:
                    attrs["texture"] = texture
                out[f"a {' '.join(words)}"] = attrs
    for key in ("shape", "colour", "texture", "family"):
        for cls in fixture_classes():
            word = attributes(cls)[key]
            out[word] = {key: word}
    return sorted(out.items())


def consistent(cls: FixtureClass, attrs: dict[str, str]) -> bool:
    """Whether every attribute a caption asserts holds for ``cls``."""
    own = attributes(cls)
    return all(own[k] == v for k, v in attrs.items())


# ----------------------------------------------------------------------------- data


def load_split(fixture: Fixture, split: str) -> tuple[list, torch.Tensor]:
    """PIL images and class indices of a fixture split, in folder order."""
    from PIL import Image

    root = fixture.images / split
    if not root.is_dir():
        raise FileNotFoundError(f"fixture split {split!r} not found at {root}")
    by_folder = {c.folder: c.index for c in fixture_classes()}
    images, labels = [], []
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
        labels.append(by_folder[path.parent.name])
    return images, torch.tensor(labels)


def training_images(fixture: Fixture, extra_per_class: int | None = None) -> tuple[list, torch.Tensor]:
    """The train split plus ``extra_per_class`` more images per class drawn by the fixture's own
    generator on a separate random stream (never the val images): 20 images per class are too
    few for a ViT to learn shapes that generalise. Deterministic from the fixture seed."""
    import numpy as np

    from .fixtures import draw_image

    extra = EXTRA_PER_CLASS if extra_per_class is None else extra_per_class
    images, labels = load_split(fixture, "train")
    more, more_labels = [], []
    for cls in fixture_classes():
        rng = np.random.default_rng([fixture.seed, EXTRA_STREAM, cls.index])
        more += [draw_image(cls, rng) for _ in range(extra)]
        more_labels += [cls.index] * extra
    return images + more, torch.cat([labels, torch.tensor(more_labels, dtype=labels.dtype)])


def attribute_labels(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image integer labels of family, shape, colour and texture."""
    classes = fixture_classes()
    table = {
        "family": [FAMILIES.index(c.phylum) for c in classes],
        "shape": [SHAPES.index(c.shape) for c in classes],
        "colour": [COLOUR_NAMES.index(c.colour) for c in classes],
        "texture": [TEXTURES.index(c.texture) for c in classes],
    }
    return {k: torch.tensor(v)[labels] for k, v in table.items()}


def augment(pixels: torch.Tensor, generator: torch.Generator, shift: int = 3, jitter: float = 0.08) -> torch.Tensor:
    """Attribute-preserving augmentation of preprocessed images ``[B, 3, H, W]``: flips, 90° rotations,
    small translations (reflect-padded crops) and small per-channel colour noise."""
    batch, _, height, width = pixels.shape
    flips = torch.rand(batch, 2, generator=generator) < 0.5
    turns = torch.randint(0, 4, (batch,), generator=generator)
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator)
    scale = 1 + jitter * torch.randn(batch, 3, 1, 1, generator=generator)
    bias = jitter * torch.randn(batch, 3, 1, 1, generator=generator)
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="reflect")
    out = []
    for i in range(batch):
        y, x = offsets[i].tolist()
        img = padded[i, :, y:y + height, x:x + width]
        if flips[i, 0]:
            img = img.flip(-1)
        if flips[i, 1]:
            img = img.flip(-2)
        out.append(torch.rot90(img, int(turns[i]), dims=(-2, -1)))
    return torch.stack(out) * scale + bias


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches from consecutive seeded permutations (a deterministic data order)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50):
    """Linear warm-up then cosine decay to 10 %."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _training_threads(n: int = 2) -> Iterator[None]:
    """Use at most ``n`` torch threads within the block (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(name: str, steps: int):
    """A tqdm progress bar for one model's training."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"training fixture {name}", unit="step", leave=True)


def _seeded(fixture: Fixture, name: str) -> torch.Generator:
    """Seed torch's global RNG (weight init) and return the data-order generator of one model."""
    seed = fixture.seed * 1000 + SEED_OFFSET[name]
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _fit(name: str, steps: int, num_images: int, generator: torch.Generator, optimizer: torch.optim.Optimizer,
         loss_of: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """The shared training loop: ``steps`` batches of image indices, ``loss_of(index)``, an AdamW step
    with the warm-up/cosine schedule and a progress bar; returns the loss of every step."""
    scheduler = _schedule(optimizer, steps)
    losses = []
    with _progress(name, steps) as bar:
        for index in _batches(num_images, BATCH[name], steps, generator):
            loss = loss_of(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


# ----------------------------------------------------------------------------- mini-CLIP


def clip_tokenizer():
    """The fixture tokenizer, appending ``</s>`` to every text (CLIP pools its text at the EOS token)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
    return tokenizer


def clip_image_processor():
    """CLIP preprocessing at the mini-CLIP's input size (OpenAI mean/std, bicubic resize)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                              crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})


def clip_config(tokenizer):
    """Config of the mini-CLIP: 4-block ViT (width 64, 32 px, patch 8) and a 2-block text tower."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4,
                              num_attention_heads=4, image_size=CLIP_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE,
                              projection_dim=WIDTH)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                          projection_dim=WIDTH, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=WIDTH)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (accepts ModelOutput-style returns)."""
    tensor = x if isinstance(x, torch.Tensor) else x.pooler_output
    return F.normalize(tensor, dim=-1)


def clip_zero_shot(model, processor, images: Sequence, labels: torch.Tensor) -> float:
    """Zero-shot accuracy with the 16 class captions as text prompts."""
    captions = [c.caption for c in fixture_classes()]
    model.eval()
    with torch.no_grad():
        text = _unit(model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True)))
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = _unit(model.get_image_features(pixel_values=pixels))
    return float(((image @ text.T).argmax(dim=1) == labels).float().mean())


def train_mini_clip(fixture: Fixture, out: Path, steps: int | None = None) -> dict:
    """Train the mini-CLIP contrastively (multi-positive InfoNCE over attribute captions); save to ``out``."""
    from transformers import CLIPModel, CLIPProcessor

    steps = STEPS["mini_clip"] if steps is None else steps
    generator = _seeded(fixture, "mini_clip")
    tokenizer = clip_tokenizer()
    processor = CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer)
    model = CLIPModel(clip_config(tokenizer))
    images, labels = training_images(fixture)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    universe = caption_universe()
    tokens = processor(text=[t for t, _ in universe], return_tensors="pt", padding=True)
    classes = fixture_classes()
    match = torch.tensor([[consistent(c, attrs) for _, attrs in universe] for c in classes])  # [16, C]
    # captions asserting more attributes are drawn more often (shape is the hardest attribute to see)
    weight = match.float() * torch.tensor([1.0 + len(attrs) + 2 * ("shape" in attrs) for _, attrs in universe])
    full = torch.tensor([[text for text, _ in universe].index(c.caption) for c in classes])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        cls = labels[index]
        # one caption per image, drawn (weighted) from the captions true of it
        choice = torch.multinomial(weight[cls], 1, generator=generator).squeeze(1)
        positives = match[cls][:, choice].float()  # [B images, B captions]
        image = _unit(model.get_image_features(pixel_values=augment(pixels[index], generator)))
        rows = torch.cat([choice, full])  # the batch's captions, then the 16 class captions
        text = _unit(model.get_text_features(input_ids=tokens["input_ids"][rows],
                                             attention_mask=tokens["attention_mask"][rows]))
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        batch_logits = logits[:, :len(choice)]
        return 0.5 * (_soft_ce(batch_logits, positives) + _soft_ce(batch_logits.T, positives.T)) \
            + F.cross_entropy(logits[:, len(choice):], cls)  # image → its class caption among all 16

    losses = _fit("mini_clip", steps, len(images), generator, optimizer, loss_of)
    val_images, val_labels = load_split(fixture, "val")
    metrics = {"zero_shot_val_accuracy": clip_zero_shot(model, processor, val_images, val_labels),
               "zero_shot_train_accuracy": clip_zero_shot(model, processor, *load_split(fixture, "train")),
               "chance": 1 / len(classes), "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return metrics


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against row-normalised multi-hot targets (all true captions are positives)."""
    return -(targets / targets.sum(dim=1, keepdim=True) * logits.log_softmax(dim=1)).sum(dim=1).mean()


# ----------------------------------------------------------------------------- scorer


def scorer_processor():
    """DINOv2-style preprocessing (ImageNet mean/std) at the fixture model size."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": MODEL_IMAGE_SIZE}, crop_size={"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE},
        do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def attribute_similarity(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity of image pairs by how many of shape, colour, texture they share."""
    unit = F.normalize(embeddings.float(), dim=-1)
    sim = unit @ unit.T
    attrs = attribute_labels(labels)
    shared = sum((attrs[k][:, None] == attrs[k][None, :]).int() for k in ("shape", "colour", "texture"))
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    out = {f"shared_{n}": float(sim[(shared == n) & off_diagonal].mean()) for n in range(4)}
    out["gap_same_vs_none"] = out["shared_3"] - out["shared_0"]
    return out


def train_scorer(fixture: Fixture, out: Path, steps: int | None = None) -> dict:
    """Train a DINOv2-layout encoder to predict family, shape, colour and texture; save it without heads."""
    from transformers import Dinov2Config, Dinov2Model

    steps = STEPS["scorer"] if steps is None else steps
    generator = _seeded(fixture, "scorer")
    config = Dinov2Config(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=3, num_attention_heads=4,
                          image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE)
    model = Dinov2Model(config)
    sizes = {"family": len(FAMILIES), "shape": len(SHAPES), "colour": len(COLOUR_NAMES), "texture": len(TEXTURES)}
    heads = nn.ModuleDict({k: nn.Linear(WIDTH, n) for k, n in sizes.items()})
    processor = scorer_processor()
    images, labels = training_images(fixture)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    targets = attribute_labels(labels)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    model.train()

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        pooled = model(pixel_values=augment(pixels[index], generator)).pooler_output
        return sum(F.cross_entropy(head(pooled), targets[k][index]) for k, head in heads.items())

    losses = _fit("scorer", steps, len(images), generator, optimizer, loss_of)
    model.eval()
    val_images, val_labels = load_split(fixture, "val")
    with torch.no_grad():
        pooled = model(pixel_values=processor(images=val_images, return_tensors="pt")["pixel_values"]).pooler_output
        val_targets = attribute_labels(val_labels)
        accuracy = {f"val_accuracy_{k}": float((head(pooled).argmax(1) == val_targets[k]).float().mean())
                    for k, head in heads.items()}
    metrics = {"similarity_by_shared_attributes": attribute_similarity(pooled, val_labels), **accuracy,
               "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return metrics


# ----------------------------------------------------------------------------- mini-LLaVA


def llava_answer(cls: FixtureClass, task: str) -> str:
    """The word (or caption) the mini-LLaVA must answer for ``task`` on an image of ``cls``."""
    key = LLAVA_TASKS[task][1]
    return cls.caption if key == "caption" else attributes(cls)[key]


def llava_processor():
    """LLaVA processor with the fixture tokenizer and chat template, as ``fixtures.write_llava`` builds it."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=clip_image_processor(), tokenizer=build_tokenizer(),
                          patch_size=MODEL_PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def _llava_model(clip_dir: Path, tokenizer):
    """A LLaVA with mini_clip's vision tower (frozen, feature layer -2), a fresh projector and a small Llama."""
    from transformers import CLIPConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision_config = CLIPConfig.from_pretrained(clip_dir).vision_config
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    clip_vision = CLIPVisionModel.from_pretrained(clip_dir)
    model.model.vision_tower.load_state_dict(clip_vision.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def _task_sequences(processor, image) -> dict[str, tuple[list[int], dict[int, list[int]]]]:
    """Per task: the expanded prompt ids (image tokens included) and each class's answer ids + EOS."""
    from .steering import chat_prompt

    tokenizer = processor.tokenizer
    out = {}
    for task, (prompt, _) in LLAVA_TASKS.items():
        ids = processor(images=[image], text=[chat_prompt(processor, prompt)], return_tensors="pt")["input_ids"][0]
        answers = {c.index: tokenizer(llava_answer(c, task), add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id] for c in fixture_classes()}
        out[task] = (ids.tolist(), answers)
    return out


def _llava_batch(sequences, classes: torch.Tensor, tasks: list[str], pad_id: int):
    """Right-padded input ids, attention mask and labels (−100 except on answer tokens)."""
    rows, targets = [], []
    for cls, task in zip(classes.tolist(), tasks):
        prompt, answers = sequences[task]
        rows.append(prompt + answers[cls])
        targets.append([-100] * len(prompt) + answers[cls])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(target)
        mask[i, :len(row)] = 1
    return ids, mask, labels


def llava_accuracy(model, processor, images: Sequence, labels: torch.Tensor, task: str = "shape",
                   batch_size: int = 64) -> float:
    """Share of images whose greedy one-word answer (first word) is the right one for ``task``."""
    from .steering import first_word, generate

    prompt = LLAVA_TASKS[task][0]
    classes = fixture_classes()
    hits = 0
    for start in range(0, len(images), batch_size):
        answers = generate(model, processor, list(images[start:start + batch_size]), prompt, max_new_tokens=6)
        expected = [llava_answer(classes[int(c)], task) for c in labels[start:start + batch_size]]
        if task == "describe":
            hits += sum(a.strip(" .").lower() == e for a, e in zip(answers, expected))
        else:
            hits += sum(first_word(a) == e for a, e in zip(answers, expected))
    return hits / len(images)


def train_mini_llava(fixture: Fixture, out: Path, steps: int | None = None, clip_dir: Path | None = None) -> dict:
    """Train projector + Llama of a mini-LLaVA on the fixture tasks (frozen mini_clip tower); save to ``out``."""
    steps = STEPS["mini_llava"] if steps is None else steps
    clip_dir = ensure_trained(fixture, "mini_clip") if clip_dir is None else clip_dir
    generator = _seeded(fixture, "mini_llava")
    processor = llava_processor()
    tokenizer = processor.tokenizer
    model = _llava_model(clip_dir, tokenizer)
    images, labels = training_images(fixture)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    sequences = _task_sequences(processor, images[0])
    task_names = list(LLAVA_TASK_WEIGHTS)
    weights = torch.tensor([LLAVA_TASK_WEIGHTS[t] for t in task_names])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    model.train()
    model.model.vision_tower.eval()

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        tasks = [task_names[i] for i in torch.multinomial(weights, len(index), True, generator=generator)]
        ids, mask, target = _llava_batch(sequences, labels[index], tasks, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=augment(pixels[index], generator)).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=-100)

    losses = _fit("mini_llava", steps, len(images), generator, optimizer, loss_of)
    model.eval()
    val_images, val_labels = load_split(fixture, "val")
    metrics = {f"val_accuracy_{task}": llava_accuracy(model, processor, val_images, val_labels, task)
               for task in LLAVA_TASKS}
    metrics["one_word_val_accuracy"] = metrics["val_accuracy_shape"]
    metrics["prompts"] = {task: prompt for task, (prompt, _) in LLAVA_TASKS.items()}
    metrics["final_loss"] = sum(losses[-20:]) / max(1, len(losses[-20:]))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return metrics


# ----------------------------------------------------------------------------- build and cache


TRAINERS = {"mini_clip": train_mini_clip, "scorer": train_scorer, "mini_llava": train_mini_llava}


def trained_dir(fixture: Fixture, name: str) -> Path:
    """Cache folder of a trained fixture model (it may not exist yet)."""
    if name not in TRAINED_MODELS:
        raise ValueError(f"unknown trained fixture model {name!r}; available: {', '.join(TRAINED_MODELS)}")
    return fixture.root / "trained" / name


def train_model(fixture: Fixture, name: str, out: Path, steps: int | None = None) -> dict:
    """Train one model into the (empty or new) folder ``out`` and write its ``training.json``; returns it."""
    from transformers.utils import logging as hf_logging

    if name not in TRAINERS:
        raise ValueError(f"unknown trained fixture model {name!r}; available: {', '.join(TRAINED_MODELS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    try:
        with _training_threads(2):
            metrics = TRAINERS[name](fixture, out, steps)
    finally:
        hf_logging.set_verbosity(verbosity)
    metrics = {"model": name, "seed": fixture.seed, "steps": STEPS[name] if steps is None else steps,
               "batch_size": BATCH[name], "train_seconds": round(time.perf_counter() - start, 2), **metrics}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def ensure_trained(fixture: Fixture, name: str) -> Path:
    """Folder of trained model ``name``, training it (and what it builds on) once, atomically, when missing."""
    final = trained_dir(fixture, name)
    if (final / METRICS_FILE).is_file():
        return final
    for dependency in DEPENDENCIES[name]:
        ensure_trained(fixture, dependency)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an interrupted earlier build
        shutil.rmtree(final, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        metrics = train_model(fixture, name, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as the fixture
        os.replace(staging, final)
        print(f"trained fixture {name} in {metrics['train_seconds']:.0f} s: {_summary(metrics)}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / METRICS_FILE).is_file():
            raise
    return final


def _summary(metrics: dict) -> str:
    """One line of the headline numbers of a training.json."""
    if metrics["model"] == "mini_clip":
        return f"zero-shot val accuracy {metrics['zero_shot_val_accuracy']:.3f} (chance {metrics['chance']:.3f})"
    if metrics["model"] == "scorer":
        sim = metrics["similarity_by_shared_attributes"]
        return (f"cosine same class {sim['shared_3']:.3f} vs no shared attribute {sim['shared_0']:.3f} "
                f"(gap {sim['gap_same_vs_none']:.3f})")
    return (f"one-word val accuracy {metrics['one_word_val_accuracy']:.3f}, colour "
            f"{metrics['val_accuracy_colour']:.3f}, describe {metrics['val_accuracy_describe']:.3f}")


def training_metrics(fixture: Fixture, name: str) -> dict:
    """The ``training.json`` of a trained fixture model (training it when missing)."""
    return json.loads((ensure_trained(fixture, name) / METRICS_FILE).read_text())


def summary_table(fixture: Fixture) -> "pd.DataFrame":
    """One row per trained fixture model: training steps, seconds and the headline val numbers."""
    import pandas as pd

    rows = []
    for name in TRAINED_MODELS:
        metrics = training_metrics(fixture, name)
        rows.append({"model": f"fixture:{name}", "steps": metrics["steps"],
                     "training seconds": round(metrics["train_seconds"]), "measured on val": _summary(metrics)})
    return pd.DataFrame(rows).set_index("model")


def ensure_all(fixture: Fixture | None = None) -> dict[str, Path]:
    """Train (once) every trained fixture model; returns their folders."""
    from .fixtures import ensure_fixture

    fixture = ensure_fixture() if fixture is None else fixture
    return {name: ensure_trained(fixture, name) for name in TRAINED_MODELS}


def main() -> None:
    """``python -m vlmsae_utils.fixture_training [--seed N]``: train (once) and print the metrics."""
    import argparse

    from .fixtures import ensure_fixture

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fixture = ensure_fixture(args.seed)
    for name, path in ensure_all(fixture).items():
        print(f"{name}: {path}\n  {_summary(training_metrics(fixture, name))}")


if __name__ == "__main__":
    main()
