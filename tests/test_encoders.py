"""Encoders: loaders round-trip the tiny models, hooks capture the right tensors and vanish."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlmsae_utils import hooks
from vlmsae_utils.encoders import activation_shapes, load_encoder, select_tokens

HF_MODELS = ("clip", "siglip", "dinov2", "aimv2", "webssl", "dinov3")
ALL_MODELS = (*HF_MODELS, "open_clip")


@pytest.fixture(scope="module")
def encoders(fixture):
    """Every tiny fixture encoder, loaded through the public loader."""
    loaded = {name: load_encoder(fixture.model(name)) for name in ALL_MODELS}
    for enc in loaded.values():
        _BASELINE[id(enc)] = sum(len(m._forward_hooks) for m in enc.model.modules())
    return loaded


@pytest.fixture(scope="module")
def pixels(encoders, val_images):
    """Preprocessed fixture images per encoder."""
    return {name: enc.preprocess(val_images) for name, enc in encoders.items()}


_BASELINE: dict[int, int] = {}


def _hooks_left(encoder) -> int:
    """Forward hooks added since the encoder was loaded (transformers installs some of its own)."""
    count = sum(len(m._forward_hooks) for m in encoder.model.modules())
    return count - _BASELINE[id(encoder)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_loader_round_trips_weights_from_disk(fixture, encoders, name):
    # transformers may rename keys between its file layout and its modules, so match tensors
    # by content: every tensor of the loaded model must be one written to disk.
    stored = load_file(str(next(fixture.model(name).glob("*.safetensors"))))
    on_disk = {_fingerprint(t) for t in stored.values()}
    state = encoders[name].model.state_dict()
    missing = [key for key, value in state.items() if _fingerprint(value) not in on_disk]
    assert not missing


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """Shape and exact sums: equal only for (practically) identical tensors."""
    t = tensor.detach().double()
    return tuple(t.shape), float(t.sum()), float(t.abs().sum()), float((t * t).sum())


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_block_output_equals_hidden_states(encoders, pixels, name, layer):
    enc = encoders[name]
    with torch.no_grad():
        hidden = enc.model(pixel_values=pixels[name], output_hidden_states=True).hidden_states
    _BASELINE[id(enc)] = sum(len(m._forward_hooks) for m in enc.model.modules())
    expected = hidden[enc.block_index(layer) + 1]
    torch.testing.assert_close(enc.capture(pixels[name], "post_mlp_residual", layer), expected)
    assert _hooks_left(enc) == 0


@pytest.mark.parametrize("layer", [0, 2])
def test_open_clip_block_output_equals_direct_computation(encoders, pixels, layer):
    enc = encoders["open_clip"]
    visual = enc.model.visual
    with torch.no_grad():
        x = visual._embeds(pixels["open_clip"])
        for block in visual.transformer.resblocks[: layer + 1]:
            x = block(x)
    torch.testing.assert_close(enc.capture(pixels["open_clip"], "post_mlp_residual", layer), x)
    assert _hooks_left(enc) == 0


def test_post_projection_is_the_models_own_embedding(encoders, pixels):
    with torch.no_grad():
        clip = encoders["clip"].model(pixel_values=pixels["clip"]).image_embeds
        dino = encoders["dinov2"].model(pixel_values=pixels["dinov2"]).pooler_output
        siglip = encoders["siglip"].model(pixel_values=pixels["siglip"]).pooler_output
        aimv2 = encoders["aimv2"].model(pixel_values=pixels["aimv2"]).pooler_output
        webssl = encoders["webssl"].model(pixel_values=pixels["webssl"]).last_hidden_state[:, 0]
        dinov3 = encoders["dinov3"].model(pixel_values=pixels["dinov3"]).pooler_output
        oc = encoders["open_clip"].model.encode_image(pixels["open_clip"])
    torch.testing.assert_close(encoders["clip"].embed_images(pixels["clip"]), clip)
    torch.testing.assert_close(encoders["dinov2"].embed_images(pixels["dinov2"]), dino)
    torch.testing.assert_close(encoders["siglip"].embed_images(pixels["siglip"]), siglip)
    torch.testing.assert_close(encoders["aimv2"].embed_images(pixels["aimv2"]), aimv2)
    torch.testing.assert_close(encoders["webssl"].embed_images(pixels["webssl"]), webssl)
    torch.testing.assert_close(encoders["dinov3"].embed_images(pixels["dinov3"]), dinov3)
    torch.testing.assert_close(encoders["open_clip"].embed_images(pixels["open_clip"]), oc)


@pytest.mark.parametrize("name", ("clip", "open_clip", "dinov2", "webssl"))
def test_token_modes_shapes_and_values(encoders, pixels, name):
    enc, px = encoders[name], pixels[name]
    full = enc.capture(px, "post_mlp_residual", 1)
    batch, length, dim = full.shape
    every = enc.activations(px, "post_mlp_residual", 1, "all")
    assert every.shape == (batch * length, dim)
    torch.testing.assert_close(every.reshape(batch, length, dim), full)
    torch.testing.assert_close(enc.activations(px, "post_mlp_residual", 1, "mean"), full.mean(1))
    torch.testing.assert_close(enc.activations(px, "post_mlp_residual", 1, "cls"), full[:, 0])
    picked = enc.activations(px, "post_mlp_residual", 1, "random_k", 3, torch.Generator().manual_seed(0))
    assert picked.shape == (batch * 3, dim)
    for row, vector in enumerate(picked):  # every picked row is a token of its own image
        image = row // 3
        assert torch.isclose(full[image], vector).all(dim=1).any()


def test_random_k_is_reproducible_with_a_generator():
    hidden = torch.randn(4, 10, 6)
    first = select_tokens(hidden, "random_k", 5, torch.Generator().manual_seed(7))
    again = select_tokens(hidden, "random_k", 5, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", ("siglip", "aimv2"))
def test_encoders_without_cls_token_refuse_cls(encoders, pixels, name):
    assert not encoders[name].has_cls_token
    with pytest.raises(ValueError, match="no CLS token"):
        encoders[name].activations(pixels[name], "post_mlp_residual", 0, "cls")


def test_families_are_read_from_the_config(encoders):
    assert {name: enc.family for name, enc in encoders.items()} == {
        "clip": "clip",
        "siglip": "siglip",
        "dinov2": "dinov2",
        "aimv2": "aimv2",
        "webssl": "vit",
        "open_clip": "open_clip",
        "dinov3": "dinov3",
    }


def test_dinov3_rows_cover_cls_registers_and_patches_and_siglip2_naflex_is_refused(encoders, pixels, tmp_path):
    """DINOv3 (issue 30): 1 CLS + 4 registers + 4×4 patches per image; tokens='cls' is token 0.
    SigLIP 2's NaFlex model type is refused with the FixRes checkpoints named instead."""
    import json

    enc = encoders["dinov3"]
    full = enc.capture(pixels["dinov3"], "post_mlp_residual", 1)
    assert full.shape[1] == 1 + 4 + (enc.model.config.image_size // enc.model.config.patch_size) ** 2
    torch.testing.assert_close(enc.activations(pixels["dinov3"], "post_mlp_residual", 1, "cls"), full[:, 0])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match=r"SigLIP 2 NaFlex .* google/siglip2-so400m-patch14-384"):
        load_encoder(tmp_path)


def test_device_and_model_dtype_are_resolved_at_load(fixture):
    enc = load_encoder("fixture:clip", device="auto", model_dtype="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert enc.device.type == expected
    assert enc.dtype == torch.float32  # the authors run the encoders in float32, on CUDA too
    bf16 = load_encoder("fixture:clip", device="cpu", model_dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    pixels = torch.rand(1, 3, 32, 32)  # float32 pixels are cast to the model's precision
    assert bf16.capture(pixels, "post_mlp_residual", 0).dtype == torch.bfloat16


def test_auto_precision_per_role_is_the_authors():
    """fp32 for encoders, scorer and judge everywhere; fp16 only for LLaVA, and only on CUDA."""
    from vlmsae_utils.device import resolve_model_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [resolve_model_dtype("auto", cuda, r) for r in ("encoder", "judge", "llava")] == [
        torch.float32,
        torch.float32,
        torch.float16,
    ]
    assert {resolve_model_dtype("auto", cpu, r) for r in ("encoder", "judge", "llava")} == {torch.float32}
    assert resolve_model_dtype("float16", cuda, "encoder") == torch.float16  # half precision on request
    with pytest.raises(ValueError, match="unknown model role 'vae'"):
        resolve_model_dtype("auto", cpu, "vae")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_without_cuda_names_what_is_available(fixture):
    with pytest.raises(ValueError, match="CUDA is not available here; available: cpu"):
        load_encoder("fixture:clip", device="cuda")
    with pytest.raises(ValueError, match="not supported on the CPU"):
        load_encoder("fixture:clip", device="cpu", model_dtype="float16")
    with pytest.raises(ValueError, match="unknown model_dtype"):
        load_encoder("fixture:clip", device="cpu", model_dtype="float64")


def test_bad_hook_layer_and_tokens_fail_with_valid_values(encoders, pixels):
    enc, px = encoders["clip"], pixels["clip"]
    with pytest.raises(ValueError, match="post_mlp_residual, post_projection"):
        enc.activations(px, "pre_mlp", 0)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        enc.activations(px, "post_mlp_residual", 4)
    with pytest.raises(ValueError, match="cls, mean, random_k, all"):
        enc.activations(px, "post_mlp_residual", 0, "max")
    with pytest.raises(ValueError, match="random_k must be"):
        enc.activations(px, "post_mlp_residual", 0, "random_k", 0)
    assert _hooks_left(enc) == 0


def test_unknown_encoder_name_lists_valid_forms(tmp_path):
    with pytest.raises(ValueError, match="fixture:NAME"):
        load_encoder("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json"):
        load_encoder(tmp_path / "empty")


def test_fixture_prefix_loads_the_fixture_model(fixture):
    assert load_encoder("fixture:dinov2").num_layers == load_encoder(fixture.model("dinov2")).num_layers


@pytest.mark.parametrize("name", ("clip", "open_clip"))
def test_splice_replaces_block_output_and_is_removed(encoders, pixels, name):
    enc, px = encoders[name], pixels[name]
    before_final = enc.embed_images(px)
    with enc.splice("post_mlp_residual", 1, lambda h: h * 0.0):
        assert torch.count_nonzero(enc.capture(px, "post_mlp_residual", 1)) == 0
        changed = enc.embed_images(px)
    assert not torch.allclose(changed, before_final)
    assert _hooks_left(enc) == 0
    torch.testing.assert_close(enc.embed_images(px), before_final)


def test_splice_hook_is_removed_after_an_exception(encoders, pixels):
    enc, px = encoders["clip"], pixels["clip"]

    def boom(h):
        raise RuntimeError("inside the block")

    with pytest.raises(RuntimeError, match="inside the block"), enc.splice("post_mlp_residual", 0, boom):
        enc.embed_images(px)
    assert _hooks_left(enc) == 0


def test_splice_refuses_a_shape_change(encoders, pixels):
    enc, px = encoders["clip"], pixels["clip"]
    with pytest.raises(ValueError, match="changed the shape"), enc.splice("post_mlp_residual", 0, lambda h: h[:, :1]):
        enc.embed_images(px)


# ----------------------------------------------------------------------------- hook points as data (issue 13, item 4)


def test_a_global_hook_refuses_a_layer_and_a_block_hook_needs_one(encoders, pixels):
    enc, px = encoders["clip"], pixels["clip"]
    with pytest.raises(ValueError, match="'post_projection' is global"):
        enc.capture(px, "post_projection", 3)
    with pytest.raises(ValueError, match="'post_mlp_residual' needs a layer"):
        enc.capture(px, "post_mlp_residual")
    with pytest.raises(ValueError, match="one vector per image"):
        enc.activations(px, "post_projection", None, "random_k")
    assert enc.output_dim("post_projection") == enc.projection_dim and enc.output_dim("post_mlp_residual") == 32
    assert _hooks_left(enc) == 0


@pytest.mark.parametrize("name", ("clip", "open_clip"))
def test_a_registered_hook_captures_its_module_in_the_token_layout(encoders, pixels, name):
    enc, px = encoders[name], pixels[name]
    grabbed = []
    handle = enc.blocks[1].mlp.register_forward_hook(lambda _m, _i, out: grabbed.append(out))
    with torch.no_grad():
        enc.embed_images(px)
    handle.remove()
    expected = grabbed[0].transpose(0, 1) if enc.sequence_first else grabbed[0]
    hooks.register_hook(
        hooks.HookSpec("mlp_output", per_block=True, layout=hooks.TOKENS, locate=hooks.block_child("mlp"))
    )
    try:
        assert "mlp_output" in enc.hook_points
        torch.testing.assert_close(enc.capture(px, "mlp_output", 1), expected)
        torch.testing.assert_close(enc.activations(px, "mlp_output", 1, "mean"), expected.mean(1))
        rows = {(r["hook"], r["tokens"]): r["shape"] for r in activation_shapes(enc, px)}
        assert rows[("mlp_output", "all")] == rows[("post_mlp_residual", "all")]
        with enc.splice("mlp_output", 1, lambda h: h * 0.0):
            assert torch.count_nonzero(enc.capture(px, "mlp_output", 1)) == 0
    finally:
        hooks.unregister_hook("mlp_output")
    assert _hooks_left(enc) == 0
    with pytest.raises(ValueError, match=r"valid hooks: post_mlp_residual, post_projection$"):
        enc.capture(px, "mlp_output", 1)


def test_image_processors_run_on_the_pil_backend_by_default(fixture, monkeypatch):
    """The authors ran transformers' PIL image processors; transformers 5 defaults to torchvision.
    The backend is one setting (VLMSAE_IMAGE_BACKEND) for encoders and LLaVA, recorded on the encoder."""
    from vlmsae_utils import hf

    assert hf.image_backend() == "pil"
    enc = load_encoder("fixture:clip", device="cpu")
    assert enc.preprocessing == "pil" and "Pil" in type(enc.processor.image_processor).__name__
    from vlmsae_utils.llava import load_llava

    _, processor = load_llava("fixture:llava", device="cpu")
    assert "Pil" in type(processor.image_processor).__name__
    monkeypatch.setenv(hf.IMAGE_BACKEND_ENV, "torchvision")
    fast = load_encoder("fixture:clip", device="cpu")
    assert fast.preprocessing == "torchvision" and "Pil" not in type(fast.processor.image_processor).__name__
    monkeypatch.setenv(hf.IMAGE_BACKEND_ENV, "cv2")
    with pytest.raises(ValueError, match="VLMSAE_IMAGE_BACKEND='cv2'; valid: pil, torchvision"):
        load_encoder("fixture:clip", device="cpu")
