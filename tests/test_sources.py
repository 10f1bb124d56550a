"""Where names point (:mod:`vlmsae_utils.sources`): the loaders reach the fixture and rehearsal
models only through the registry (they import no fixture code), and a user's own prefix works
wherever a model name does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlmsae_utils import encoders, sources

PACKAGE = Path(__file__).resolve().parents[1] / "vlmsae_utils"


def folder_of(name: str) -> Path:
    """A user's resolver: ``mine:NAME`` → the fixture's folder of model NAME."""
    from vlmsae_utils.fixtures import ensure_fixture

    return ensure_fixture().model(name)


def _imported(module: str) -> set[str]:
    """Every package module ``module`` imports, at top level or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


@pytest.mark.parametrize("module", ["encoders", "extract", "labels", "llava"])
def test_the_loaders_import_no_fixture_or_rehearsal_code(module):
    assert not {m for m in _imported(module) if m.split(".")[0] in ("fixtures", "rehearsal", "rehearsal_models")}


def test_a_registered_prefix_loads_like_a_built_in_one(fixture, monkeypatch):
    monkeypatch.setitem(sources.MODEL_SOURCES, "mine:", "test_sources:folder_of")
    assert sources.model_source("mine:clip") == str(fixture.model("clip"))
    encoder = encoders.load_encoder("mine:clip", "cpu")
    assert encoder.name == "mine:clip" and encoder.family == "clip"  # a stable name, as fixture: names keep
    assert sources.model_source("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert sources.data_root("fixture") == fixture.images and sources.data_root("~/x") == Path.home() / "x"
    assert sources.class_caption("n01440764") is None
    with pytest.raises(ValueError, match="'prefix:' -> 'module:function'"):
        sources.register_model_source("mine", "test_sources.folder_of")
