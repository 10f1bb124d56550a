"""Tests of vlmsae_utils.labels: readable class names for ImageNet, iNaturalist and other folders."""

from __future__ import annotations

import pytest

from vlmsae_utils.labels import class_label, imagenet_classnames, imagenet_wnids


def test_imagenet_wnid_list():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids))
    assert list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    # Spot checks against the standard class index (imagenet_class_index.json).
    assert wnids[1] == "n01443537" and wnids[683] == "n03838899" and wnids[825] == "n04326547"
    assert wnids[916] == "n06359193" and wnids[970] == "n09193705"


@pytest.mark.parametrize(
    "wnid, name",
    [
        ("n01440764", "tench"),
        ("n01443537", "goldfish"),
        ("n03838899", "oboe"),
        ("n04326547", "stone wall"),
        ("n09835506", "baseball player"),
        ("n15075141", "toilet paper"),
    ],
)
def test_imagenet_names(wnid, name):
    assert class_label(wnid) == name


def test_names_align_with_wordnet_lemmas():
    """The CLIP-curated names follow the wnid order: most of them are among the WordNet lemmas
    of their own wnid, while a one-class shift matches almost none."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    names = imagenet_classnames()
    assert len(names) == 1000
    wnids = imagenet_wnids()
    lemmas = [info.label_name_to_description(w).lower() for w in wnids]
    aligned = sum(names[w].lower() in lemmas[i] for i, w in enumerate(wnids))
    shifted = sum(names[wnids[(i + 1) % 1000]].lower() in lemmas[i] for i in range(1000))
    assert aligned > 750 and shifted < 20, (aligned, shifted)


def test_other_names():
    assert (
        class_label("00001_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus") == "Danaus plexippus"
    )
    assert class_label("09999_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina") == "Rosa canina"
    assert class_label("007_red_fox") == "red fox"
    assert class_label("red_fox") == "red fox"
    assert class_label("golden retriever") == "golden retriever"
    assert class_label("n99999999") == "n99999999"  # a wnid outside ImageNet-1k passes through
    assert class_label("n0144076") == "n0144076"  # not a wnid: too short
    assert class_label("12") == "12"
    assert class_label("") == ""


def test_cards_and_tables_get_readable_labels():
    from vlmsae_utils.hierarchy import short_label

    assert short_label("n01440764") == "tench"
    assert short_label("00001_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris") == "Lumbricus"


def test_class_text_uses_fixture_captions_and_readable_labels_otherwise():
    from vlmsae_utils.fixtures import fixture_classes
    from vlmsae_utils.labels import class_text

    first = fixture_classes()[0]
    assert class_text(first.folder) == first.caption == "a red plain triangle"
    assert class_label(first.folder) == "TriangleRedPlain vulgaris"  # the iNaturalist rule, without captions
    assert class_text("007_red_fox") == class_label("007_red_fox") == "red fox"


def test_baseline_names_are_the_authors_keras_names():
    """The names the authors' similarity_baseline.py embeds, verbatim, for 10 wnids (non-obvious
    ones included: two 'crane' and two 'maillot' classes, case and apostrophes kept)."""
    from vlmsae_utils.labels import baseline_text, imagenet_authors_names

    expected = {
        "n01484850": "great_white_shark",
        "n01514668": "cock",
        "n01601694": "water_ouzel",
        "n02012849": "crane",
        "n03126707": "crane",
        "n03710637": "maillot",
        "n03710721": "maillot",
        "n02086240": "Shih-Tzu",
        "n03992509": "potter's_wheel",
        "n15075141": "toilet_tissue",
    }
    assert {wnid: baseline_text(wnid) for wnid in expected} == expected
    assert tuple(imagenet_authors_names()) == imagenet_wnids()  # the same 1000 classes, same order
    assert baseline_text("n15075141", "clip") == "toilet paper"  # the curated name, as an option
    assert baseline_text("007_red_fox") == "red fox"  # not ImageNet: the readable label
    with pytest.raises(ValueError, match="names must be one of authors, clip"):
        baseline_text("n01440764", "keras")
