"""Tests of vlmsae_utils.paths.safe_stem: file stems from user-supplied names."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest

from vlmsae_utils.paths import safe_stem

SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _h(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def test_known_stems():
    # SHA-1 of the empty string is the well-known da39a3ee5e6b4b0d3255bfef95601890afd80709.
    assert safe_stem("") == "name-da39a3ee"
    assert (
        safe_stem("openai/clip-vit-large-patch14-336")
        == f"openai_clip-vit-large-patch14-336-{_h('openai/clip-vit-large-patch14-336')}"
    )
    assert safe_stem("/data/models/clip") == f"data_models_clip-{_h('/data/models/clip')}"
    assert safe_stem("fixture:mini_clip") == f"fixture_mini_clip-{_h('fixture:mini_clip')}"
    assert (
        safe_stem("raw open_clip:ViT-L-14-336/openai")
        == f"raw_open_clip_ViT-L-14-336_openai-{_h('raw open_clip:ViT-L-14-336/openai')}"
    )
    assert safe_stem("Matryoshka ×4") == f"Matryoshka_4-{_h('Matryoshka ×4')}"
    assert safe_stem("café au lait") == f"cafe_au_lait-{_h('café au lait')}"  # accents folded
    assert safe_stem("..") == f"name-{_h('..')}"
    assert safe_stem("../../etc/passwd") == f"etc_passwd-{_h('../../etc/passwd')}"
    assert safe_stem(".hidden") == f"hidden-{_h('.hidden')}"
    assert safe_stem("CON") == f"CON-{_h('CON')}"  # a Windows device name is not a usable stem


@pytest.mark.parametrize("name", ["fixture_mini_clip", "ms_summary", "L-2_cls", "v1.2", "a", "x" * 100])
def test_safe_names_unchanged(name):
    assert safe_stem(name) == name
    assert safe_stem(safe_stem(name)) == name


def test_every_stem_is_safe_and_bounded():
    names = [
        "",
        ".",
        "..",
        "/",
        "a/../b",
        " ",
        "\t\n",
        "ünï/cødé",
        "名前",
        "a" * 500,
        "é" * 300,
        "hf-internal/x:y z",
        "-rf",
        "C:\\models\\clip",
        "fixture:mini_clip",
        "__x__",
        "\x00nul",
    ]
    for name in names:
        stem = safe_stem(name)
        assert stem and SAFE.fullmatch(stem), (name, stem)
        assert "/" not in stem and "\\" not in stem and not stem.startswith(".")
        assert len(stem) <= 100
        assert safe_stem(stem) == stem  # a stem is itself a safe name
    assert len(safe_stem("a/" * 300, max_len=40)) <= 40


def test_names_that_slug_alike_never_collide():
    names = ["a/b", "a_b", "a:b", "a b", "a//b", "a__b", "a/b/", "/a/b", "a\\b", "á_b", "a_b_", "a_b.", ""]
    variants = ["openai/clip", "openai_clip", "openai:clip", "OpenAI/clip", "openai/clip ", "openai/clíp"]
    long = ["x" * 200 + "a", "x" * 200 + "b", "x" * 200 + "/a"]
    stems = [safe_stem(n) for n in names + variants + long]
    assert len(set(stems)) == len(stems)
    for a, b in itertools.combinations(names + variants, 2):
        assert safe_stem(a) != safe_stem(b), (a, b)


def test_max_len_validation():
    with pytest.raises(ValueError, match="max_len"):
        safe_stem("a", max_len=8)
