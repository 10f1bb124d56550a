"""An SAE knows what it was trained on, refuses other activations, and refuses damaged weights
(issue 32, items 3 and 5): a hand-made store and SAE, a flipped bit, the release's folder names."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from vlmsae_utils.sae import (
    BatchTopKSAE,
    ProvenanceError,
    load_sae,
    provenance_from_path,
    save_sae,
    store_provenance,
)
from vlmsae_utils.scoring import sae_codes
from vlmsae_utils.store import write_rows

D = 8


def _store(path, encoder: str, layer: int, hook: str = "post_mlp_residual"):
    rows = np.random.default_rng(0).standard_normal((12, D)).astype(np.float32)
    params = {"encoder": encoder, "hook": hook, "layer": layer, "tokens": "cls"}
    return write_rows(path, rows, ["c"] * len(rows), params=params)


def test_an_sae_records_its_store_and_refuses_another_encoders_rows(tmp_path):
    train = _store(tmp_path / "train", "fixture:mini-clip", 2)
    recorded = store_provenance(train)
    assert recorded == {
        "encoder": "fixture:mini-clip",
        "hook": "post_mlp_residual",
        "layer": 2,
        "tokens": "cls",
        "store_hash": train.manifest["content_hash"],
    }
    folder = save_sae(BatchTopKSAE(D, 16, k=2), tmp_path / "sae", provenance=recorded)
    sae = load_sae(folder)
    assert sae.provenance == recorded
    same = _store(tmp_path / "val", "fixture:mini-clip", 2)  # another split of the same block: fine
    assert sae_codes(sae, same, device="cpu").shape == (12, 16)
    other = _store(tmp_path / "other", "fixture:scorer", 2)
    message = re.escape("encoder 'fixture:mini-clip' (SAE) vs 'fixture:scorer'")
    with pytest.raises(ProvenanceError, match=message):
        sae_codes(sae, other, device="cpu")
    deeper = _store(tmp_path / "deeper", "fixture:mini-clip", 3)
    with pytest.raises(ProvenanceError, match=re.escape("layer 2 (SAE) vs 3")):
        sae_codes(sae, deeper, device="cpu")


def test_an_sae_without_provenance_is_checked_by_width_only(tmp_path):
    sae = load_sae(save_sae(BatchTopKSAE(D, 16, k=2), tmp_path / "sae"))
    assert sae.provenance is None
    assert sae_codes(sae, _store(tmp_path / "any", "anything", 7), device="cpu").shape == (12, 16)


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path):
    folder = save_sae(BatchTopKSAE(D, 16, k=2), tmp_path / "sae")
    weights = folder / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # an exponent bit of the second-last float: it loads, and changes results
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded"):
        load_sae(folder)


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_a_broken_config_is_named(tmp_path, text, message):
    folder = save_sae(BatchTopKSAE(D, 16, k=2), tmp_path / "sae")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: {message}")):
        load_sae(folder)


def test_a_truncated_safetensors_file_without_digest_is_named(tmp_path):
    folder = save_sae(BatchTopKSAE(D, 16, k=2), tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    del config["weights_sha256"]  # as saved before digests were recorded
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_sae(folder)


def test_a_release_checkpoint_gets_its_folder_names_provenance(tmp_path):
    variant = "matroyshka_batch_top_k_20_x4"
    folder = (
        tmp_path
        / variant
        / f"imagenet_train_activations_clip-vit-large-patch14-336_22_post_mlp_residual_{variant}"
        / "trainer_0"
        / "checkpoints"
    )
    folder.mkdir(parents=True)
    state = {
        "W_enc": torch.zeros(D, 16),
        "b_enc": torch.zeros(16),
        "W_dec": torch.eye(16, D),
        "b_dec": torch.zeros(D),
        "k": torch.tensor(2),
        "threshold": torch.tensor(0.1),
        "group_sizes": torch.tensor([4, 12]),
    }
    torch.save(state, folder / "ae_100000.pt")
    sae = load_sae(folder / "ae_100000.pt")
    assert sae.provenance == {
        "encoder": "openai/clip-vit-large-patch14-336",
        "hook": "post_mlp_residual",
        "layer": 22,
        "tokens": "cls",
        "source": "release folder name",
    }
    hub_store = _store(tmp_path / "hub", "openai/clip-vit-large-patch14-336", 22)
    assert sae_codes(sae, hub_store, device="cpu").shape == (12, 16)
    local = _store(tmp_path / "local", "/models/clip-vit-large-patch14-336", 11)  # a local copy: the block differs
    with pytest.raises(ProvenanceError, match=re.escape("layer 22 (SAE) vs 11")):
        sae_codes(sae, local, device="cpu")
    assert provenance_from_path(tmp_path / "ae.pt") is None


def _release_checkpoint(root, entry, step, group_sizes=(4, 12)):
    """A dictionary_learning Matryoshka / BatchTopK state dict at the entry's place in a snapshot."""
    file = root / entry.checkpoint(step)
    file.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(step or 0)
    if entry.sae == "matryoshka":
        state = {"W_enc": torch.randn(D, 16, generator=g), "b_enc": torch.zeros(16), "W_dec": torch.randn(16, D)}
        state |= {"b_dec": torch.zeros(D), "k": torch.tensor(2), "threshold": torch.tensor(0.1)}
        state["group_sizes"] = torch.tensor(list(group_sizes))
    else:
        state = {"encoder.weight": torch.randn(16, D, generator=g), "encoder.bias": torch.zeros(16)}
        state |= {"decoder.weight": torch.randn(D, 16), "b_dec": torch.zeros(D), "k": torch.tensor(2)}
        state["threshold"] = torch.tensor(0.1)
    torch.save(state, file)
    return file


def test_released_saes_load_by_name_from_a_snapshot_with_their_provenance(tmp_path, monkeypatch):
    from vlmsae_utils.defaults import saes_or_default
    from vlmsae_utils.sae.release import RELEASED, load_released, parse_released, released_table

    table = released_table()
    assert len(table) == 2 * 5 * 6 + 2 * 6 + 2 and table["path"].is_unique  # CLIP-L 5 layers, SigLIP last, +2
    steering = RELEASED["clip-vit-large-patch14-336/22/matryoshka/x64/random_k"]
    assert steering.checkpoint() == (
        "matroyshka_batch_top_k_20_x64/random_k_2/imagenet_train_activations_clip-vit-large-patch14-336_22_"
        "post_mlp_residual_matroyshka_batch_top_k_20_x64/trainer_0/checkpoints/ae_100000.pt"
    )
    last = RELEASED["clip-vit-large-patch14-336/last/batch_top_k/x16"]
    for step in (100_000, 20_000):
        _release_checkpoint(tmp_path, steering, step)
    _release_checkpoint(tmp_path, last, 100_000)
    sae = load_released(layer=22, expansion=64, tokens="random_k", snapshot=tmp_path)
    assert sae.provenance["layer"] == 22 and sae.provenance["tokens"] == "random_k"
    assert sae.provenance["release"] == steering.name and sae.group_sizes == [4, 12]
    early = load_released(layer=22, expansion=64, tokens="random_k", step=20_000, snapshot=tmp_path)
    assert not torch.equal(early.W_enc, sae.W_enc)  # step chooses among the ae_*.pt files
    monkeypatch.setenv("VLMSAE_RELEASE_DIR", str(tmp_path))
    saes = saes_or_default([f"released:{steering.name}", f"released:{last.name}"])  # both are ae_100000.pt
    assert list(saes) == [steering.name, last.name]
    assert saes[last.name].provenance == {
        "encoder": "openai/clip-vit-large-patch14-336",
        "hook": "post_projection",
        "layer": None,
        "tokens": "cls",
        "source": "release folder name",
        "release": last.name,
    }
    with pytest.raises(
        ValueError, match=re.escape("not a released SAE; nearest: ['clip-vit-large-patch14-336/22/matryoshka/x1',")
    ):
        parse_released("released:clip-vit-large-patch14-336/22/matryoshka/x17")
    with pytest.raises(FileNotFoundError, match="is not in the release snapshot"):
        load_released(layer=11, snapshot=tmp_path)


def test_a_trainer_folder_loads_the_step_asked_for(tmp_path):
    from vlmsae_utils.sae import sae_name
    from vlmsae_utils.sae.release import RELEASED

    entry = RELEASED["clip-vit-large-patch14-336/11/matryoshka/x4"]
    for step in (20_000, 100_000):
        file = _release_checkpoint(tmp_path, entry, step)
    trainer = file.parent.parent
    assert torch.equal(load_sae(trainer, step=100_000).W_enc, load_sae(file).W_enc)
    with pytest.raises(FileNotFoundError, match=re.escape("give step= (the paper's scripts read ae_100000.pt)")):
        load_sae(trainer / "checkpoints")  # several ae_*.pt and no ae.pt
    with pytest.raises(
        FileNotFoundError, match=re.escape("no ae_5.pt (checkpoints there: ['ae_100000.pt', 'ae_20000.pt'])")
    ):
        load_sae(trainer, step=5)
    assert (
        sae_name(file) == trainer.parent.name
        and sae_name(tmp_path / "runs" / "batch_top_k_x4_k8") == "batch_top_k_x4_k8"
    )
