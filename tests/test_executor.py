"""Sweeps as jobs (issue: cluster executor): the executor block, job grouping and dependencies, a
fake Slurm on PATH that records every submission, and real subprocess jobs through submitit's
local executor (killed, rerun, and the same results as the inline runner)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cloudpickle
import helpers
import pandas as pd
import pytest
import yaml
from helpers import FakeRunner, KillAfterNotebook, lock_held_elsewhere
from submitit.core.utils import DelayedSubmission

from vlmsae_utils import executor, executor_jobs, executor_slurm, extract, store, sweep
from vlmsae_utils.cli import build_parser as cli_build_parser
from vlmsae_utils.cli import main as cli_main
from vlmsae_utils.executor_config import ExecutorConfig, parse_executor
from vlmsae_utils.paths import results_root

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# FakeRunner travels to subprocess jobs by value (the tests folder is not importable there).
cloudpickle.register_pickle_by_value(helpers)


def _config(tmp_path: Path, name: str, **changes) -> Path:
    """The fixture sweep under another name, with top-level keys replaced (None removes one); its
    folders start empty (an outputs root set by the user outlives the test session)."""
    shutil.rmtree(sweep.sweep_dir(name), ignore_errors=True)
    shutil.rmtree(results_root() / name, ignore_errors=True)
    config = yaml.safe_load((CONFIGS / "fixture.yaml").read_text()) | {"name": name}
    for key, value in changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _small(tmp_path: Path, name: str, **changes) -> Path:
    """One layer, one SAE: extract train/val, embed val, train, score (5 cells)."""
    sae = yaml.safe_load((CONFIGS / "fixture.yaml").read_text())["sae"] | {"types": ["batch_top_k"], "expansions": [2]}
    return _config(tmp_path, name, layers=[2], sae=sae, hierarchy=None, steering=None, **changes)


# ----------------------------------------------------------------------------- the executor block


@pytest.mark.parametrize(
    ("block", "device", "message"),
    [
        ({"type": "pbs"}, "auto", r"executor\.type: 'pbs' is not one of inline, local, slurm"),
        ({"partiton": "gpu"}, "auto", r"unknown key\(s\) \['partiton'\]"),
        ({"timeout_min": 0}, "auto", r"executor\.timeout_min: expected an integer >= 1, got 0"),
        ({"array_parallelism": True}, "auto", r"executor\.array_parallelism: expected an integer"),
        ({"mem_gb": "lots"}, "auto", r"executor\.mem_gb: expected a number >= 1"),
        ({"resources": {"training": {"gpus": 1}}}, "auto", r"unknown kind of cell 'training'"),
        ({"resources": {"train": {"gpu": 1}}}, "auto", r"resources\.train: unknown key\(s\) \['gpu'\]"),
        ({"resources": {"train": {"gpus": 0}}}, "cuda", r"resources\.train\.gpus: 0 GPUs for train cells"),
        ({"gpus_per_node": 0}, "cuda:1", r"executor\.gpus_per_node: 0 GPUs for extract cells"),
        (
            {"resources": {"score": {"gpus": 4}}},
            "auto",
            r"resources\.score\.gpus: 4 GPUs, but score cells run one process per GPU.*ask for 1",
        ),
        (
            {"resources": {"extract": {"gpus": 4}}},
            "auto",
            r"executor\.resources\.extract\.gpus: 4 GPUs.*set resources\.extract\.tasks: 4",
        ),
        ({"resources": {"train": {"tasks": 2}}}, "auto", r"only extraction cells split over tasks"),
        ({"resources": {"embed": {"tasks": 2}}}, "auto", r"2 tasks need 2 GPUs \(one each\) or 0"),
        ({"sbatch": ["--qos=high"]}, "auto", r"executor\.sbatch: expected a mapping"),
        # a shared sweep file must not end the #SBATCH lines or add a shell command to the job script
        ({"sbatch": {"qos": "normal\nrm -rf ~"}}, "auto", r"executor\.sbatch\.qos: 'normal\\nrm -rf ~' is not allowed"),
        ({"sbatch": {"qos\necho hi": "x"}}, "auto", r"executor\.sbatch: 'qos\\necho hi' is not an sbatch option"),
        ({"partition": "gpu\n#SBATCH --time=9"}, "auto", r"executor\.partition: .* is not allowed in a job script"),
        ({"account": "lab; curl x"}, "auto", r"executor\.account: .* is not allowed"),
        ({"sbatch": {"comment": ["a"]}}, "auto", r"executor\.sbatch\.comment: expected text or a number"),
    ],
)
def test_bad_executor_blocks_name_the_key(tmp_path, block, device, message):
    path = _config(tmp_path, "bad", executor=block, device=device)
    with pytest.raises(sweep.ConfigError, match=message):
        sweep.load_config(path)


def test_resources_come_from_the_block_and_each_kinds_overrides():
    config = parse_executor(
        {"gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 32, "resources": {"train": {"timeout_min": 1440}}}
    )
    assert config.resources_for("extract") == executor.Resources(gpus=1, cpus=4, mem_gb=32.0, timeout_min=240)
    assert config.resources_for("train") == executor.Resources(gpus=1, cpus=4, mem_gb=32.0, timeout_min=1440)
    assert config.with_type("slurm").type == "slurm" and config.with_type(None) is config
    assert parse_executor(None) == ExecutorConfig()  # no block: inline with defaults


def test_the_executor_block_is_not_part_of_any_fingerprint(tmp_path):
    plain = sweep.expand(sweep.load_config(_config(tmp_path, "a")))
    block = {"type": "slurm", "partition": "gpu", "resources": {"train": {"timeout_min": 60}}}
    with_block = sweep.expand(sweep.load_config(_config(tmp_path, "a", executor=block)))
    root = tmp_path / "root"
    assert [sweep._fingerprint(r, root) for r in plain] == [sweep._fingerprint(r, root) for r in with_block]


# ----------------------------------------------------------------------------- planning


def _cells(tmp_path, root: Path, **changes) -> tuple[list[sweep.Run], list[executor.Cell]]:
    runs = sweep.expand(sweep.load_config(_config(tmp_path, "plan", **changes)))
    return runs, executor.plan_cells(runs, root, ExecutorConfig())


def test_groups_share_kind_and_inputs_and_come_after_their_inputs(tmp_path):
    runs, cells = _cells(tmp_path, tmp_path / "root")
    groups = executor.group_jobs(cells)
    assert sum(len(g.cells) for g in groups) == len(runs) == len(cells)
    seen: set[str] = set()
    for group in groups:
        assert {c.run.kind for c in group.cells} == {group.kind}
        assert all(sorted(c.after) == group.after for c in group.cells)  # one array, one dependency list
        assert set(group.after) <= seen  # every input was submitted before
        seen |= {c.run.id for c in group.cells}
    by_id = {c.run.id: c for c in cells}
    for run in runs:  # every dependency of the grid becomes a job dependency
        assert by_id[run.id].after == run.depends


def test_only_unfinished_cells_and_their_dependents_are_planned(tmp_path):
    root = tmp_path / "root"
    runs, _ = _cells(tmp_path, root, hierarchy=None, steering=None)
    sweep.execute(runs, root, runner=FakeRunner(), progress=False)
    assert executor.plan_cells(runs, root, ExecutorConfig()) == []
    (root / "extract/fixture_mini_clip/L2/val/activations/manifest.json").unlink()
    planned = {c.run.id for c in executor.plan_cells(runs, root, ExecutorConfig())}
    assert planned == {
        "extract/fixture_mini_clip/L2/val",
        *(r.id for r in runs if r.kind == "train" and r.labels["layer"] == 2),
        "score/fixture_mini_clip/L2/fixture_scorer",
    }


def test_dry_run_lists_jobs_resources_and_dependencies(tmp_path, capsys):
    block = {"partition": "gpu", "resources": {"train": {"timeout_min": 1440}}}
    path = _small(tmp_path, "dry", executor=block)
    assert cli_main(["--config", str(path), "--executor", "slurm", "--dry-run"]) == 0
    table = capsys.readouterr().out
    train = next(line for line in table.splitlines() if "train/fixture_mini_clip/L2/batch_top_k_x2" in line)
    assert "1 GPU, 8 CPUs, 64 GB, 24:00 h" in train
    assert re.search(r"extract-\d\[0\] extract-\d\[1\]", train)  # waits for both extractions (tasks)
    assert not sweep.sweep_dir("dry").exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- a fake Slurm

FAKE_SBATCH = """#!/bin/bash
# fake sbatch: keeps each submitted script and answers as Slurm does
n=$(( $(cat "$FAKE_SLURM/counter" 2>/dev/null || echo 100) + 1 ))
echo $n > "$FAKE_SLURM/counter"
cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $n"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch, squeue, sacct and srun on PATH; squeue and sacct print what the test writes."""
    state = tmp_path / "slurm"
    bin_dir = state / "bin"
    bin_dir.mkdir(parents=True)
    scripts = {
        "sbatch": FAKE_SBATCH,
        "squeue": '#!/bin/bash\ncat "$FAKE_SLURM/squeue.txt" 2>/dev/null\nexit 0\n',
        "sacct": '#!/bin/bash\ncat "$FAKE_SLURM/sacct.txt" 2>/dev/null\nexit 0\n',
        "srun": "#!/bin/bash\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def _submissions(state: Path) -> dict[str, dict[str, str]]:
    """Every sbatch script submitted so far, as {job id: {option: value}}."""
    scripts = {}
    for path in sorted(state.glob("sbatch_*.sh")):
        options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), flags=re.M))
        scripts[path.stem.removeprefix("sbatch_")] = options
    return scripts


def _records(runs: list[sweep.Run], root: Path) -> dict[str, str]:
    return {r.id: executor_jobs._read_record(root / r.out_dir).get("job_id", "") for r in runs}


SLURM_BLOCK = {
    "partition": "gpu",
    "account": "lab",
    "cpus_per_task": 6,
    "mem_gb": 48,
    "array_parallelism": 2,
    "sbatch": {"qos": "high"},
    "resources": {"train": {"timeout_min": 1440}, "extract": {"tasks": 2, "gpus": 2}},
}


def test_slurm_submission_resources_dependencies_and_arrays(tmp_path, fake_slurm):
    path = _config(tmp_path, "slurm-grid", executor=SLURM_BLOCK, hierarchy=None, steering=None)
    status, results = executor.dispatch(path, executor="slurm", progress=False)
    runs, root = sweep.expand(sweep.load_config(path)), sweep.sweep_dir("slurm-grid")
    assert results == {} and set(status.status) == {"submitted"}
    scripts, jobs = _submissions(fake_slurm), _records(runs, root)
    groups = executor.group_jobs(executor.plan_cells(runs, tmp_path / "empty", ExecutorConfig()))
    assert len(scripts) == len(groups)  # one sbatch per array: the grid in one submission
    for run in runs:
        options = scripts[jobs[run.id].split("_")[0]]
        assert options["partition"] == "gpu" and options["account"] == "lab" and options["qos"] == "high"
        assert options["cpus-per-task"] == "6" and options["mem"] == "49152MB"
        if run.kind == "extract":  # split over 2 tasks, one GPU each
            assert (
                options["ntasks-per-node"] == "2" and options["gpus-per-task"] == "1" and "gpus-per-node" not in options
            )
        else:
            assert options["gpus-per-node"] == "1" and "ntasks-per-node" not in options
        assert options["time"] == ("1440" if run.kind == "train" else "240")
        assert options["kill-on-invalid-dep"] == "yes"
        expected_after = sorted(jobs[dep] for dep in run.depends)
        assert sorted(options.get("dependency", "afterok:").removeprefix("afterok:").split(":")) == sorted(
            expected_after or [""]
        )
    arrays = [o["array"] for o in scripts.values() if "array" in o]
    assert "0-3%2" in arrays  # the 4 SAEs of a layer: one array, at most 2 tasks at once
    assert all(int(a.split("%")[1]) <= 2 for a in arrays)
    logs = root / "train/fixture_mini_clip/L2/batch_top_k_x2"
    assert os.readlink(logs / "job.err").endswith(f"{jobs['train/fixture_mini_clip/L2/batch_top_k_x2']}_0_log.err")


def test_slurm_rerun_keeps_queued_jobs_and_resubmits_only_unfinished_cells(tmp_path, fake_slurm):
    path = _small(tmp_path, "slurm-rerun", executor=SLURM_BLOCK)
    executor.dispatch(path, executor="slurm", progress=False)
    runs, root = sweep.expand(sweep.load_config(path)), sweep.sweep_dir("slurm-rerun")
    jobs = _records(runs, root)
    (fake_slurm / "squeue.txt").write_text("".join(f"{j}|PENDING\n" for j in jobs.values()))
    status, _ = executor.dispatch(path, executor="slurm", progress=False)
    assert len(_submissions(fake_slurm)) == len(set(j.split("_")[0] for j in jobs.values()))  # nothing new
    assert set(status.status) == {"queued"}

    # The cluster runs the submitted pickles: every cell but the val extraction, which fails.
    val = "extract/fixture_mini_clip/L2/val"
    for run in runs:
        job_id = jobs[run.id]
        pickle = root / executor.JOBS_DIR / run.kind / job_id / f"{job_id}_submitted.pkl"
        cell = DelayedSubmission.load(pickle)
        assert isinstance(cell.function, executor.CellJob) and cell.function.run.id == run.id
        cell.function.runner = FakeRunner(fail={val})
        if run.id == val:
            with pytest.raises(executor.CellFailed, match="injected"):
                cell.result()
        elif not set(run.depends) & {val, *[r.id for r in runs if val in r.depends]}:
            assert cell.result() == run.id
    (fake_slurm / "squeue.txt").write_text("")
    (fake_slurm / "sacct.txt").write_text(f"{jobs[val]}|FAILED\n")
    states = executor.cell_states(runs, root).set_index("run")
    assert states.loc[val, "status"] == "failed" and "injected" in states.loc[val, "message"]
    assert states.loc["train/fixture_mini_clip/L2/batch_top_k_x2", "status"] == "blocked"
    assert states.loc["extract/fixture_mini_clip/L2/train", "status"] == "done"

    before = set(_submissions(fake_slurm))
    executor.dispatch(path, executor="slurm", progress=False)
    new = {job: opts for job, opts in _submissions(fake_slurm).items() if job not in before}
    resubmitted = {r.id for r in runs if _records(runs, root)[r.id].split("_")[0] in new}
    assert resubmitted == {
        val,
        "train/fixture_mini_clip/L2/batch_top_k_x2",
        "score/fixture_mini_clip/L2/fixture_scorer",
    }


def test_slurm_without_sbatch_is_an_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(executor.ExecutorError, match="sbatch is not on PATH"):
        executor.dispatch(_small(tmp_path, "no-slurm"), executor="slurm", progress=False)
    assert not sweep.sweep_dir("no-slurm").exists()


def test_a_queued_job_for_other_parameters_is_refused(tmp_path, fake_slurm):
    path = _small(tmp_path, "slurm-changed", executor=SLURM_BLOCK)
    executor.dispatch(path, executor="slurm", progress=False)
    runs, root = sweep.expand(sweep.load_config(path)), sweep.sweep_dir("slurm-changed")
    (fake_slurm / "squeue.txt").write_text("".join(f"{j}|PENDING\n" for j in _records(runs, root).values()))
    changed = yaml.safe_load(path.read_text())
    changed["sae"]["steps"] = 400
    path.write_text(yaml.safe_dump(changed))
    with pytest.raises(executor.ExecutorError, match=r"still queued for other parameters; cancel it \(scancel"):
        executor.dispatch(path, executor="slurm", progress=False)


# ----------------------------------------------------------------------------- local subprocess jobs


@pytest.mark.slow
def test_local_jobs_a_killed_cell_is_resubmitted_and_finished_cells_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "gather", lambda *args: {})  # FakeRunner's outputs are not tables
    path = _small(tmp_path, "local-kill")
    runs, root = sweep.expand(sweep.load_config(path)), sweep.sweep_dir("local-kill")
    log = tmp_path / "calls.txt"
    killed = "train/fixture_mini_clip/L2/batch_top_k_x2"
    status, _ = executor.dispatch(path, executor="local", progress=False, runner=FakeRunner(kill={killed}, log=log))
    status = status.set_index("run")
    assert status.loc[killed, "status"] == "failed" and "without finishing" in status.loc[killed, "message"]
    assert status.loc["score/fixture_mini_clip/L2/fixture_scorer", "status"] == "blocked"
    assert (status.status == "ran").sum() == len(runs) - 2
    assert (root / killed / "job.err").exists()  # the log lies beside the cell's outputs

    log.write_text("")
    status, _ = executor.dispatch(path, executor="local", progress=False, runner=FakeRunner(log=log))
    rerun = {Path(line).relative_to(root).as_posix() for line in log.read_text().split()}
    assert rerun == {killed, "score/fixture_mini_clip/L2/fixture_scorer"}
    assert set(status.set_index("run").drop(index=list(rerun)).status) == {"done earlier"}


def _tables() -> dict[str, pd.DataFrame]:
    folder = results_root() / "fixture"
    return {p.name: pd.read_csv(p, dtype={"layer": str}) for p in sorted(folder.glob("*.csv"))}


def _assert_same_tables(tables: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    assert tables.keys() == expected.keys()
    for name, table in tables.items():
        pd.testing.assert_frame_equal(table, expected[name], obj=name)


@pytest.mark.slow
def test_kill_rerun_concurrent_and_changed_input_on_the_fixture_sweep(tmp_path, fixture_results):
    """The provenance matrix over notebooks 01-04 on the fixture sweep, cells run as local subprocess
    jobs: a rerun does nothing; a second sweep is refused; a cell held by another writer fails and
    is redone later; a retraining killed after writing its files is never gathered beside the old
    numbers; and the jobs give back exactly the inline runner's tables (01 embed, 02 train, 03 score,
    04 hierarchy redone here). Ends with the fixture sweep as it found it."""
    path, root = CONFIGS / "fixture.yaml", sweep.sweep_dir("fixture")
    inline = _tables()
    status, _ = executor.dispatch(path, executor="local", progress=False)
    assert set(status.status) == {"done earlier"}  # rerun: nothing runs

    with lock_held_elsewhere(root) as pid, pytest.raises(sweep.SweepLockedError, match=f"pid {pid}"):
        executor.dispatch(path, executor="local", progress=False)

    score_l2 = "score/fixture_mini_clip/L2/fixture_scorer"
    for run in ("embed/fixture_scorer/val", score_l2):  # 01 and both 03 runs are redone
        (root / run / sweep.DONE_FILE).unlink()
    with lock_held_elsewhere(root / score_l2) as pid:
        status = executor.dispatch(path, executor="local", progress=False)[0].set_index("run")
    assert status.loc[score_l2, "status"] == "failed" and f"pid {pid}" in status.loc[score_l2, "message"]
    assert status.loc["score/fixture_mini_clip/Llast/fixture_scorer", "status"] == "ran"
    assert set(_tables()["sae.csv"].layer) == {"last"}  # layer 2's rows wait for its score run
    status = executor.dispatch(path, executor="local", progress=False)[0].set_index("run")
    assert status.loc[score_l2, "status"] == "ran"
    _assert_same_tables(_tables(), inline)

    changed = yaml.safe_load(path.read_text())
    changed["hierarchy"]["steps"] = 200  # the hierarchy SAE is retrained (02), then 04 redone
    changed_path = tmp_path / "fixture.yaml"
    changed_path.write_text(yaml.safe_dump(changed))
    hierarchy_sae, hierarchy_run = "train/fixture_mini_clip/L2/hierarchy", "hierarchy/fixture_mini_clip/L2"
    killer = KillAfterNotebook({hierarchy_sae})
    status = executor.dispatch(changed_path, executor="local", progress=False, runner=killer)[0].set_index("run")
    assert status.loc[hierarchy_sae, "status"] == "failed" and status.loc[hierarchy_run, "status"] == "blocked"
    assert "without finishing" in status.loc[hierarchy_sae, "message"]  # killed after its notebook, not failed
    assert "hierarchy.csv" not in _tables()  # never the old table beside the half-redone SAE

    # Back to the original config: the killed cell's folder (another SAE) is cleared and both are redone.
    status = executor.dispatch(path, executor="local", progress=False)[0]
    assert set(status[status.status == "ran"].run) == {hierarchy_sae, hierarchy_run}
    _assert_same_tables(_tables(), inline)


def test_status_shows_queued_jobs_from_the_queue(tmp_path, fake_slurm, capsys):
    path = _small(tmp_path, "slurm-status", executor=SLURM_BLOCK)
    assert cli_main(["--config", str(path), "--executor", "slurm"]) == 0
    assert "jobs are queued" in capsys.readouterr().out
    runs, root = sweep.expand(sweep.load_config(path)), sweep.sweep_dir("slurm-status")
    jobs = _records(runs, root)
    extract = "extract/fixture_mini_clip/L2/train"
    queue = [f"{job}|{'RUNNING' if run == extract else 'PENDING'}" for run, job in jobs.items()]
    (fake_slurm / "squeue.txt").write_text("\n".join(queue) + "\n")
    assert cli_main(["--config", str(path), "--status"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " running " in lines[extract] and jobs[extract] in lines[extract]
    assert " queued " in lines["score/fixture_mini_clip/L2/fixture_scorer"]


@pytest.mark.slow
def test_an_extraction_split_over_two_tasks_writes_the_single_process_store(tmp_path):
    """``resources: {extract: {tasks: N}}``: the N processes of one job write alternate shards, the
    one that writes the last runs notebook 01 on the finished store; the store is bit for bit the
    one a single process writes."""
    block = {"gpus_per_node": 0, "resources": {"extract": {"tasks": 2}}}
    config = sweep.load_config(_small(tmp_path, "split-extract", executor=block, batch_size=4))
    settings, root = config.executor, sweep.sweep_dir("split-extract")
    val = next(r for r in sweep.expand(config) if r.id == "extract/fixture_mini_clip/L2/val")
    assert settings.resources_for("extract").describe().startswith("2 tasks: 0 GPU")
    status = executor.run_local([executor.Cell(val, settings.resources_for("extract"))], root, settings, progress=False)
    assert status.status.tolist() == ["ran"], status.message.tolist()
    split = store.ActivationStore.open(root / val.out_dir / "activations", verify=True)
    assert len(split.manifest["shards"]) == 2  # 128 images in shards of 16 batches of 4: one per task
    single = sweep.resolved_parameters(val, root) | {"out_dir": str(tmp_path / "single")}
    assert extract.extract_share(single, rank=0, world_size=1)
    one_process = store.ActivationStore.open(tmp_path / "single" / "activations")
    assert split.manifest["content_hash"] == one_process.manifest["content_hash"]
    assert (root / val.out_dir / "01_extract.ipynb").is_file() and sweep.is_complete(val, root)


def test_status_of_local_jobs_running_and_dead(tmp_path):
    runs = sweep.expand(sweep.load_config(_small(tmp_path, "local-status")))
    root = tmp_path / "root"
    alive, dead = runs[0], runs[1]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for run, pid in ((alive, os.getpid()), (dead, int(finished.stdout))):
        (root / run.out_dir).mkdir(parents=True)
        (root / run.out_dir / sweep.JOB_FILE).write_text(f'{{"executor": "local", "job_id": "{pid}"}}')
    states = executor.cell_states(runs, root).set_index("run").status
    assert states[alive.id] == "running" and states[dead.id] == "failed"
    stopped = {dead.id}  # a failed input blocks its dependents, theirs in turn; the rest never ran
    for run in runs[2:]:
        blocked = bool(stopped & set(run.depends))
        stopped |= {run.id} if blocked else set()
        assert states[run.id] == ("blocked" if blocked else "not submitted"), run.id


def test_wait_returns_the_final_states_once_nothing_is_queued(tmp_path, fake_slurm, monkeypatch):
    path = _small(tmp_path, "slurm-wait", executor=SLURM_BLOCK)
    runs = sweep.expand(sweep.load_config(path))
    polls = []
    monkeypatch.setattr(executor_slurm.time, "sleep", lambda seconds: polls.append(seconds))

    def queue_empties(command):  # pending at the first look, then gone and failed in the accounting
        if command[0] == "squeue" and not polls:
            return [f"{job}|PENDING" for job in _records(runs, sweep.sweep_dir("slurm-wait")).values()]
        return [f"{job}|FAILED" for job in _records(runs, sweep.sweep_dir("slurm-wait")).values()] * (
            command[0] == "sacct"
        )

    monkeypatch.setattr(executor_slurm, "_query", queue_empties)
    status, results = executor.dispatch(path, executor="slurm", wait=True, progress=False)
    assert len(polls) == 1 and results == {}
    assert set(status.status) == {"failed", "blocked"}  # final states, not "submitted"


# ----------------------------------------------------------------------------- a new executor


class InOrderExecutor(executor.JobExecutor):
    """A test's executor: the cells in order in this process through ``sweep.execute_run``, recording
    what it ran (the recipe of CONTRIBUTING, "Recipe: add an executor")."""

    name = "in_order"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run_cells(self, plan, options):
        rows = []
        for cell in plan.cells:
            state, message = sweep.execute_run(cell.run, plan.root, options.runner)
            self.ran.append(cell.run.id)
            rows.append({"run": cell.run.id, "notebook": cell.run.notebook, "status": state, "message": message})
        return executor_jobs.with_finished(
            plan.runs, pd.DataFrame(rows, columns=["run", "notebook", "status", "message"])
        )


@pytest.fixture
def in_order():
    registered = executor.register_executor(InOrderExecutor())
    yield registered
    executor.unregister_executor("in_order")


def test_an_executor_registered_from_a_test_module_runs_a_sweep(tmp_path, monkeypatch, in_order):
    """No edit to the package: the sweep file's ``executor: type:`` and ``--executor`` accept it,
    ``dispatch`` runs the cells through it, a rerun finds them done; once unregistered it is refused."""
    monkeypatch.setattr(sweep, "gather", lambda *args: {})  # FakeRunner's outputs are not tables
    path = _small(tmp_path, "in-order", executor={"type": "in_order"})
    runs = sweep.expand(sweep.load_config(path))
    status, _ = executor.dispatch(path, progress=False, runner=FakeRunner())
    assert in_order.ran == [r.id for r in runs] and set(status.status) == {"ran"}
    again, _ = executor.dispatch(path, executor="in_order", progress=False, runner=FakeRunner())
    assert set(again.status) == {"done earlier"} and len(in_order.ran) == len(runs)
    assert "in_order" in cli_build_parser()._option_string_actions["--executor"].choices
    executor.unregister_executor("in_order")
    with pytest.raises(sweep.ConfigError, match="'in_order' is not one of inline, local, slurm"):
        sweep.load_config(path)
    executor.register_executor(in_order)  # for the fixture's teardown
