"""SAEs that travel (issue 30 item 4): SAELens folders and saev files written and read back with
the same codes, checked against each format's own encoding formula written out here."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from vlmsae_utils.sae import export_saelens, export_saev, load_sae, make_sae

D, W = 6, 24
log = logging.getLogger(__name__)


def _trained_like(kind: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(len(kind))
    sae = make_sae(kind, D, W, 3, [8, 16] if kind.startswith("m") else None)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.5)
        sae.input_scale.fill_(0.25)
        sae.threshold.fill_(0.3)
    sae.provenance = {"encoder": "fixture:mini-clip", "hook": "post_mlp_residual", "layer": 2, "tokens": "cls"}
    return sae.eval()


KINDS = ["batch_top_k", "matryoshka_batch_top_k", "top_k", "relu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("export", [export_saelens, lambda sae, path: export_saev(sae, path / "sae.pt")])
def test_a_round_trip_gives_the_same_codes(tmp_path, kind, export):
    sae = _trained_like(kind)
    written = export(sae, tmp_path / "out")
    back = load_sae(written)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1)) * 4
    assert type(back) is type(sae) and back.provenance == sae.provenance
    assert getattr(back, "group_sizes", None) == getattr(sae, "group_sizes", None)
    torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)


def _saelens_codes(folder, x: torch.Tensor) -> torch.Tensor:
    """SAELens' encoding written out from its config: pre = (x − b_dec) W_enc + b_enc, then the
    architecture's rule (jumprelu: pre · [pre > θ_j]; topk: top-k of ReLU(pre); standard: ReLU)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"])
    if cfg["architecture"] == "topk":
        values, indices = torch.relu(pre).topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    return torch.relu(pre)


@pytest.mark.parametrize("kind", KINDS)
def test_saelens_reads_our_export_as_the_same_function(tmp_path, kind):
    sae = _trained_like(kind)
    folder = export_saelens(sae, tmp_path / "lens")
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(2)) * 4
    torch.testing.assert_close(_saelens_codes(folder, x), sae.encode(x), atol=1e-5, rtol=1e-5)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (
        cfg["metadata"]["hook_name"] == "post_mlp_residual.2" and cfg["metadata"]["model_name"] == "fixture:mini-clip"
    )
    del cfg["metadata"]["vlmsae"]  # as another library wrote it: read by its architecture alone
    (folder / "cfg.json").write_text(json.dumps(cfg))
    foreign = load_sae(folder)
    torch.testing.assert_close(foreign.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    assert foreign.provenance is None


def test_saev_reads_a_relu_export_as_the_same_function(tmp_path):
    sae = _trained_like("relu")
    file = export_saev(sae, tmp_path / "sae.pt")
    header = json.loads(file.read_bytes().split(b"\n", 1)[0])
    assert header["schema"] == 2 and header["cfg"]["activation"] == {"cls": "Relu", "params": {}}
    state = torch.load(_after_header(file), weights_only=True)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3)) * 4
    saev_codes = torch.relu(x @ state["W_enc"] + state["b_enc"])  # saev: no b_dec subtracted before encoding
    torch.testing.assert_close(saev_codes, sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saev_codes @ state["W_dec"] + state["b_dec"], sae(x), atol=1e-5, rtol=1e-5)


def _after_header(file):
    import io

    return io.BytesIO(file.read_bytes().split(b"\n", 1)[1])


def test_what_a_format_cannot_hold_is_refused_by_name(tmp_path):
    untrained = make_sae("batch_top_k", D, W, 3).eval()  # θ < 0: no inference threshold yet
    with pytest.raises(ValueError, match="has no inference threshold yet"):
        export_saelens(untrained, tmp_path / "a")
    folder = export_saelens(_trained_like("relu"), tmp_path / "b")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["vlmsae"]
    (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
    with pytest.raises(ValueError, match=re.escape("SAELens architecture 'gated' has no type here")):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in' is not supported"):
        load_sae(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_sae_lens_itself_loads_our_export(tmp_path, kind):
    """Where the sae-lens package is installed (never a dependency), it reads our folder and
    encodes as we do; elsewhere the test is skipped with the reason logged."""
    try:
        from sae_lens import SAE
    except ImportError:
        log.warning("sae-lens is not installed: the check with SAELens itself is skipped")
        pytest.skip("sae-lens is not installed (pip install sae-lens to run this check)")
    sae = _trained_like(kind)
    theirs = SAE.load_from_disk(str(export_saelens(sae, tmp_path / "lens")), device="cpu")
    x = torch.randn(16, D) * 4
    torch.testing.assert_close(theirs.encode(x).detach(), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)).detach(), sae(x).detach(), atol=1e-5, rtol=1e-5)
