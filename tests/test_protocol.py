"""The table of deviations from the authors' code reads each default from the code."""

from __future__ import annotations

import pytest

from vlmsae_utils import protocol
from vlmsae_utils.train_config import TrainConfig


def test_every_row_reads_its_default_and_says_whether_it_is_the_authors():
    table = protocol.deviations_table()
    assert len(table) == len(protocol.DEVIATIONS) and table.index.is_unique
    assert set(table["default is the authors'"]) <= {"yes", "no"}
    rows = {d.setting: d for d in protocol.DEVIATIONS}
    autocast = rows["SAE encoder forward (TrainConfig.autocast)"]
    assert autocast.default() is TrainConfig().autocast is False and autocast.follows_authors()
    assert rows["LLaVA-1.5 (model_dtype='auto' on CUDA)"].default() == "float16"
    assert not rows["steering α units (alpha_scale)"].follows_authors()  # the fixture's max, stated


def test_a_changed_default_shows_up_in_the_table(monkeypatch):
    """The table is generated: a default changed in the code is what the table prints."""
    from vlmsae_utils import device

    monkeypatch.setitem(device.AUTO_CUDA_DTYPES, "encoder", __import__("torch").float16)
    row = protocol.deviations_table().loc["encoders, DINOv2 and the CLIP judge (model_dtype='auto' on CUDA)"]
    assert row["this book's default"] == "float16 / float32" and row["default is the authors'"] == "no"


@pytest.mark.parametrize("deviation", protocol.DEVIATIONS, ids=lambda d: d.setting[:40])
def test_each_row_is_complete(deviation):
    assert deviation.setting and deviation.why and deviation.effect and deviation.option


def test_init_batch_order_and_exif_follow_the_authors_unless_asked(monkeypatch):
    rows = {d.setting: d for d in protocol.DEVIATIONS}
    exif = rows["EXIF orientation of photos (VLMSAE_EXIF_TRANSPOSE)"]
    monkeypatch.delenv("VLMSAE_EXIF_TRANSPOSE", raising=False)
    for setting in ("SAE initialisation (TrainConfig.init)", "order of the training batches (TrainConfig.batch_order)"):
        assert rows[setting].follows_authors(), setting
    assert exif.follows_authors()
    monkeypatch.setenv("VLMSAE_EXIF_TRANSPOSE", "1")
    assert exif.default() == "applied" and not exif.follows_authors()
