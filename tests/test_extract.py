"""Extraction into the sharded store: content, bad files, resume, multi-process, errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae_utils import data, encoders, extract, hooks, scoring, store, store_format


@pytest.fixture(scope="module")
def small_set(fixture, tmp_path_factory):
    """Three fixture classes × 5 images, plus an empty file and a text file posing as images."""
    root = tmp_path_factory.mktemp("small") / "imgs"
    for folder in sorted((fixture.images / "train").iterdir())[:3]:
        target = root / "train" / folder.name
        target.mkdir(parents=True)
        for path in sorted(folder.glob("*.png"))[:5]:
            shutil.copy(path, target / path.name)
    bad = root / "train" / sorted((fixture.images / "train").iterdir())[1].name
    (bad / "zz_empty.png").write_bytes(b"")
    (bad / "zz_text.jpg").write_text("not an image")
    return data.ImageFolderDataset(root, "train")


@pytest.fixture(scope="module")
def clip():
    return encoders.load_encoder("fixture:clip")


def _extract(encoder, dataset, out, **kwargs):
    kwargs = {"batch_size": 4, "shard_images": 8, "progress": False} | kwargs
    return extract.extract_activations(encoder, dataset, out, **kwargs)


def test_rows_match_single_image_forward_and_ids(clip, small_set, tmp_path):
    st = _extract(clip, small_set, tmp_path / "s")
    assert len(st.image_ids) == 15 and len(st) == 15 and st.dim == 32
    assert {p for p, _ in st.skipped} == {
        r.image_id for r in small_set if r.image_id.endswith(("zz_empty.png", "zz_text.jpg"))
    }
    rows = st.to_tensor()
    ids = small_set.image_ids
    for position in (0, 7, 14):
        image_id = st.image_ids[position]
        image = small_set.load(ids.index(image_id))
        expected = clip.activations(clip.preprocess([image]), "post_mlp_residual", -2, "cls")
        torch.testing.assert_close(rows[position], expected[0], atol=1e-5, rtol=1e-5)
    assert [small_set[ids.index(i)].class_name for i in st.image_ids] == st.class_names


def test_store_does_not_depend_on_decoding_workers(clip, small_set, tmp_path):
    serial = _extract(clip, small_set, tmp_path / "w0", tokens="random_k", random_k=2, num_workers=0)
    parallel = _extract(clip, small_set, tmp_path / "w2", tokens="random_k", random_k=2, num_workers=2)
    assert serial.manifest["content_hash"] == parallel.manifest["content_hash"]
    assert serial.skipped == parallel.skipped and len(serial.skipped) == 2
    one_shard = _extract(
        clip, small_set, tmp_path / "big", tokens="random_k", random_k=2, num_workers=2, batch_size=4, shard_images=16
    )
    torch.testing.assert_close(one_shard.to_tensor(), serial.to_tensor(), atol=1e-5, rtol=1e-5)


def test_bad_num_workers_fails_before_any_work(clip, small_set, tmp_path):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
            _extract(clip, small_set, tmp_path / "bad", num_workers=bad)
    assert not (tmp_path / "bad").exists()


def test_random_tokens_do_not_depend_on_batching(clip, small_set, tmp_path):
    a = _extract(clip, small_set, tmp_path / "a", tokens="random_k", random_k=3, batch_size=4, shard_images=8)
    b = _extract(clip, small_set, tmp_path / "b", tokens="random_k", random_k=3, batch_size=2, shard_images=2)
    assert len(a) == 45 and a.rows_per_image == 3
    np.testing.assert_array_equal(a.row_image_index()[:7], [0, 0, 0, 1, 1, 1, 2])
    torch.testing.assert_close(a.to_tensor(), b.to_tensor(), atol=1e-5, rtol=1e-5)


def test_interrupted_run_resumes_bit_identical(clip, small_set, tmp_path, monkeypatch):
    reference = _extract(clip, small_set, tmp_path / "ref", tokens="random_k")
    original = store.StoreWriter.write_shard
    calls = {"n": 0}

    def crash_on_second_shard(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(store.StoreWriter, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _extract(clip, small_set, tmp_path / "resumed", tokens="random_k")
    with pytest.raises(store.StoreError, match="resume"):
        store.ActivationStore.open(tmp_path / "resumed")
    monkeypatch.setattr(store.StoreWriter, "write_shard", original)
    written = []
    monkeypatch.setattr(
        store.StoreWriter,
        "write_shard",
        lambda self, shard, *a, **k: (written.append(shard), original(self, shard, *a, **k)),
    )
    resumed = _extract(clip, small_set, tmp_path / "resumed", tokens="random_k")
    assert written == [1, 2]  # shard 0 was kept from the interrupted run
    assert resumed.manifest["content_hash"] == reference.manifest["content_hash"]
    assert torch.equal(resumed.to_tensor(), reference.to_tensor())


def test_rerun_with_other_parameters_is_refused(clip, small_set, tmp_path):
    _extract(clip, small_set, tmp_path / "s")
    assert len(_extract(clip, small_set, tmp_path / "s")) == 15  # same parameters: the finished store
    with pytest.raises(store.StoreError, match="differs in: layer"):
        _extract(clip, small_set, tmp_path / "s", layer=1)


def test_float16_round_trip_and_batches(clip, small_set, tmp_path):
    full = _extract(clip, small_set, tmp_path / "f32").to_tensor()
    half = _extract(clip, small_set, tmp_path / "f16", dtype="float16")
    assert half.dtype == "float16" and half.nbytes == 15 * 32 * 2
    torch.testing.assert_close(half.to_tensor(), full, atol=2e-3 * full.abs().max().item(), rtol=1e-3)
    ordered = torch.cat(list(half.iter_batches(4)))
    assert torch.equal(ordered, half.to_tensor())
    shuffled = list(half.iter_batches(4, shuffle=True, seed=3))
    assert [len(b) for b in shuffled] == [4, 4, 4, 3]
    again = torch.cat(list(half.iter_batches(4, shuffle=True, seed=3)))
    assert torch.equal(torch.cat(shuffled), again)
    assert not torch.equal(torch.cat(shuffled), ordered)
    assert torch.equal(torch.cat(shuffled).sort(0).values, ordered.sort(0).values)


def test_open_refuses_inconsistent_folders(clip, small_set, tmp_path):
    path = tmp_path / "s"
    _extract(clip, small_set, path)
    manifest = json.loads((path / "manifest.json").read_text())
    first = path / manifest["shards"][0]["file"]
    np.save(first, np.zeros((3, 32), np.float32))
    with pytest.raises(store.StoreError, match="shape"):
        store.ActivationStore.open(path)
    first.unlink()
    with pytest.raises(store.StoreError, match="missing"):
        store.ActivationStore.open(path)
    with pytest.raises(FileNotFoundError):
        store.ActivationStore.open(tmp_path / "nothing")


def test_verify_detects_corrupted_bytes(clip, small_set, tmp_path):
    path = tmp_path / "s"
    st = _extract(clip, small_set, path)
    shard = path / st.manifest["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(store.StoreError, match="SHA-256"):
        store.ActivationStore.open(path, verify=True)
    opened = store.ActivationStore.open(path)  # shapes still agree: opening alone reads no rows
    for read in (opened.to_tensor, lambda: next(opened.iter_batches(4)), lambda: opened.rows_at([0])):
        with pytest.raises(store.StoreError, match="does not match the SHA-256 in its manifest"):
            read()  # the first read of the shard's rows in this process checks them


def test_a_shard_is_hashed_once_per_process_and_again_when_it_changes(clip, small_set, tmp_path, monkeypatch):
    path = tmp_path / "s"
    _extract(clip, small_set, path)
    intact = store.ActivationStore.open(path).to_tensor()  # hashed while read into memory
    shard = path / "shards" / "shard-00000.npy"
    calls = []
    original = store_format.sha256_file
    monkeypatch.setattr(store_format, "sha256_file", lambda file: calls.append(file) or original(file))
    again = store.ActivationStore.open(path)
    assert torch.equal(torch.cat(list(again.iter_batches(4))), intact) and calls == []  # not hashed twice
    raw = bytearray(shard.read_bytes())
    raw[-2] ^= 0x01
    shard.write_bytes(bytes(raw))  # a new modification time: checked again
    with pytest.raises(store.StoreError, match="does not match the SHA-256"):
        store.ActivationStore.open(path).arrays()
    assert calls == [shard]


def _edit_manifest(path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_names_only_files_of_its_own_store(clip, small_set, tmp_path):
    path = tmp_path / "s"
    st = _extract(clip, small_set, path)
    outside = tmp_path / "outside.npy"
    outside.write_bytes((path / st.manifest["shards"][0]["file"]).read_bytes())  # a valid shard, elsewhere
    for name in ("../outside.npy", str(outside), "shards/../../outside.npy"):
        _edit_manifest(path, lambda m, name=name: m["shards"][0].update(file=name))
        with pytest.raises(store.StoreError, match="lies outside the store's shards/ folder"):
            store.ActivationStore.open(path)


def test_verify_detects_a_hand_edited_manifest(clip, small_set, tmp_path):
    path = tmp_path / "s"
    _extract(clip, small_set, path)
    written = (path / "manifest.json").read_text()
    _edit_manifest(path, lambda m: m["image_ids"].reverse())  # same rows, other images: labels shift
    with pytest.raises(store.StoreError, match="content_hash disagrees"):
        store.ActivationStore.open(path, verify=True)
    for edit in (
        lambda m: m["image_ids"].reverse(),
        lambda m: m["class_names"].reverse(),
        lambda m: m["params"].update(layer=0),
        lambda m: m.update(content_hash="0" * 64),
    ):
        (path / "manifest.json").write_text(written)
        _edit_manifest(path, edit)
        with pytest.raises(store.StoreError, match=r"manifest\.json was edited after the store was written"):
            store.ActivationStore.open(path)
    (path / "manifest.json").write_text(written)
    _edit_manifest(path, lambda m: m["class_names"].pop())
    with pytest.raises(store.StoreError, match="do not match its class names"):
        store.ActivationStore.open(path)
    (path / "manifest.json").write_text(written)
    assert len(store.ActivationStore.open(path, verify=True)) == 15


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hook": "pre_mlp"}, "unknown hook"),
        ({"tokens": "cls_and_mean"}, "unknown token mode"),
        ({"tokens": "random_k", "random_k": 0}, "random_k must be"),
        ({"layer": 4}, "out of range"),
        ({"layer": None}, "needs a layer"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"hook": "post_projection", "tokens": "random_k"}, "one vector per image"),
        ({"shard_images": 6}, "multiple of batch_size"),
    ],
)
def test_bad_parameters_fail_before_work(clip, small_set, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _extract(clip, small_set, tmp_path / "s", **kwargs)
    assert not (tmp_path / "s" / "plan.json").exists()


def test_unwritable_out_dir_and_missing_data(clip, small_set, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        _extract(clip, small_set, blocker / "sub")
    with pytest.raises(ValueError, match="data_dir is empty"):
        extract.open_dataset("", "train")
    with pytest.raises(FileNotFoundError):
        extract.open_dataset(tmp_path / "missing", "train")


def test_siglip_refuses_cls_tokens(small_set, tmp_path):
    with pytest.raises(ValueError, match="no CLS token"):
        _extract(encoders.load_encoder("fixture:siglip"), small_set, tmp_path / "s", tokens="cls")


def test_scorer_embeddings_share_the_format(small_set, tmp_path):
    dino = encoders.load_encoder("fixture:dinov2")
    emb = extract.extract_embeddings(dino, small_set, tmp_path / "e", batch_size=4, progress=False)
    assert emb.params["hook"] == "post_projection" and emb.dim == 32 and len(emb) == 15
    image = small_set.load(small_set.image_ids.index(emb.image_ids[0]))
    torch.testing.assert_close(emb.to_tensor()[0], dino.embed_images(dino.preprocess([image]))[0], atol=1e-5, rtol=1e-5)


def _rank_main(rank: int, world_size: int, root: str, out: str, init_file: str) -> None:
    """One process of a 2-process gloo extraction."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset = data.ImageFolderDataset(root, "train")
        extract.extract_activations(
            "fixture:clip", dataset, out, tokens="random_k", batch_size=4, shard_images=4, progress=False
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(clip, small_set, tmp_path):
    single = _extract(clip, small_set, tmp_path / "one", tokens="random_k", shard_images=4)
    torch.multiprocessing.spawn(
        _rank_main, args=(2, str(small_set.root), str(tmp_path / "two"), str(tmp_path / "init")), nprocs=2, join=True
    )
    double = store.ActivationStore.open(tmp_path / "two", verify=True)
    assert double.image_ids == single.image_ids
    assert double.manifest["content_hash"] == single.manifest["content_hash"]


def test_rows_at_and_sample_rows_read_the_right_rows(clip, small_set, tmp_path):
    st = _extract(clip, small_set, tmp_path / "rows", tokens="random_k", random_k=2)  # 30 rows in 4 shards
    every = st.to_numpy()
    picks = np.array([29, 0, 17, 8, 8])
    np.testing.assert_array_equal(st.rows_at(picks), every[picks])
    np.testing.assert_array_equal(st.sample_rows(100), every)
    sample = st.sample_rows(7, seed=3)
    assert sample.shape == (7, st.dim)
    assert all(any(np.array_equal(row, other) for other in every) for row in sample)
    np.testing.assert_array_equal(sample, st.sample_rows(7, seed=3))
    with pytest.raises(IndexError, match=r"0..29"):
        st.rows_at([30])


# ----------------------------------------------------------------------------- hook points as data (issue 13, item 4)


def test_extract_through_a_hook_registered_at_runtime(clip, small_set, tmp_path):
    """The recipe of CONTRIBUTING.md: one HookSpec, no package edit, and extraction works there."""
    spec = hooks.HookSpec(
        "mlp_output",
        per_block=True,
        layout=hooks.TOKENS,
        locate=hooks.block_child("mlp"),
        description="output of the MLP inside a block, before the residual add",
    )
    hooks.register_hook(spec)
    try:
        st = _extract(clip, small_set, tmp_path / "s", hook="mlp_output", layer=-2, tokens="mean")
        every = _extract(clip, small_set, tmp_path / "all", hook="mlp_output", layer=1, tokens="all")
        position = 3
        image = small_set.load(small_set.image_ids.index(st.image_ids[position]))
        expected = clip.activations(clip.preprocess([image]), "mlp_output", -2, "mean")[0]
        with pytest.raises(ValueError, match="needs a layer"):
            _extract(clip, small_set, tmp_path / "bad", hook="mlp_output", layer=None)
    finally:
        hooks.unregister_hook("mlp_output")
    assert st.params["hook"] == "mlp_output" and st.params["layer"] == clip.num_layers - 2 and st.dim == 32
    torch.testing.assert_close(st.to_tensor()[position], expected, atol=1e-5, rtol=1e-5)
    assert every.rows_per_image == clip.capture(clip.preprocess([image]), "post_mlp_residual", 1).shape[1]
    assert not (st.to_tensor() == _extract(clip, small_set, tmp_path / "res", tokens="mean").to_tensor()).all()


def test_a_global_hook_ignores_the_layer_in_extraction(small_set, tmp_path):
    """The sweep's ``last`` layer passes layer -1 with post_projection; the store records no layer."""
    dino = encoders.load_encoder("fixture:dinov2")
    st = _extract(dino, small_set, tmp_path / "e", hook="post_projection", layer=-1)
    assert st.params["layer"] is None and st.dim == dino.output_dim("post_projection") and st.rows_per_image == 1


def _truncate(path) -> None:
    """Cut a file to half its size, as a full disk or an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_shard_is_named_on_open_and_redone_before_finalize(tmp_path):
    from helpers import write_shards, write_store

    x = torch.randn(50, 4)
    finished = write_store(tmp_path / "done", x, shard_images=20)
    _truncate(finished.path / "shards" / "shard-00001.npy")
    with pytest.raises(store.StoreError, match=r"shard .*shard-00001\.npy is truncated or unreadable"):
        store.ActivationStore.open(finished.path)

    writer = write_shards(tmp_path / "resumed", x, shard_images=20)
    _truncate(tmp_path / "resumed" / "shards" / "shard-00002.npy")  # damaged before the manifest is written
    with pytest.raises(store.StoreError, match=r"shard-00002\.npy .*rerun the extraction"):
        writer.finalize()
    assert not writer.shard_done(2) and writer.shard_done(1)  # only the damaged shard is redone
    rows = writer.plan.shard_range(2)
    writer.write_shard(2, x[rows.start : rows.stop].numpy(), list(rows), [])
    assert torch.equal(writer.finalize().to_tensor(), x)


def test_images_fixed_after_an_extraction_are_read_again(clip, fixture, tmp_path, caplog):
    """Shards and skip verdicts used to be keyed by path only: replacing a broken file with a good
    one still gave the old verdict. Now each shard records its files' size and mtime, and a rerun
    extracts the shards whose files changed — the result equals a fresh extraction."""
    root = tmp_path / "imgs"
    good = sorted(sorted((fixture.images / "train").iterdir())[0].glob("*.png"))[:6]
    target = root / "train" / "a"
    target.mkdir(parents=True)
    for path in good[:5]:
        shutil.copy(path, target / path.name)
    broken = target / "zz_broken.png"
    broken.write_bytes(b"\x89PNG broken")
    first = _extract(clip, data.ImageFolderDataset(root, "train"), tmp_path / "s", batch_size=2, shard_images=2)
    assert [p for p, _ in first.skipped] == ["train/a/zz_broken.png"] and len(first) == 5

    shutil.copy(good[5], broken)  # the user fixes the file under the same name
    with caplog.at_level("WARNING"):
        again = _extract(clip, data.ImageFolderDataset(root, "train"), tmp_path / "s", batch_size=2, shard_images=2)
    assert "changed since shard(s) [2]" in caplog.text  # only the shard holding that file
    assert again.skipped == [] and len(again) == 6
    fresh = _extract(clip, data.ImageFolderDataset(root, "train"), tmp_path / "fresh", batch_size=2, shard_images=2)
    assert again.manifest["content_hash"] == fresh.manifest["content_hash"]

    caplog.clear()
    with caplog.at_level("WARNING"):
        _extract(clip, data.ImageFolderDataset(root, "train"), tmp_path / "s", batch_size=2, shard_images=2)
    assert "changed" not in caplog.text  # unchanged files: the finished store is reused as is


def test_rows_computed_elsewhere_become_a_store(tmp_path):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    classes = ["a", "a", "b", "b", "c", "c"]
    written = store.write_rows(tmp_path / "rows", rows, classes, params={"made": "by hand"}, shard_images=4)
    again = store.ActivationStore.open(tmp_path / "rows", verify=True)
    assert np.array_equal(again.to_numpy(), rows) and again.class_names == classes
    assert len(again.manifest["shards"]) == 2 and again.manifest["content_hash"] == written.manifest["content_hash"]
    with pytest.raises(ValueError, match=r"one class per row, got \(6, 4\) and 5"):
        store.write_rows(tmp_path / "bad", rows, classes[:5], params={})
    with pytest.raises(store.StoreError, match="different parameters"):
        store.write_rows(tmp_path / "rows", rows, classes, params={"made": "otherwise"})
    nan_rows = rows.copy()
    nan_rows[4, 1], nan_rows[2, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=re.escape("rows contain NaN/inf values; first bad rows: [2, 4]")):
        store.write_rows(tmp_path / "nan", nan_rows, classes, params={})
    big = rows.copy()
    big[3, 2] = 70_000.0  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=re.escape("shard 0: values up to 7e+04 overflow float16 (max 65504)")):
        store.write_rows(tmp_path / "big", big, classes, params={}, dtype="float16", shard_images=8)
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_a_sweep_redoes_an_extraction_whose_images_changed_and_every_stage_after_it(clip, small_set, tmp_path):
    """Issue 32: after an image was replaced, a rerun reported extraction and training "done earlier"."""
    from vlmsae_utils import sweep
    from vlmsae_utils.sweep_plan import Run

    images = tmp_path / "imgs"
    shutil.copytree(small_set.root, images)
    made: list[str] = []

    def runner(notebook, params, out):  # notebook 01 as it extracts; notebook 02 leaves its table
        made.append(out.name)
        if notebook == "01":
            _extract(clip, data.ImageFolderDataset(params["data_dir"], params["split"]), out / "activations")
        else:
            (out / "results.csv").write_text("x")

    runs = [
        Run("extract", "01", "extract", {"data_dir": str(images), "split": "train"}),
        Run("train", "02", "train", {"train_store": "extract/activations"}, depends=["extract"]),
    ]

    def statuses() -> list[str]:
        return list(sweep.execute(runs, tmp_path / "sweep", runner=runner, progress=False).status)

    assert statuses() == ["ran", "ran"]
    assert statuses() == ["done earlier", "done earlier"]
    pictures = sorted(images.rglob("*.png"))
    pictures[0].write_bytes(pictures[-1].read_bytes())  # another picture under the same name
    assert sweep.stale_images(runs[0], tmp_path / "sweep").endswith("were replaced since they were read")
    assert statuses() == ["ran", "ran"] and made == ["extract", "train"] * 2
    shutil.copy(pictures[1], pictures[1].with_name("zz_added.png"))
    assert "1 images added" in sweep.stale_images(runs[0], tmp_path / "sweep")
    assert statuses() == ["ran", "ran"] and statuses() == ["done earlier", "done earlier"]


def test_a_copied_data_home_keeps_its_stores(clip, small_set, tmp_path, monkeypatch):
    """Issue 32: a data home copied to another machine refused every default store ("differs in:
    data_root"). Roots inside the home are recorded as $VLMSAE_HOME/…; older stores that recorded the
    absolute root are accepted when that root is the only difference."""
    from vlmsae_utils.store_format import manifest_digest

    first, second = tmp_path / "home-a", tmp_path / "home-b"
    shutil.copytree(small_set.root, first / "imgs")
    monkeypatch.setenv("VLMSAE_HOME", str(first))
    made = _extract(clip, data.ImageFolderDataset(first / "imgs", "train"), first / "store")
    assert made.params["data_root"] == "$VLMSAE_HOME/imgs"
    assert scoring.store_image_loader(made)(0).size == Image.open(first / "imgs" / made.image_ids[0]).size

    def legacy(home):  # as a store written before: the absolute root of the home it was made in
        plan = json.loads((home / "store" / "plan.json").read_text())
        plan["params"]["data_root"] = str(first / "imgs")
        fingerprint = store.StorePlan(**{k: plan[k] for k in store.StorePlan.__dataclass_fields__}).fingerprint()
        for name in ("plan.json", "manifest.json"):
            record = json.loads((home / "store" / name).read_text())
            record["params"]["data_root"], record["fingerprint"] = str(first / "imgs"), fingerprint
            if name == "manifest.json":
                record["manifest_sha256"] = manifest_digest(record)
            (home / "store" / name).write_text(json.dumps(record))

    for old_style in (False, True):
        shutil.rmtree(second, ignore_errors=True)
        if old_style:
            legacy(first)
        shutil.copytree(first, second)  # mtimes kept, as cp -a or rsync -a keep them
        monkeypatch.setenv("VLMSAE_HOME", str(second))
        again = _extract(clip, data.ImageFolderDataset(second / "imgs", "train"), second / "store")
        assert torch.equal(again.to_tensor(), made.to_tensor())
        assert again.manifest["content_hash"] == made.manifest["content_hash"]
    monkeypatch.setenv("VLMSAE_HOME", str(first))
    with pytest.raises(store.StoreError, match="differs in: data_root"):  # another folder: still refused
        _extract(clip, data.ImageFolderDataset(second / "imgs", "train"), first / "store")
