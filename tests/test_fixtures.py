"""The embedded fixture: determinism, taxonomy, counts, model round trips."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmsae_utils import fixtures


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (the trained models are built separately)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "trained"
    }


def test_same_seed_gives_same_bytes(tmp_path, fixture):
    fixtures.build_fixture(tmp_path / "again", seed=0)
    assert _digest(tmp_path / "again") == _digest(fixture.root)


def test_other_seed_gives_other_images(tmp_path):
    fixtures.write_images(tmp_path / "s1", seed=1)
    fixtures.write_images(tmp_path / "s0", seed=0)
    first = sorted((tmp_path / "s0").rglob("*.png"))[0]
    assert first.read_bytes() != (tmp_path / "s1" / first.relative_to(tmp_path / "s0")).read_bytes()


def test_image_counts_per_class_and_split(fixture):
    for split, per_class in (("train", fixtures.TRAIN_PER_CLASS), ("val", fixtures.VAL_PER_CLASS)):
        counts = Counter(p.parent.name for p in (fixture.images / split).rglob("*.png"))
        assert len(counts) == len(fixtures.fixture_classes()) >= 12
        assert set(counts.values()) == {per_class}


def test_folder_names_follow_inaturalist_pattern_with_three_informative_ranks(fixture):
    names = sorted(p.name for p in (fixture.images / "train").iterdir())
    parts = [name.split("_") for name in names]
    assert all(len(p) == 8 and p[0].isdigit() and len(p[0]) == 5 for p in parts)
    # a rank is informative when it splits its parent group into several children
    informative = 0
    for rank in range(1, 8):
        parents = Counter(tuple(p[1:rank]) for p in parts)
        children = Counter(tuple(p[1 : rank + 1]) for p in parts)
        if len(children) > len(parents) and len(children) < len(parts):
            informative += 1
    assert informative >= 3


def test_images_are_rgb_64_to_128_px_and_classes_differ(fixture):
    by_class = {}
    for folder in sorted((fixture.images / "val").iterdir()):
        images = [np.asarray(Image.open(p)) for p in sorted(folder.iterdir())]
        assert all(im.shape[2] == 3 and 64 <= im.shape[0] <= 128 for im in images)
        by_class[folder.name] = np.stack(images).astype(float)
    # images of the same class are not identical copies (natural variation)
    some = next(iter(by_class.values()))
    assert np.abs(some[0] - some[1]).mean() > 5


def test_fixture_is_cached_and_rebuilt_when_incomplete(fixture):
    again = fixtures.ensure_fixture()
    assert again.root == fixture.root
    manifest = json.loads((fixture.root / "fixture.json").read_text())
    assert manifest["seed"] == 0 and manifest["counts"]["val"] == 16 * fixtures.VAL_PER_CLASS


def test_unknown_fixture_model_is_a_clear_error(fixture):
    with pytest.raises(ValueError, match="available"):
        fixture.model("gpt")


def test_command_line_builds_and_optionally_trains(fixture, monkeypatch, capsys):
    """``python -m vlmsae_utils.fixtures [--trained]`` (training stubbed: it takes minutes)."""
    import importlib

    import pandas as pd

    from vlmsae_utils.fixtures import training

    cli = importlib.import_module("vlmsae_utils.fixtures.__main__")
    assert cli.main([]) == 0 and capsys.readouterr().out.strip() == str(fixture.root)
    trained = []
    monkeypatch.setattr(training, "ensure_all", lambda f: trained.append(f) or {"mini_clip": f.root / "m"})
    monkeypatch.setattr(training, "summary_table", lambda f: pd.DataFrame({"steps": [1]}, index=["fixture:mini_clip"]))
    assert cli.main(["--trained"]) == 0 and trained == [fixture]
    out = capsys.readouterr().out
    assert f"mini_clip: {fixture.root / 'm'}" in out and "fixture:mini_clip" in out


def test_fixture_captions_are_found_by_folder():
    first = fixtures.fixture_classes()[0]
    assert fixtures.class_caption(first.folder) == first.caption
    assert fixtures.class_caption("n01440764") is None
