"""``decode: gpu``: the tensor copy of each processor, device decoding, odd files, and an extraction
through it — run on the CPU here (torchvision decodes JPEGs there too); the CUDA run is in bench-gpu."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vlmsae_utils import data, encoders, extract, gpu_decode

CPU = torch.device("cpu")
SIZES = [(48, 64), (100, 33), (384, 384), (31, 57), (300, 200), (375, 500)]


def _picture(height: int, width: int, seed: int) -> Image.Image:
    """Gradients plus noise: content every resampling step can get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 32 * 8], -1)
    return Image.fromarray(np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        paths.append(folder / f"img{i}.jpg")
        _picture(h, w, i).save(paths[-1], quality=90)
    return paths


def _grey_levels_apart(recipe, processor, paths) -> torch.Tensor:
    """|tensor path − processor| per pixel, in 0–255 grey levels of the source image."""
    images, reasons = gpu_decode.decode_on_device([gpu_decode.read_raw(p) for p in paths], CPU)
    assert reasons == [None] * len(paths)
    ours, theirs = recipe(images), processor([data.load_image(p) for p in paths])
    assert ours.shape == theirs.shape
    return ((ours - theirs) * torch.tensor(recipe.std).view(1, -1, 1, 1) * 255).abs()


@pytest.mark.parametrize("name", ["fixture:clip", "fixture:siglip", "fixture:dinov2", "fixture:open_clip"])
def test_tensor_path_matches_each_fixture_processor_within_one_grey_level(name, jpegs, fixture):
    encoder = encoders.load_encoder(name, "cpu")
    apart = _grey_levels_apart(gpu_decode.pixel_recipe(encoder.processor), encoder.processor, jpegs)
    assert apart.max() <= 1.01 and apart.mean() < 0.1  # measured: max 1.00, mean 0.05 (resampling round-off)


def test_tensor_path_matches_paper_sized_processors(jpegs):
    """CLIP-L/14-336 (shortest edge 336, crop 336) and SigLIP 384 (square resize) processors."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from vlmsae_utils.encoders import _hf_preprocess

    for processor, side in ((CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336), 336),
                            (SiglipImageProcessor(size={"height": 384, "width": 384}), 384)):  # fmt: skip
        wrapped = _hf_preprocess(processor)
        recipe = gpu_decode.pixel_recipe(wrapped)
        apart = _grey_levels_apart(recipe, wrapped, jpegs)
        assert apart.shape[-2:] == (side, side) and apart.max() <= 1.01 and apart.mean() < 0.1


def test_unsupported_preprocessing_is_refused_by_name():
    from transformers import CLIPImageProcessor

    from vlmsae_utils.encoders import _hf_preprocess

    with pytest.raises(ValueError, match="PIL code 1"):  # LANCZOS: PIL only
        gpu_decode.pixel_recipe(_hf_preprocess(CLIPImageProcessor(resample=1)))
    with pytest.raises(ValueError, match="cannot read the preprocessing"):
        gpu_decode.pixel_recipe(lambda images: images)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation, tmp_path):
    picture = _picture(5, 7, orientation)
    exif = picture.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    picture.save(path, exif=exif, quality=95)
    raw = gpu_decode.read_raw(path, exif_transpose=True)
    assert raw.jpeg is not None and raw.orientation == orientation
    (decoded,), _ = gpu_decode.decode_on_device([raw], CPU)
    expected = torch.from_numpy(np.asarray(data.load_image(path, exif_transpose=True))).permute(2, 0, 1)
    assert decoded.shape == expected.shape
    with Image.open(path) as plain:  # same transposition as PIL's, on the same decoded pixels
        assert ImageOps.exif_transpose(plain).size == (decoded.shape[2], decoded.shape[1])
    assert (decoded.int() - expected.int()).abs().max() <= 2


def test_odd_files_take_the_cpu_path_or_are_refused(tmp_path):
    picture = _picture(20, 30, 0)
    picture.save(tmp_path / "a.png")
    picture.convert("CMYK").save(tmp_path / "cmyk.jpg")
    picture.save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: no end marker
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert gpu_decode.read_raw(tmp_path / "whole.jpg").jpeg is not None
    for name in ("a.png", "cmyk.jpg"):  # decoded on the CPU exactly as by default
        raw = gpu_decode.read_raw(tmp_path / name)
        assert raw.jpeg is None
        assert torch.equal(raw.pixels, torch.from_numpy(np.asarray(data.load_image(tmp_path / name))).permute(2, 0, 1))
    with pytest.raises(data.ImageLoadError, match="truncated"):
        gpu_decode.read_raw(tmp_path / "cut.jpg")
    with pytest.raises(data.ImageLoadError, match="empty"):
        gpu_decode.read_raw(tmp_path / "empty.jpg")
    # a body that passes the header and end-marker checks but cannot be decoded: refused, others kept
    broken = whole[:200] + bytes(200) + whole[400:]
    good = gpu_decode.RawImage(jpeg=torch.frombuffer(bytearray(whole), dtype=torch.uint8))
    bad = gpu_decode.RawImage(jpeg=torch.frombuffer(bytearray(broken[:120] + b"\xff\xd9"), dtype=torch.uint8))
    images, reasons = gpu_decode.decode_on_device([good, bad], CPU)
    assert images[0] is not None and images[0].shape == (3, 20, 30)
    assert images[1] is None and "JPEG decode on cpu" in reasons[1]


def test_decode_choice_is_checked(fixture, tmp_path):
    encoder = encoders.load_encoder("fixture:clip", "cpu")
    dataset = data.ImageFolderDataset(fixture.images, "train")
    with pytest.raises(ValueError, match="CUDA device, but the encoder is on cpu"):
        extract.extract_activations(encoder, dataset, tmp_path / "s", decode="gpu", progress=False)
    with pytest.raises(ValueError, match="decode must be one of cpu, gpu"):
        extract.extract_activations(encoder, dataset, tmp_path / "s", decode="nvjpeg", progress=False)


def test_extraction_through_the_device_path_agrees_with_the_default(jpegs, tmp_path, monkeypatch):
    """The whole ``decode: gpu`` extraction (workers reading bytes, device decode, tensor
    preprocessing), on the CPU: same images kept and skipped, activations within resampling noise."""
    root = tmp_path / "imgs" / "train" / "things"
    root.mkdir(parents=True)
    for path in jpegs:
        (root / path.name).write_bytes(path.read_bytes())
    _picture(40, 40, 9).save(root / "z.png")
    (root / "zz_cut.jpg").write_bytes(jpegs[0].read_bytes()[:300])
    (root / "zz_empty.jpg").write_bytes(b"")  # with zz_text, the last batch of 4 holds no usable image
    (root / "zz_text.jpg").write_text("not an image")
    dataset = data.ImageFolderDataset(tmp_path / "imgs", "train")
    encoder = encoders.load_encoder("fixture:clip", "cpu")
    settings = {"batch_size": 4, "shard_images": 8, "progress": False, "num_workers": 0}
    default = extract.extract_activations(encoder, dataset, tmp_path / "cpu", **settings)
    monkeypatch.setattr(extract, "check_decode", lambda decode, device: decode)  # let the CPU stand in
    on_device = extract.extract_activations(encoder, dataset, tmp_path / "gpu", decode="gpu", **settings)
    assert on_device.params["decode"] == "gpu" and "decode" not in default.params
    assert on_device.image_ids == default.image_ids and len(on_device) == len(SIZES) + 1
    bad = ["train/things/zz_cut.jpg", "train/things/zz_empty.jpg", "train/things/zz_text.jpg"]
    assert sorted(i for i, _ in on_device.skipped) == sorted(i for i, _ in default.skipped) == bad
    ours, theirs = on_device.to_tensor(), default.to_tensor()
    assert (ours - theirs).norm(dim=1).max() < 0.05 * theirs.norm(dim=1).min()
