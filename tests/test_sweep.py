"""Sweep files: validation, grid expansion, resume, failure isolation, gathered tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import FakeRunner, lock_held_elsewhere

from vlmsae_utils import hooks, run, sweep
from vlmsae_utils.cli import parse_value
from vlmsae_utils.paths import repo_root, results_root
from vlmsae_utils.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(tmp_path, **changes) -> Path:
    config = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _with_steps(tmp_path, steps: int) -> sweep.SweepConfig:
    """The fixture grid (no hierarchy, no steering) with other training steps: the same sweep edited."""
    sae = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())["sae"] | {"steps": steps}
    return sweep.load_config(_config(tmp_path, sae=sae, hierarchy=None, steering=None))


def test_every_config_file_is_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if all(split["data_dir"] == "fixture" for split in config["data"].values()):
            assert sweep.expand(sweep.load_config(path)), path.name
        else:  # paper configs point at data this machine does not have: the error names the folder
            with pytest.raises(sweep.ConfigError, match="does not exist"):
                sweep.load_config(path)
            assert sweep.expand(sweep.load_config(path, check_data=False)), path.name


def test_paper_grid_has_the_papers_cells():
    config = sweep.load_config(CONFIGS / "paper_clip_vitl14.yaml", check_data=False)
    runs = sweep.expand(config)
    trained = [r for r in runs if r.kind == "train"]
    assert len(trained) == 5 * 6 * 2  # layers 11/17/22/23/last × ε 1..64 × BatchTopK/Matryoshka
    assert {r.parameters["k"] for r in trained} == {20}
    assert len([r for r in runs if r.kind == "score"]) == 5 * 2  # two scorers


def test_k_sweep_trains_each_k_in_its_own_folder(tmp_path):
    """configs/paper_k_sweep.yaml: K = 1, 10, 20, 50 at ε = 16, one Matryoshka SAE each, all scored."""
    runs = sweep.expand(sweep.load_config(CONFIGS / "paper_k_sweep.yaml", check_data=False))
    trained = [r for r in runs if r.kind == "train"]
    assert sorted(r.parameters["k"] for r in trained) == [1, 10, 20, 50]
    assert {r.parameters["expansions"][0] for r in trained} == {16}
    assert len({r.out_dir for r in trained}) == 4 and all(r.out_dir.endswith(f"_k{r.parameters['k']}") for r in trained)
    (score,) = [r for r in runs if r.kind == "score"]
    assert sorted(score.parameters["sae_paths"]) == sorted(r.labels["sae_dir"] for r in trained)
    sae = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())["sae"]
    for bad, message in (
        ([0, 8], "k must be"),
        ([], "non-empty list"),
        (["8"], r"sae.k: expected int or list of int, got \['8'\]"),
    ):
        with pytest.raises(sweep.ConfigError, match=message):
            sweep.load_config(_config(tmp_path, sae=sae | {"k": bad}, hierarchy=None, steering=None))
    with pytest.raises(sweep.ConfigError, match="a list of K values sweeps the grid"):
        sweep.load_config(_config(tmp_path, sae=sae | {"k": [4, 8]}))  # the fixture sweep has steering


def test_sparsity_plot_draws_r2_and_ms_against_k():
    from vlmsae_utils import plots

    frame = pd.DataFrame(
        {"SAE": "Matryoshka", "expansion": 16, "layer": "last", "scorer": "dino", "K": [1, 10, 20, 50]}
        | {"R² %": [31.3, 60.6, 66.8, 74.9], "MS mean": [0.37, 0.19, 0.16, 0.07]}
    )
    fig = plots.sparsity_by_k(frame)
    r2, ms = fig.axes
    assert list(r2.lines[0].get_ydata()) == [31.3, 60.6, 66.8, 74.9]
    assert list(ms.lines[0].get_ydata()) == [0.37, 0.19, 0.16, 0.07]


def test_grid_expansion_counts_and_dependencies(tmp_path):
    runs = sweep.expand(sweep.load_config(_config(tmp_path, hierarchy=None, steering=None)))
    kinds = pd.Series([r.kind for r in runs]).value_counts().to_dict()
    # 2 layers × (train, val) extractions, 1 scorer embedding, 2 layers × 2 types × 2 ε SAEs, 2 score runs
    assert kinds == {"extract": 4, "embed": 1, "train": 8, "score": 2}
    position = {r.id: i for i, r in enumerate(runs)}
    for r in runs:
        assert all(position[d] < position[r.id] for d in r.depends), r.id
    score = next(r for r in runs if r.kind == "score" and r.labels["layer"] == "last")
    assert len(score.parameters["sae_paths"]) == 4
    assert all(p.startswith("train/fixture_mini_clip/Llast/") for p in score.parameters["sae_paths"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"modles": ["fixture:clip"]}, "unknown key"),
        ({"layers": ["middle"]}, "block index or 'last'"),
        ({"sae": {"types": ["batch_top_k"], "expansions": [2], "k": "twenty", "steps": 10}}, "sae.k: expected int"),
        (
            {
                "data": {
                    "train": {"data_dir": "/no/such/folder", "split": "train"},
                    "val": {"data_dir": "fixture", "split": "val"},
                }
            },
            "does not exist",
        ),
        ({"scorers": []}, "non-empty list"),
        ({"name": "a b"}, "name"),
        # values every cell refused only once it ran (issue 32), refused at load by the stages' rules
        ({"device": "gpu0"}, "device: 'gpu0' is not valid; valid: auto, cpu, cuda, cuda:N, mps"),
        ({"model_dtype": "fp8"}, "model_dtype: 'fp8' is not valid"),
        ({"dtype": "int8"}, "dtype: 'int8' is not valid; valid: float16, float32"),
        ({"tokens": "cls_and_mean"}, "tokens: 'cls_and_mean' is not valid"),
        ({"batch_size": 0}, "batch_size: must be at least 1, got 0"),
        ({"num_workers": -1}, "num_workers: must be at least 0, got -1"),
        ({"decode": "nvjpeg"}, "decode: 'nvjpeg' is not valid; valid: cpu, gpu"),
        ({"hierarchy": {"group_fractions": [[1]]}}, r"hierarchy.group_fractions: expected list of number or null"),
        ({"hierarchy": {"group_fractions": [0.5, 0.4]}}, "hierarchy: "),
        ({"hierarchy": {"top_k": 1}}, "hierarchy.top_k: the LCA depth needs image pairs"),
        (
            {"sae": {"types": ["matryoshka_batch_top_k"], "expansions": [2], "group_fractions": [[1]]}},
            r"sae.group_fractions: expected list of number or null, got \[\[1\]\]",
        ),
        ({"data": {"train": None, "val": {"data_dir": "fixture"}}}, "data.train: a mapping with data_dir"),
        (
            {"data": {"train": {"split": "train"}, "val": {"data_dir": "fixture"}}},
            r"data.train: missing key\(s\) \['data_dir'\]",
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path, changes, message):
    with pytest.raises(sweep.ConfigError, match=message):
        sweep.load_config(_config(tmp_path, **changes))


def test_missing_required_key(tmp_path):
    with pytest.raises(sweep.ConfigError, match="missing key"):
        sweep.load_config(_config(tmp_path, sae=None))


def test_resume_skips_finished_runs_and_redoes_removed_outputs(tmp_path):
    config = sweep.load_config(_config(tmp_path, hierarchy=None, steering=None))
    runs = sweep.expand(config)
    root = tmp_path / "sweep"
    first = FakeRunner()
    status = sweep.execute(runs, root, runner=first, progress=False)
    assert (status.status == "ran").all() and len(first.calls) == len(runs)
    second = FakeRunner()
    status = sweep.execute(runs, root, runner=second, progress=False)
    assert second.calls == [] and (status.status == "done earlier").all()
    (root / runs[-1].out_dir / "ms_summary.csv").unlink()
    third = FakeRunner()
    sweep.execute(runs, root, runner=third, progress=False)
    assert third.calls == [str(root / runs[-1].out_dir)]
    dry = sweep.execute(runs, root, dry_run=True, progress=False)
    assert (dry.status == "done earlier").all()
    train = next(r for r in runs if r.kind == "train")  # an SAE's weights deleted from a finished run
    sae = root / train.out_dir / "batch_top_k_x4_k8"
    (root / train.out_dir / "results.csv").write_text(f"SAE,path\nBatchTopK,/elsewhere/{sae.name}\n")
    sae.mkdir()
    (sae / "sae.safetensors").write_text("weights")
    assert sweep.is_complete(train, root)
    (sae / "sae.safetensors").unlink()
    assert not sweep.is_complete(train, root)


def test_a_failed_run_blocks_only_its_dependents(tmp_path):
    runs = sweep.expand(sweep.load_config(_config(tmp_path, hierarchy=None, steering=None)))
    runner = FakeRunner(fail={"extract/fixture_mini_clip/L2/val"})
    status = sweep.execute(runs, tmp_path / "sweep", runner=runner, progress=False).set_index("run")
    assert status.loc["extract/fixture_mini_clip/L2/val", "status"] == "failed"
    assert "injected" in status.loc["extract/fixture_mini_clip/L2/val", "message"]
    assert status.loc["train/fixture_mini_clip/L2/batch_top_k_x2", "status"] == "blocked"
    assert status.loc["score/fixture_mini_clip/L2/fixture_scorer", "status"] == "blocked"
    assert status.loc["train/fixture_mini_clip/Llast/batch_top_k_x2", "status"] == "ran"
    assert status.loc["score/fixture_mini_clip/Llast/fixture_scorer", "status"] == "ran"


def test_changed_parameters_rerun(tmp_path):
    runs = sweep.expand(sweep.load_config(_config(tmp_path, hierarchy=None, steering=None)))
    root = tmp_path / "sweep"
    sweep.execute(runs, root, runner=FakeRunner(), progress=False)
    runs[0].parameters["batch_size"] = 32
    again = FakeRunner()
    sweep.execute(runs[:1], root, runner=again, progress=False)
    assert again.calls == [str(root / runs[0].out_dir)]


def test_every_training_setting_reaches_notebook_02_only_where_set(tmp_path):
    """A sweep may set any TrainConfig setting; an unset one stays out of the run's parameters, so the
    runs (and fingerprints) of a sweep that sets none are what they were."""
    base = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())
    plain = sweep.expand(sweep.load_config(_config(tmp_path, hierarchy=None, steering=None)))
    sae = base["sae"] | {"l1_coeff": 0.5, "init": "gaussian", "k_aux": 16}
    changed = sweep.expand(sweep.load_config(_config(tmp_path, sae=sae, hierarchy=None, steering=None)))
    for before, after in zip(plain, changed):
        if before.kind != "train":
            assert after.parameters == before.parameters
            continue
        assert "init" not in before.parameters
        assert after.parameters == before.parameters | {"l1_coeff": 0.5, "init": "gaussian", "k_aux": 16}
    with pytest.raises(sweep.ConfigError, match="init must be one of"):
        sweep.load_config(_config(tmp_path, sae=base["sae"] | {"init": "zeros"}, hierarchy=None, steering=None))


@pytest.mark.slow
def test_fixture_sweep_end_to_end(fixture_results):
    sae = pd.read_csv(fixture_results / "sae.csv")
    assert len(sae) == 8  # 2 layers × 2 SAE types × 2 expansions, one scorer
    assert set(sae.columns) >= {
        "model",
        "layer",
        "scorer",
        "SAE",
        "expansion",
        "K",
        "R² %",
        "L0",
        "dead %",
        "MS mean",
        "MS std",
        "MS max",
    }
    assert sorted(sae.layer.astype(str).unique()) == ["2", "last"]
    assert sae["R² %"].between(0, 100).all() and sae["MS max"].between(-1, 1).all()
    raw = pd.read_csv(fixture_results / "raw.csv")
    assert len(raw) == 2 and raw.neurons.str.startswith("raw").all()
    levels = pd.read_csv(fixture_results / "hierarchy.csv")
    assert len(levels) == 5
    steering = pd.read_csv(fixture_results / "steering.csv")
    assert len(steering) == 2
    # the tables hold the runs' own numbers: R² of one SAE as written by its training run
    folder = sweep.sweep_dir("fixture") / "train/fixture_mini_clip/L2/batch_top_k_x4"
    trained = pd.read_csv(folder / "results.csv").iloc[0]
    row = sae[(sae.layer.astype(str) == "2") & (sae.SAE == "BatchTopK") & (sae.expansion == 4)].iloc[0]
    assert row["R² %"] == pytest.approx(trained["R² %"])


def test_results_root_is_isolated_in_tests():
    assert repo_root() is None or results_root() != repo_root() / "results"


def test_device_reaches_every_run_but_not_its_fingerprint(tmp_path):
    config = sweep.load_config(_config(tmp_path, device="cuda:1", model_dtype="bfloat16", num_workers=3))
    runs = sweep.expand(config)
    assert {r.parameters["device"] for r in runs} == {"cuda:1"}
    extraction = [r for r in runs if r.kind in ("extract", "embed")]
    assert {(r.parameters["model_dtype"], r.parameters["num_workers"]) for r in extraction} == {("bfloat16", 3)}
    steer = next(r for r in runs if r.kind == "steer")
    assert steer.parameters["model_dtype"] == "bfloat16"
    for r in runs:  # every parameter is one the notebook declares
        ipynb = run.to_ipynb(run.find_notebook(r.notebook), tmp_path / f"{r.notebook}.ipynb")
        run.check_parameters(ipynb, r.parameters)
    on_cpu = sweep.expand(sweep.load_config(_config(tmp_path, device="cpu", model_dtype="bfloat16", num_workers=0)))
    root = tmp_path / "root"
    assert [sweep._fingerprint(a, root) for a in runs] == [sweep._fingerprint(b, root) for b in on_cpu]


def test_gpu_decoding_reaches_extractions_and_their_fingerprint(tmp_path):
    """``decode: gpu`` changes the pixels (resampling round-off), so unlike ``device`` it is part of
    the extraction's fingerprint; left unset, runs keep the parameters (and fingerprints) they had."""
    plain = sweep.expand(sweep.load_config(_config(tmp_path)))
    on_gpu = sweep.expand(sweep.load_config(_config(tmp_path, decode="gpu")))
    assert {r.parameters.get("decode") for r in on_gpu if r.kind == "extract"} == {"gpu"}
    assert all("decode" not in r.parameters for r in plain + [r for r in on_gpu if r.kind != "extract"])
    extraction = next(r for r in on_gpu if r.kind == "extract")
    ipynb = run.to_ipynb(run.find_notebook(extraction.notebook), tmp_path / "01.ipynb")
    run.check_parameters(ipynb, extraction.parameters)
    root = tmp_path / "root"
    pairs = [(a, b) for a, b in zip(plain, on_gpu) if a.kind == "extract"]
    assert pairs and all(sweep._fingerprint(a, root) != sweep._fingerprint(b, root) for a, b in pairs)


def test_device_key_must_be_a_string(tmp_path):
    with pytest.raises(sweep.ConfigError, match=r"device: expected str"):
        sweep.load_config(_config(tmp_path, device=0))


def test_model_names_that_would_share_a_folder_are_refused(tmp_path):
    with pytest.raises(sweep.ConfigError, match="would share the run folder 'openai_clip'"):
        sweep.load_config(_config(tmp_path, models=["openai/clip", "openai_clip"]))
    assert not sweep.slug("..").startswith(".") and "/" not in sweep.slug("../x")
    with pytest.raises(sweep.ConfigError, match="name"):
        sweep.load_config(_config(tmp_path, name=".."))


def test_hierarchy_layer_outside_layers_is_an_error_not_a_missing_run(tmp_path):
    config = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())
    config["hierarchy"]["layer"] = 1
    with pytest.raises(sweep.ConfigError, match=r"hierarchy.layer: 1 is not one of layers"):
        sweep.load_config(_config(tmp_path, hierarchy=config["hierarchy"]))


def test_learning_rate_in_yaml_exponent_form_is_a_number(tmp_path):
    path = tmp_path / "lr.yaml"
    text = (CONFIGS / "fixture.yaml").read_text().replace("  lr: null", "  lr: 2e-4")
    path.write_text(text)
    assert yaml.safe_load(text)["sae"]["lr"] == "2e-4"  # what YAML itself reads
    assert sweep.load_config(path).sae.setting("lr") == pytest.approx(2e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  lr: 2e-4", "  lr: fast"))
    with pytest.raises(sweep.ConfigError, match=r"sae.lr: expected number or null, got 'fast'"):
        sweep.load_config(bad)


def test_load_results_filters_one_scorer_and_names_the_sweep_by_folder(tmp_path):
    from vlmsae_utils.sweep import load_results

    folder = tmp_path / "machine" / "specific" / "mysweep"
    folder.mkdir(parents=True)
    pd.DataFrame({"scorer": ["dino", "clip", "dino"], "layer": [2, 2, "last"], "MS max": [0.9, 0.8, 0.7]}).to_csv(
        folder / "sae.csv", index=False
    )
    old_raw = {"scorer": ["clip", "dino"], "layer": [2, 2], "K": [8, 8], "best MS": [0.3, 0.4], "mean MS": [0.1, 0.2]}
    pd.DataFrame(old_raw).to_csv(folder / "raw.csv", index=False)  # gathered before one spelling per column
    results = load_results(folder)
    assert results.scorer == "dino" and results.sae["MS max"].tolist() == [0.9, 0.7]
    assert results.sae.layer.tolist() == ["2", "last"] and results.raw["MS mean"].tolist() == [0.2]
    assert results.raw["neuron count"].tolist() == [8] and "K" not in results.raw  # K is only ever the sparsity
    assert results.describe() == "sweep mysweep: 2 SAE runs, scorer dino; tables: raw, sae"
    assert str(tmp_path) not in results.describe()  # a page never shows a machine path
    assert load_results(folder, "clip").sae["MS max"].tolist() == [0.8]
    with pytest.raises(ValueError, match=r"scorer 'siglip' is not in .*; it has dino, clip"):
        load_results(folder, "siglip")
    with pytest.raises(FileNotFoundError, match=r"has no sae.csv"):
        load_results(tmp_path)


# ----------------------------------------------------------------------------- hook points as data (issue 13, item 4)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"hook": "pre_mlp"},
            r"sweep\.yaml\.hook: 'pre_mlp' is not a hook .*valid: post_mlp_residual; layers: \[last\]",
        ),
        (
            {"hook": "post_projection"},
            r"sweep\.yaml\.hook: 'post_projection' .*layers: \[last\] extracts post_projection",
        ),
        ({"hook": 3}, r"sweep\.yaml\.hook: expected str"),
        (
            {
                "steering": {
                    "llava": "fixture:mini_llava",
                    "encoder": "fixture:mini_clip",
                    "layer": 2,
                    "hook": "post_projection",
                }
            },
            r"sweep\.yaml\.steering\.hook: 'post_projection' .*valid: post_mlp_residual",
        ),
    ],
)
def test_bad_hook_names_file_key_and_valid_values(tmp_path, changes, message):
    with pytest.raises(sweep.ConfigError, match=message):
        sweep.load_config(_config(tmp_path, **changes))


def test_default_hook_keeps_every_run_and_fingerprint(tmp_path):
    config = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())
    config.pop("hook"), config["steering"].pop("hook")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(config))
    plain = sweep.expand(sweep.load_config(tmp_path / "plain.yaml"))
    named = sweep.expand(sweep.load_config(_config(tmp_path, hook="post_mlp_residual")))
    root = tmp_path / "sweep"
    assert [(r.id, sweep._fingerprint(r, root)) for r in plain] == [(r.id, sweep._fingerprint(r, root)) for r in named]
    assert all("hook" not in r.parameters for r in plain if r.kind == "steer")
    assert {r.parameters["hook"] for r in plain if r.kind in ("extract", "embed")} == {
        "post_mlp_residual",
        "post_projection",
    }


def test_another_hook_gets_its_own_folders_and_reaches_the_notebooks(tmp_path):
    hooks.register_hook(
        hooks.HookSpec(
            "mlp_output", per_block=True, layout=hooks.TOKENS, locate=hooks.block_child("mlp"), steerable=True
        )
    )
    try:
        steer = dict(yaml.safe_load((CONFIGS / "fixture.yaml").read_text())["steering"], hook="mlp_output")
        runs = sweep.expand(sweep.load_config(_config(tmp_path, hook="mlp_output", steering=steer)))
    finally:
        hooks.unregister_hook("mlp_output")
    by_id = {r.id: r for r in runs}
    assert by_id["extract/fixture_mini_clip/L2_mlp_output/train"].parameters["hook"] == "mlp_output"
    assert by_id["extract/fixture_mini_clip/Llast/train"].parameters["hook"] == "post_projection"
    assert "train/fixture_mini_clip/L2_mlp_output/batch_top_k_x2" in by_id
    assert "hierarchy/fixture_mini_clip/L2_mlp_output" in by_id
    assert not any("/L2/" in r.id for r in runs)
    steer_run = next(r for r in runs if r.kind == "steer")
    assert steer_run.id == "steer/fixture_mini_llava/L2_mlp_output" and steer_run.parameters["hook"] == "mlp_output"
    assert by_id["extract/fixture_mini_clip/L2_mlp_output_random_k16/train"].parameters["hook"] == "mlp_output"


def test_broken_yaml_and_incomplete_sections_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [a\n")
    with pytest.raises(sweep.ConfigError, match=r"bad\.yaml: not valid YAML"):
        sweep.load_config(bad)
    config = yaml.safe_load((repo_root() / "configs" / "fixture.yaml").read_text())
    del config["steering"]["llava"]
    path = tmp_path / "nollava.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(sweep.ConfigError, match=r"nollava.yaml.steering: missing key\(s\) \['llava'\]"):
        sweep.load_config(path)


def test_a_yaml_bomb_is_refused_before_anything_expands_it(tmp_path):
    """Nine levels of aliases, each nine times the last: 387 M list items once expanded."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = (repo_root() / "configs" / "fixture.yaml").read_text()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text.replace("steering:\n", "\n".join(levels) + "\nsteering:\n  alphas: *a8\n", 1))
    with pytest.raises(
        sweep.ConfigError, match=r"bomb\.yaml: not valid YAML \(aliases \(\*name\) are not allowed, line"
    ):
        sweep.load_config(bomb)
    with pytest.raises(ValueError, match="aliases"):
        parse_value("[&a [1, 2], *a]")  # command-line values are read by the same loader


def test_sections_without_steps_or_group_fractions_use_the_defaults(tmp_path):
    from vlmsae_utils.hierarchy import PAPER_GROUP_FRACTIONS

    config = yaml.safe_load((repo_root() / "configs" / "fixture.yaml").read_text())
    del config["sae"]["steps"], config["hierarchy"]["group_fractions"]
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = {r.id: r for r in sweep.expand(sweep.load_config(path))}
    hierarchy_sae = runs["train/fixture_mini_clip/L2/hierarchy"].parameters
    assert hierarchy_sae["group_fractions"] == list(PAPER_GROUP_FRACTIONS)
    assert hierarchy_sae["steps"] == TrainConfig().steps


def test_a_redone_training_run_makes_its_score_run_stale(tmp_path):
    """Retraining with other settings used to leave the old MS beside the new R² (fingerprints
    did not chain); now every run downstream of a changed run is redone, and a dry run says so."""
    config = sweep.load_config(_config(tmp_path, hierarchy=None, steering=None))
    root = tmp_path / "sweep"
    sweep.execute(sweep.expand(config), root, runner=FakeRunner(), progress=False)
    config = _with_steps(tmp_path, 400)  # only the training runs' own parameters change
    runs = sweep.expand(config)
    dry = sweep.execute(runs, root, dry_run=True, progress=False).set_index("run")
    assert dry.loc["score/fixture_mini_clip/L2/fixture_scorer", "status"] == "would run"
    assert dry.loc["extract/fixture_mini_clip/L2/train", "status"] == "done earlier"
    again = FakeRunner()
    sweep.execute(runs, root, runner=again, progress=False)
    redone = {Path(call).relative_to(root).as_posix() for call in again.calls}
    assert redone == {r.id for r in runs if r.kind in ("train", "score")}


def test_a_second_run_of_the_same_sweep_is_refused_while_the_first_holds_it(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    with (
        lock_held_elsewhere(root) as pid,
        pytest.raises(sweep.SweepLockedError, match=f"being written by pid {pid} on "),
        sweep.sweep_lock(root),
    ):
        pass
    with sweep.sweep_lock(root), sweep.sweep_lock(root):  # released with its holder; nested holds in one process
        pass


def test_a_run_folder_held_by_another_writer_fails_that_run_naming_the_holder(tmp_path):
    """Two processes on one cell (a job started twice, a notebook run by hand into a sweep's folder):
    the second fails with the holder's pid instead of interleaving writes; its dependents are blocked."""
    runs = sweep.expand(sweep.load_config(_config(tmp_path, hierarchy=None, steering=None)))
    root = tmp_path / "sweep"
    held = "extract/fixture_mini_clip/L2/val"
    runner = FakeRunner()
    with lock_held_elsewhere(root / held) as pid:
        status = sweep.execute(runs, root, runner=runner, progress=False).set_index("run")
    assert status.loc[held, "status"] == "failed"
    assert f"run folder val is being written by pid {pid}" in status.loc[held, "message"]
    assert str(root / held) not in runner.calls
    assert status.loc["score/fixture_mini_clip/L2/fixture_scorer", "status"] == "blocked"


def test_a_run_whose_input_is_being_redone_is_not_gathered(tmp_path):
    """A retraining killed after its notebook wrote new files but before its marker: the score run's
    marker still matches the old training's marker, so on its own it looked complete and gather put
    the old MS beside the new results.csv. Runs count as complete only with complete inputs."""
    config = sweep.load_config(_config(tmp_path, hierarchy=None, steering=None))
    root = tmp_path / "sweep"
    sweep.execute(sweep.expand(config), root, runner=FakeRunner(), progress=False)
    config = _with_steps(tmp_path, 400)
    runs = sweep.expand(config)
    score = next(r for r in runs if r.kind == "score")
    assert sweep.is_complete(score, root)  # the hole: its own fingerprint still matches
    complete = sweep.complete_runs(runs, root)
    assert {r.id for r in runs if r.kind in ("train", "score")} & complete == set()
    assert {r.id for r in runs if r.kind in ("extract", "embed")} <= complete


def test_a_run_redone_with_other_parameters_starts_from_a_clean_folder(tmp_path):
    """Changing a finished sweep's training settings used to fail every training cell (the notebook
    rightly refuses a checkpoint written with other settings); the sweep now clears a cell made with
    other parameters or inputs before running it again, and keeps an interrupted one with the same."""
    config = sweep.load_config(_config(tmp_path, hierarchy=None, steering=None))
    root = tmp_path / "sweep"
    runs = sweep.expand(config)
    sweep.execute(runs, root, runner=FakeRunner(), progress=False)
    train = next(r for r in runs if r.kind == "train")
    (root / train.out_dir / "checkpoint.pt").write_text("written with steps 300")
    (root / train.out_dir / sweep.JOB_FILE).write_text("{}")
    config = _with_steps(tmp_path, 400)
    sweep.execute(sweep.expand(config), root, runner=FakeRunner(), progress=False)
    assert not (root / train.out_dir / "checkpoint.pt").exists()  # cleared before the redo
    assert (root / train.out_dir / sweep.JOB_FILE).exists()  # the job record stays

    (root / train.out_dir / "checkpoint.pt").write_text("interrupted with steps 400")
    (root / train.out_dir / sweep.DONE_FILE).unlink()  # killed before its marker, same parameters
    sweep.execute(sweep.expand(config), root, runner=FakeRunner(), progress=False)
    assert (root / train.out_dir / "checkpoint.pt").read_text() == "interrupted with steps 400"  # resumed from


def test_fixture_results_wait_for_a_sweep_run_elsewhere(monkeypatch):
    """make demo runs the fixture sweep beside the chapters: chapter 6's ensure_fixture_results meets
    the sweep's lock, waits for the folder, then brings the (now finished) sweep up to date."""
    calls = []

    def fake_run_sweep(path, progress=False):
        calls.append(path)
        if len(calls) == 1:
            raise sweep.SweepLockedError("sweep folder is locked by pid 1")
        return pd.DataFrame({"run": ["a"], "status": ["skipped"], "message": [""]}), {}

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    results = sweep.ensure_fixture_results(CONFIGS / "fixture.yaml")
    assert len(calls) == 2 and results.name == "fixture"
