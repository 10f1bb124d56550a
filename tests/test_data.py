"""Image loading: every PIL mode to RGB, EXIF orientation, bad files reported, folders sorted."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from vlmsae_utils import data


def _save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture()
def mixed_folder(tmp_path):
    """``root/train/<class>/…`` with good images in many modes and one file of each bad kind."""
    good = tmp_path / "train" / "good"
    bad = tmp_path / "train" / "bad"
    grey = Image.new("L", (12, 8), 100)
    _save(grey, good / "mode_L.png")
    _save(Image.new("LA", (12, 8), (100, 255)), good / "mode_LA.png")
    _save(grey.convert("P"), good / "mode_P.png")
    _save(Image.new("RGBA", (12, 8), (0, 0, 0, 0)), good / "mode_RGBA.png")
    _save(Image.new("CMYK", (12, 8), (0, 255, 255, 0)), good / "mode_CMYK.jpg")
    _save(Image.fromarray(np.full((8, 12), 40000, np.uint16)), good / "mode_I16.png")
    _save(Image.fromarray(np.arange(96, dtype=np.int32).reshape(8, 12)), good / "mode_I.tif")
    _save(Image.fromarray(np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12)), good / "mode_F.tif")
    _save(Image.new("1", (12, 8), 1), good / "mode_1.png")
    _save(grey.convert("P"), good / "mode_P_transparent.png", transparency=0)
    (good / "notes.txt").write_text("not an image, ignored")
    (good / ".hidden.png").write_bytes(b"ignored")
    bad.mkdir(parents=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a jpeg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    (bad / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (bad / "dangling.png").symlink_to(tmp_path / "does-not-exist.png")
    return tmp_path


def test_every_pil_mode_loads_as_rgb_of_the_same_size(mixed_folder):
    dataset = data.ImageFolderDataset(mixed_folder, "train")
    good = [i for i, r in enumerate(dataset) if r.class_name == "good"]
    assert len(good) == 10  # notes.txt and .hidden.png are not candidates
    for index in good:
        image = dataset.load(index)
        assert image.mode == "RGB" and image.size == (12, 8), dataset[index].image_id


def test_mode_conversion_values(mixed_folder):
    folder = mixed_folder / "train" / "good"
    assert np.asarray(data.load_image(folder / "mode_L.png"))[0, 0].tolist() == [100, 100, 100]
    # fully transparent pixels are composited on white, not shown black
    assert np.asarray(data.load_image(folder / "mode_RGBA.png"))[0, 0].tolist() == [255, 255, 255]
    ramp = np.asarray(data.load_image(folder / "mode_F.tif"))[..., 0]
    assert ramp.min() == 0 and ramp.max() == 255 and (np.diff(ramp.ravel().astype(int)) >= 0).all()


def test_in_memory_modes_without_a_file_format():
    for image in (Image.new("PA", (3, 2)), Image.new("I;16", (3, 2))):
        assert data.to_rgb(image).mode == "RGB"


def test_bad_files_are_reported_with_reasons(mixed_folder, caplog):
    dataset = data.ImageFolderDataset(mixed_folder, "train")
    with caplog.at_level(logging.WARNING):
        images, kept, skipped = data.load_batch(dataset, range(len(dataset)))
    reasons = dict(skipped)
    assert set(reasons) == {
        "train/bad/empty.png",
        "train/bad/text.jpg",
        "train/bad/truncated.png",
        "train/bad/dangling.png",
    }
    assert "empty" in reasons["train/bad/empty.png"]
    assert "not an image" in reasons["train/bad/text.jpg"]
    assert "truncated" in reasons["train/bad/truncated.png"]
    assert "unreadable" in reasons["train/bad/dangling.png"]
    assert len(images) == len(kept) == 10
    assert "notes.txt" not in caplog.text and "hidden" not in caplog.text


def test_exif_orientation_only_on_request(tmp_path, monkeypatch):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = _save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    monkeypatch.delenv(data.EXIF_TRANSPOSE_ENV, raising=False)
    assert data.load_image(path).size == (20, 10)  # as stored, the authors' convert("RGB")
    assert data.load_image(path, exif_transpose=True).size == (10, 20)
    monkeypatch.setenv(data.EXIF_TRANSPOSE_ENV, "1")
    assert data.load_image(path).size == (10, 20)
    monkeypatch.setenv(data.EXIF_TRANSPOSE_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        data.load_image(path)


def test_order_ids_and_flat_folders(tmp_path):
    for name in ("b/2.png", "a/10.png", "a/2.png", "a/sub/1.png"):
        _save(Image.new("RGB", (4, 4)), tmp_path / "val" / name)
    dataset = data.ImageFolderDataset(tmp_path, "val")
    assert dataset.image_ids == ["val/a/10.png", "val/a/2.png", "val/a/sub/1.png", "val/b/2.png"]
    assert dataset.class_names == ["a", "a", "a", "b"]
    assert data.class_counts(dataset) == {"a": 3, "b": 1}
    flat = data.ImageFolderDataset(tmp_path / "val" / "a", None)
    assert flat.class_names == ["", "", "sub"]  # files at the top of a flat folder have no class


def test_missing_and_empty_folders_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.ImageFolderDataset(tmp_path / "nope", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="split 'val' not found"):
        data.ImageFolderDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="no image files"):
        data.ImageFolderDataset(tmp_path, "train")


def test_images_by_class_takes_the_first_good_images(fixture):
    dataset = data.ImageFolderDataset(fixture.images, "val")
    samples = data.images_by_class(dataset, 3)
    assert len(samples) == 16 and all(len(v) == 3 for v in samples.values())
    with pytest.raises(ValueError):
        data.images_by_class(dataset, 0)


def test_symlinked_class_folders_are_read_and_link_loops_walked_once(tmp_path, caplog):
    from PIL import Image

    from vlmsae_utils.data import ImageFolderDataset

    elsewhere = tmp_path / "elsewhere" / "cats"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(elsewhere / "a.png")
    root = tmp_path / "data" / "train"
    (root / "dogs").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(root / "dogs" / "b.png")
    (root / "cats").symlink_to(elsewhere, target_is_directory=True)  # a class folder kept on another disk
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: must not recurse
    dataset = ImageFolderDataset(tmp_path / "data", "train")
    assert dataset.image_ids == ["train/cats/a.png", "train/dogs/b.png"]
    assert "links back to" in caplog.text
    assert "outside it" not in caplog.text  # a linked class folder is how a set is assembled: no warning
    (root / "dogs" / "c.png").symlink_to(elsewhere / "a.png")  # one image file linked from outside the root
    assert ImageFolderDataset(tmp_path / "data", "train").image_ids[-1] == "train/dogs/c.png"
    assert "1 image file(s) under" in caplog.text and "train/dogs/c.png ->" in caplog.text
