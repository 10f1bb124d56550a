"""The embedded default: a generated image set with a known taxonomy and tiny models on disk.

Everything here is deterministic from a seed, cached under the data home
(:func:`vlmsae_utils.paths.data_home`) and rebuilt when missing. The models are
randomly initialised but written in their native formats, so the notebooks load them
through exactly the same public loaders (``from_pretrained``, open_clip ``local-dir:``)
as real hub checkpoints. Run ``python -m vlmsae_utils.fixtures`` to build it.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .paths import data_home

FIXTURE_VERSION = "v1"
IMAGE_SIZE = 64
TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 8
MODEL_IMAGE_SIZE = 32
MODEL_PATCH_SIZE = 8

# The taxonomy: Kingdom > Phylum (shape family) > Class (shape) > Order (colour) >
# Family (texture) > Genus/species (unique per leaf). Four informative ranks.
SHAPE_FAMILIES = {"Angular": ("Triangle", "Square"), "Round": ("Circle", "Ring")}
COLOURS = {"Red": (205, 45, 40), "Blue": (40, 80, 205)}
TEXTURES = ("Plain", "Striped")
KINGDOM = "Figura"
RANK_NAMES = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


@dataclass(frozen=True)
class FixtureClass:
    """One leaf of the fixture taxonomy."""

    index: int
    phylum: str
    shape: str
    colour: str
    texture: str

    @property
    def taxonomy(self) -> tuple[str, ...]:
        """The seven ranks, iNaturalist style."""
        genus = f"{self.shape}{self.colour}{self.texture}"
        return (KINGDOM, self.phylum, self.shape, self.colour, self.texture, genus, "vulgaris")

    @property
    def folder(self) -> str:
        """Folder name following ``NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_species``."""
        return "_".join((f"{self.index:05d}",) + self.taxonomy)

    @property
    def caption(self) -> str:
        """Plain-English description, e.g. ``a red striped triangle``."""
        return f"a {self.colour.lower()} {self.texture.lower()} {self.shape.lower()}"


def fixture_classes() -> list[FixtureClass]:
    """All 16 leaf classes in folder order."""
    leaves = [
        (phylum, shape, colour, texture)
        for phylum, shapes in SHAPE_FAMILIES.items()
        for shape, colour, texture in itertools.product(shapes, COLOURS, TEXTURES)
    ]
    return [FixtureClass(i, *leaf) for i, leaf in enumerate(leaves)]


# ----------------------------------------------------------------------------- images


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased mask in [0, 1] of one randomly placed, scaled and rotated shape."""
    scale = 4  # supersampling factor
    big = size * scale
    radius = rng.uniform(0.22, 0.36) * big
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("Triangle", "Square"):
        n = 3 if shape == "Triangle" else 4
        angles = angle + 2 * np.pi * np.arange(n) / n
        draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=255)
    else:
        rx, ry = radius, radius * rng.uniform(0.8, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if shape == "Ring":
            inner = rng.uniform(0.45, 0.6)
            draw.ellipse([cx - rx * inner, cy - ry * inner, cx + rx * inner, cy + ry * inner], fill=0)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripe pattern in {0.45, 1}: dark bands at a random angle, period and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(5.0, 8.0)
    phase = rng.uniform(0, period)
    coord = xx * np.cos(theta) + yy * np.sin(theta) + phase
    return np.where((coord % period) < period / 2, 0.45, 1.0).astype(np.float32)


def draw_image(cls: FixtureClass, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One image of ``cls`` with natural variation: position, scale, rotation, background, noise."""
    background = rng.uniform(150, 245) + rng.normal(0, 12, size=3)
    gradient = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None] * rng.normal(0, 15, size=3)
    image = np.broadcast_to(background, (size, size, 3)) + gradient
    colour = np.clip(np.array(COLOURS[cls.colour]) + rng.normal(0, 18, size=3), 0, 255)
    mask = _shape_mask(cls.shape, size, rng)[..., None]
    fill = colour * (_stripes(size, rng)[..., None] if cls.texture == "Striped" else 1.0)
    image = image * (1 - mask) + fill * mask
    image = image + rng.normal(0, 6, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), mode="RGB")


def write_images(root: Path, seed: int, *, size: int = IMAGE_SIZE, train_per_class: int = TRAIN_PER_CLASS,
                 val_per_class: int = VAL_PER_CLASS, suffix: str = ".png") -> dict[str, int]:
    """Write ``train/`` and ``val/`` ImageFolder trees (PNG, or JPEG at quality 90); returns image counts per split."""
    options = {"optimize": False} if suffix == ".png" else {"quality": 90}
    counts = {}
    for split, per_class, offset in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for cls in fixture_classes():
            folder = root / split / cls.folder
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, offset, cls.index])
            for i in range(per_class):
                draw_image(cls, rng, size).save(folder / f"{split}_{cls.index:02d}_{i:03d}{suffix}", **options)
        counts[split] = per_class * len(fixture_classes())
    return counts


# ----------------------------------------------------------------------------- tokenizer


def fixture_vocabulary() -> list[str]:
    """Words the fixture tokenizer knows: captions, class words, prompts."""
    words = {"a", "an", "the", "of", "photo", "image", "this", "in", "is", "what", "shown", "use",
             "exactly", "one", "word", "!", "?", ".", ",", ":", "user", "assistant", "describe",
             "which", "colour", "color", "shape", "texture", "it", "and", "with", "small", "large"}
    for cls in fixture_classes():
        words.update(part.lower() for part in cls.taxonomy[:5])
    return sorted(words)


SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A word-level fast tokenizer built locally (no download), with a chat template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(fixture_vocabulary()))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", behavior="isolated"), pre_tokenizers.Whitespace()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"], model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- models


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE, projection_dim=16,
    )


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": MODEL_IMAGE_SIZE},
        crop_size={"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE},
    )


def write_clip(path: Path) -> None:
    """Tiny transformers ``CLIPModel`` (vision + text towers) with processor and tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

    tokenizer = build_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, projection_dim=16,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=_clip_vision_config().to_dict(),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(path)


def write_siglip(path: Path) -> None:
    """Tiny transformers ``SiglipVisionModel`` (no CLS token, attention-pool head)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE,
    )
    SiglipVisionModel(config).save_pretrained(path)
    size = {"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE}
    SiglipImageProcessor(size=size).save_pretrained(path)


def write_dinov2(path: Path) -> None:
    """Tiny transformers ``Dinov2Model``: the default scoring encoder (pooler output)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE,
    )
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": MODEL_IMAGE_SIZE},
        crop_size={"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE},
        do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


OPEN_CLIP_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": MODEL_IMAGE_SIZE, "layers": 3, "width": 32,
                   "patch_size": MODEL_PATCH_SIZE, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_open_clip(path: Path) -> None:
    """Tiny open_clip model: registered from a JSON config, saved in the ``local-dir:`` format."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config_dir = path / "model_configs"
    config_dir.mkdir(parents=True)
    (config_dir / "vlmsae-tiny-vit.json").write_text(json.dumps(OPEN_CLIP_MODEL_CFG, indent=2))
    open_clip.add_model_config(config_dir)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # open_clip warns that a model without weights is random: intended
    try:
        model = open_clip.create_model("vlmsae-tiny-vit", pretrained=None)
    finally:
        root_logger.setLevel(level)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(state, str(path / "open_clip_model.safetensors"))
    preprocess = {"size": MODEL_IMAGE_SIZE, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                  "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_MODEL_CFG, "preprocess_cfg": preprocess}, indent=2)
    )


def write_llava(path: Path) -> None:
    """Tiny ``LlavaForConditionalGeneration`` whose vision tower is the fixture CLIP's vision model
    (as LLaVA-1.5's tower is CLIP ViT-L/14-336), with a local tokenizer and chat template."""
    from transformers import (CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = build_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config().to_dict(), text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    clip_vision = CLIPVisionModel.from_pretrained(path.parent / "clip")  # written first
    model.model.vision_tower.load_state_dict(clip_vision.state_dict())
    model.save_pretrained(path)
    LlavaProcessor(
        image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=MODEL_PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)


def write_aimv2(path: Path) -> None:
    """Tiny transformers ``Aimv2VisionModel`` (AIMv2: no CLS token, RMSNorm, attention-pool head)."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    config = Aimv2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE,
    )
    Aimv2VisionModel(config).save_pretrained(path)
    _clip_image_processor().save_pretrained(path)


def write_webssl(path: Path) -> None:
    """Tiny transformers ``ViTModel`` in the layout of Web-SSL MAE checkpoints (CLS token, no pooler)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    size = {"height": MODEL_IMAGE_SIZE, "width": MODEL_IMAGE_SIZE}
    ViTImageProcessor(size=size).save_pretrained(path)


MODEL_WRITERS = {  # order matters: LLaVA reuses the CLIP vision weights; the seed of each is its position
    "clip": write_clip,
    "siglip": write_siglip,
    "dinov2": write_dinov2,
    "open_clip": write_open_clip,
    "llava": write_llava,
    "aimv2": write_aimv2,
    "webssl": write_webssl,
}


# ----------------------------------------------------------------------------- the fixture


@dataclass(frozen=True)
class Fixture:
    """Paths of a built fixture."""

    root: Path
    seed: int

    @property
    def images(self) -> Path:
        """ImageFolder root with ``train/`` and ``val/``."""
        return self.root / "images"

    def model(self, name: str) -> Path:
        """Folder of one fixture model: random clip, siglip, dinov2, open_clip, llava, or trained
        mini_clip, scorer, mini_llava (trained once on first use, see :mod:`.fixture_training`)."""
        from .fixture_training import TRAINED_MODELS, ensure_trained

        if name in TRAINED_MODELS:
            return ensure_trained(self, name)
        if name not in MODEL_WRITERS:
            raise ValueError(f"unknown fixture model {name!r}; available: {sorted(MODEL_WRITERS) + list(TRAINED_MODELS)}")
        folder = self.root / "models" / name
        if not folder.is_dir():  # a model added to the fixture after this copy was built
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            write_model(self.root, name, self.seed)
        return folder

    @property
    def manifest(self) -> dict:
        """What was built: version, seed, classes, counts."""
        return json.loads((self.root / "fixture.json").read_text())


def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
    """``"fixture"`` (or empty) → the fixture's image root; anything else → that path."""
    if str(data_dir) in ("", "fixture"):
        return ensure_fixture().images
    return Path(data_dir).expanduser()


def fixture_dir(seed: int = 0) -> Path:
    """Folder of the fixture for ``seed`` under the data home."""
    return data_home() / "fixtures" / f"{FIXTURE_VERSION}-seed{seed}"


def build_fixture(target: Path, seed: int = 0) -> None:
    """Write images, models and ``fixture.json`` into ``target`` (which must not exist)."""
    import torch
    from transformers.utils import logging as hf_logging

    counts = write_images(target / "images", seed)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in MODEL_WRITERS:
        write_model(target, name, seed)
    manifest = {
        "version": FIXTURE_VERSION, "seed": seed, "counts": counts, "rank_names": list(RANK_NAMES),
        "classes": [dict(asdict(c), folder=c.folder, caption=c.caption) for c in fixture_classes()],
        "models": sorted(MODEL_WRITERS),
    }
    (target / "fixture.json").write_text(json.dumps(manifest, indent=2))


def write_model(root: Path, name: str, seed: int) -> Path:
    """Write one random fixture model into ``root/models/name`` atomically, seeded by its position."""
    import torch

    folder = root / "models" / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent if folder.parent.exists()
                                    else _mkdir(folder.parent)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + list(MODEL_WRITERS).index(name))
            MODEL_WRITERS[name](staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not folder.is_dir():
            raise
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_fixture(seed: int = 0, *, rebuild: bool = False) -> Fixture:
    """Return the fixture for ``seed``, building it (atomically) when missing or incomplete."""
    final = fixture_dir(seed)
    if rebuild and final.exists():
        shutil.rmtree(final)
    if not (final / "fixture.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an interrupted earlier build without its manifest
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
        try:
            build_fixture(staging, seed)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if not (final / "fixture.json").is_file():
                raise
    return Fixture(final, seed)


def main() -> None:
    """``python -m vlmsae_utils.fixtures [--seed N] [--rebuild]``: build and print the fixture path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    fixture = ensure_fixture(args.seed, rebuild=args.rebuild)
    print(fixture.root)


if __name__ == "__main__":
    main()
