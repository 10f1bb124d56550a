"""Stage-3 glue: reports over dense and sparse codes, level picks, alignment checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vlmsae_utils import metrics, scoring, widgets


def _report(acts: torch.Tensor, emb: torch.Tensor, sparse: bool) -> scoring.NeuronReport:
    data = metrics.SparseCodes.from_dense(acts) if sparse else acts
    return scoring.score_neurons("m", data, emb, top_k=3)


def test_sparse_and_dense_reports_agree():
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(40, 6)) * (torch.rand(40, 6) < 0.5)
    emb = torch.randn(40, 5)
    dense, sparse = _report(acts, emb, False), _report(acts, emb, True)
    torch.testing.assert_close(dense.ms, sparse.ms, equal_nan=True)
    for neuron in range(6):
        np.testing.assert_array_equal(dense.values(neuron), sparse.values(neuron))
        np.testing.assert_array_equal(sparse.values(neuron), acts[:, neuron].numpy())
    with pytest.raises(ValueError, match="out of range"):
        dense.values(6)


def test_levels_and_ranks_follow_ms():
    emb = torch.eye(4).repeat_interleave(5, 0)  # 4 groups of 5 identical images
    acts = torch.zeros(20, 3)
    acts[:5, 0] = torch.arange(1, 6.0)  # one group only → MS 1
    acts[::2, 1] = 1.0  # alternating across groups → lower MS
    acts[:, 2] = torch.arange(20.0)  # everything
    report = scoring.score_neurons("m", acts, emb, top_k=3)
    assert report.ms[0] == pytest.approx(1.0)
    assert report.ms[0] > report.ms[1] and report.ms[0] > report.ms[2]
    assert scoring.neurons_at_levels(report, (1.0,)) == [0]
    assert widgets.rank_to_neuron(report, 0) == 0
    table = scoring.ms_table([report])
    assert table.loc["m", "MS max"] == pytest.approx(1.0) and table.loc["m", "dead"] == 0


class _FakeStore:
    def __init__(self, ids, rows_per_image=1):
        self.image_ids, self.rows_per_image, self.path = ids, rows_per_image, "fake"
        self.params = {"tokens": "random_k"}


def test_store_checks():
    with pytest.raises(ValueError, match="2 rows per image"):
        scoring.per_image(_FakeStore(["a"], 2))
    with pytest.raises(ValueError, match="same images"):
        scoring.check_aligned(_FakeStore(["a", "b"]), _FakeStore(["b", "a"]))


@pytest.mark.parametrize(
    "name", ["raw openai/clip-vit-large-patch14-336", "raw /data/models/clip", "raw ../x", "fixture:x"]
)
def test_ms_tables_of_models_named_by_hub_id_or_path_stay_in_the_folder(tmp_path, name):
    """Chapter 3 crashed on every real model: a hub id or folder in the report name became a path."""
    report = scoring.score_neurons(name, torch.relu(torch.randn(20, 4)), torch.randn(20, 3), top_k=2)
    out = tmp_path / "ms"
    out.mkdir()
    summary = scoring.save_ms_tables([report], out)
    written = sorted(out.iterdir())
    per_neuron = [p for p in written if p.name != scoring.MS_SUMMARY_FILE]
    assert len(written) == 2 and len(per_neuron) == 1 and per_neuron[0].parent == out
    assert per_neuron[0].name.startswith("ms_")
    import pandas as pd

    assert set(pd.read_csv(per_neuron[0])["neurons"]) == {name}
    on_disk = pd.read_csv(out / scoring.MS_SUMMARY_FILE, index_col=0)
    assert on_disk.index.tolist() == [name] and on_disk["neuron count"].tolist() == [4]
    assert on_disk["MS max"].iloc[0] == pytest.approx(summary["MS max"].iloc[0])


def test_uniqueness_counts_overlaps_of_the_top_images_of_the_given_store(tmp_path):
    """Top-2 images per neuron on a hand-made 'train' store: neurons 0 and 1 share image 1
    (J = 1/3), neuron 2 has the same top set as neuron 0 (J = 1), neuron 3 fires on one image only
    (dropped, as the authors drop neurons with fewer than k positive images)."""
    from vlmsae_utils.store import write_rows

    rows = np.array(
        [[5.0, 0.0, 4.0, 0.0], [4.0, 3.0, 5.0, 0.0], [0.0, 4.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32
    )
    train = write_rows(tmp_path / "train", rows, ["a", "a", "b", "b"], params={"encoder": "hand"})
    tops = scoring.top_images_of(train, {}, top_k=2, device="cpu")
    assert list(tops) == ["raw hand"]
    assert [sorted(t.tolist()) for t in tops["raw hand"][:3]] == [[0, 1], [1, 2], [0, 1]]
    table, _ = scoring.uniqueness_table(tops)
    row = table.loc["raw hand"]
    assert (row["kept"], row["pairs"], row["J > 0"], row["J > 0.5"], row["J > 0.8"]) == (3, 3, 3, 1, 1)
    unnamed = write_rows(tmp_path / "nested", rows, ["a", "a", "b", "b"], params={"made": "by hand"})
    assert list(scoring.top_images_of(unnamed, {}, top_k=2, device="cpu")) == ["raw nested"]  # no encoder key


def test_score_all_streams_the_raw_neurons_from_the_store(tmp_path):
    """Issue 32: score_all read both stores whole into memory. The raw neurons now stream from the
    store's shards, with the same MS and top images as the in-memory tensor, and a neuron's values
    are read back per neuron from the shards."""
    from vlmsae_utils.store import write_rows

    rng = np.random.default_rng(3)
    rows = np.maximum(rng.standard_normal((40, 6)), 0).astype(np.float32)
    embeddings = rng.standard_normal((40, 5)).astype(np.float32)
    classes = [f"c{i % 4}" for i in range(40)]
    acts = write_rows(tmp_path / "acts", rows, classes, params={"encoder": "hand"}, shard_images=16)
    embs = write_rows(tmp_path / "embs", embeddings, classes, params={"encoder": "judge"}, shard_images=16)
    streamed = scoring.score_all(acts, embs, {}, top_k=3, device="cpu")[0]
    in_memory = scoring.score_neurons("raw hand", torch.from_numpy(rows), torch.from_numpy(embeddings), 3, "cpu")
    torch.testing.assert_close(streamed.ms, in_memory.ms, rtol=0, atol=1e-12, equal_nan=True)
    assert torch.equal(streamed.top.indices, in_memory.top.indices)
    assert np.array_equal(streamed.values(4), rows[:, 4])


def test_latent_names_join_the_per_neuron_ms_table(tmp_path):
    import pandas as pd

    report = scoring.score_neurons("sae x4", torch.rand(12, 5), torch.randn(12, 3), top_k=2, device="cpu")
    scoring.save_ms_tables([report], tmp_path)
    names = pd.DataFrame({"latent": [3, 1], "label": ["red", "ring"], "score": [0.4, 0.1], "method": "vocabulary"})
    table = scoring.label_ms_table(tmp_path, "sae x4", names)
    again = pd.read_csv(tmp_path / scoring.ms_table_file("sae x4"), index_col="neuron")
    assert list(again.columns) == ["neurons", "MS", "label", "name score"] and again.loc[3, "label"] == "red"
    assert again.loc[1, "name score"] == 0.1 and pd.isna(again.loc[0, "label"]) and len(table) == 5
    scoring.label_ms_table(tmp_path, "sae x4", names.iloc[:1])  # relabelled: one set of label columns
    assert pd.isna(pd.read_csv(tmp_path / scoring.ms_table_file("sae x4"), index_col="neuron").loc[1, "label"])


def test_tables_written_before_one_spelling_per_column_read_with_todays_names():
    from vlmsae_utils import columns

    old = pd.DataFrame({"neurons": ["raw"], "K": [64], "best MS": [0.5], "mean MS": [0.1], "std": [0.05], "dead": [0]})
    current = columns.with_current_names(old, "ms_summary")
    assert list(current.columns) == ["neurons", "neuron count", "MS max", "MS mean", "MS std", "dead"]
    assert columns.with_current_names(current, "ms_summary") is current  # already current: untouched
    levels = columns.with_current_names(pd.DataFrame({"MS avg": [0.2], "MS max": [0.4]}), "levels")
    assert list(levels.columns) == ["MS mean", "MS max"]
