"""The sweep file's schema: one frozen SweepConfig, parsed once, each key declared and documented once."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import yaml

from vlmsae_utils import run, sweep
from vlmsae_utils.io import sha256_json
from vlmsae_utils.sweep_schema import (
    DataSplit,
    HierarchySection,
    SaeSection,
    SteeringSection,
    SweepConfig,
    field_docs,
)
from vlmsae_utils.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: Every run of each shipped config (id, notebook, parameters, dependencies, labels, fingerprint) as
#: the dict-based loader planned them before the schema: finished sweeps must stay finished.
PLANS_BEFORE_THE_SCHEMA = {
    "fixture.yaml": "4c20079b98bc4051e3ed2f2140653b5effebeab84a230b1892151a4df35e0a80",
    "paper_clip_vitl14.yaml": "8ca0303a4a8b6e2edc886105e7807b126d58b63823f121df71599687d5b3d94f",
    "paper_hierarchy.yaml": "27b930daf11b9f5b02b9dc41e057aaed4923dd77b3aa3addcff1221f7147500c",
    "paper_k_sweep.yaml": "1a21bacd70caef4e1594ae3c9b442a0eca41647a29ef26a9851addd72f43eaee",
    "paper_steering.yaml": "33c9a841c84e72cf6ffa790613cc2a446b6753240f4db2b65bf154c490394e57",
}


def _plan_digest(path: Path) -> str:
    runs = sweep.expand(sweep.load_config(path, check_data=False))
    root = Path("/sweep")  # markers absent: each fingerprint is the run's own parameters
    rows = [[r.id, r.notebook, r.parameters, r.depends, r.labels, sweep._fingerprint(r, root)] for r in runs]
    return sha256_json(json.loads(json.dumps(rows, default=repr)))


@pytest.mark.parametrize("name", sorted(PLANS_BEFORE_THE_SCHEMA))
def test_every_shipped_config_plans_the_runs_it_planned_before(name):
    assert _plan_digest(CONFIGS / name) == PLANS_BEFORE_THE_SCHEMA[name]


def test_the_config_is_parsed_once_into_frozen_typed_sections():
    config = sweep.load_config(CONFIGS / "fixture.yaml")
    assert isinstance(config.sae, SaeSection) and isinstance(config.data["train"], DataSplit)
    assert config.layers == (2, "last") and config.sae.expansions == (2, 4)  # YAML lists as tuples
    assert config.sae.settings["steps"] == 300 and config.sae.setting("k_aux") is None  # unset: TrainConfig's
    assert config.steering is not None and config.steering.alphas == (0, 3, 10)
    assert config.executor.type == "inline"  # no executor block: the defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.data["test"] = config.data["val"]  # type: ignore[index]
    again = pickle.loads(pickle.dumps(config))  # a plan hook or a job may copy it
    assert again == config and copy.deepcopy(config) == config


@pytest.mark.parametrize("section", [SweepConfig, DataSplit, SaeSection, HierarchySection, SteeringSection])
def test_every_key_of_every_section_says_what_it_means(section):
    docs = field_docs(section)
    missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
    assert not missing, f"{section.__name__}: fields without a #: line: {missing}"


def test_training_keys_are_documented_where_they_are_declared():
    """The sae section's settings are TrainConfig's fields: typed and documented there, once."""
    docs = field_docs(TrainConfig)
    assert set(TrainConfig.setting_names()) <= {name for name, doc in docs.items() if doc}


def test_steering_settings_the_sweep_passes_are_notebook_05_parameters(tmp_path):
    ipynb = run.to_ipynb(run.find_notebook("05"), tmp_path / "05.ipynb")
    parameters = set(run.notebook_parameters(ipynb))
    steering = SteeringSection("llava", "clip", 2, alphas=(0, 1), latents=(3,), image_latents=2)
    passed = steering.notebook_settings()
    assert passed == {"alphas": [0, 1], "latents": [3], "image_latents": 2}  # set ones only, as lists
    every = {f.name for f in dataclasses.fields(SteeringSection) if f.metadata}
    assert every <= parameters, every - parameters


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers": "last"}, r"cfg.yaml.layers: expected list of int or str, got 'last'"),
        ({"batch_size": True}, r"cfg.yaml.batch_size: expected int, got True"),
        ({"steering": {"llava": "x", "encoder": "y"}}, r"cfg.yaml.steering: missing key\(s\) \['layer'\]"),
        ({"hierarchy": {"top_k": "16"}}, r"cfg.yaml.hierarchy.top_k: expected int, got '16'"),
        ({"data": ["fixture"]}, r"cfg.yaml.data: expected mapping, got \['fixture'\]"),
        ({"hierarchy": None}, r"cfg.yaml.hierarchy: empty; write 'hierarchy: \{\}' for its defaults"),
        ({"sae": {"types": ["batch_top_k"], "expansions": [2], "group_fractions": "half"}}, r"sae.group_fractions"),
    ],
)
def test_errors_name_the_file_the_key_and_the_type(tmp_path, changes, message):
    raw = yaml.safe_load((CONFIGS / "fixture.yaml").read_text()) | changes
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(sweep.ConfigError, match=message):
        sweep.load_config(tmp_path / "cfg.yaml")
