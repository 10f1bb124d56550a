"""Stage 3 glue: score the neurons of a model or an SAE on a store and keep what a reader inspects.

A :class:`NeuronReport` holds, for one set of neurons (raw activations or SAE latents), the
Monosemanticity Score of every neuron, its top-k images and the activations themselves (dense
or sparse), so notebooks can tabulate, plot and browse them without recomputing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from . import columns
from .data import load_image
from .device import resolve_device
from .exemplars import TopK, top_k_images
from .metrics import SparseCodes, encode_to_sparse, summarize_ms
from .neuron_pass import scan_neurons
from .paths import expand_home, safe_stem
from .sae import BaseSAE
from .sae.provenance import check_provenance
from .stages import MS_SUMMARY_FILE
from .store import ActivationStore

__all__ = [
    "MS_SUMMARY_FILE",
    "UNIQUENESS_FILE",
    "NeuronReport",
    "check_aligned",
    "exemplar_images",
    "label_ms_table",
    "ms_table",
    "ms_table_file",
    "neurons_at_levels",
    "per_image",
    "raw_name",
    "sae_codes",
    "save_ms_tables",
    "save_uniqueness",
    "score_all",
    "score_neurons",
    "store_image_loader",
    "top_images_of",
    "uniqueness_table",
]

UNIQUENESS_FILE = "uniqueness.csv"  # top-image overlap per set of neurons


@dataclass
class NeuronReport:
    """MS, top images and activations of one set of neurons over the same images."""

    name: str
    ms: torch.Tensor  # [K] float64, NaN = dead
    top: TopK
    activations: Any  # torch.Tensor [N, K], SparseCodes or an ActivationStore (read per neuron from its shards)

    @property
    def num_neurons(self) -> int:
        """Number of neurons (latents)."""
        return int(self.ms.numel())

    def by_ms(self) -> list[int]:
        """Neuron indices from the highest MS to the lowest, dead neurons last."""
        return torch.argsort(torch.nan_to_num(self.ms, nan=-np.inf), descending=True).tolist()

    def values(self, neuron: int) -> np.ndarray:
        """Activation of one neuron on every image."""
        if not 0 <= neuron < self.num_neurons:
            raise ValueError(f"neuron {neuron} out of range for {self.name} (0..{self.num_neurons - 1})")
        if isinstance(self.activations, SparseCodes):
            out = np.zeros(len(self.activations), dtype=np.float32)
            hit = (self.activations.indices == neuron).numpy()
            rows = self.activations.row_ids().numpy()[hit]
            out[rows] = self.activations.values.numpy()[hit]
            return out
        if isinstance(self.activations, ActivationStore):
            return np.concatenate([np.asarray(a[:, neuron], dtype=np.float32) for a in self.activations.arrays()])
        return np.asarray(self.activations[:, neuron], dtype=np.float32)


def per_image(store: ActivationStore) -> ActivationStore:
    """MS compares images: the store must hold one row per image (CLS, mean or projection)."""
    if store.rows_per_image != 1:
        raise ValueError(
            f"{store.path} holds {store.rows_per_image} rows per image (tokens="
            f"{store.params.get('tokens')!r}); score a store with tokens='cls' or 'mean'"
        )
    return store


def check_aligned(activations: ActivationStore, embeddings: ActivationStore) -> None:
    """Activations and scorer embeddings must describe the same images in the same order."""
    if activations.image_ids != embeddings.image_ids:
        raise ValueError(
            f"{activations.path} and {embeddings.path} do not hold the same images in the same "
            "order; extract both from the same data_dir and split"
        )


def sae_codes(
    sae: BaseSAE, store: ActivationStore, batch_size: int = 4096, device: str | torch.device | None = "auto"
) -> SparseCodes:
    """Sparse inference codes of an SAE on every row of a store (threshold encoding), computed on
    ``device`` (the SAE is moved there); the codes come back on the CPU. An SAE whose recorded
    provenance names another encoder, hook or block than the store's is refused (width alone is not enough)."""
    if sae.activation_dim != store.dim:
        raise ValueError(f"SAE reads {sae.activation_dim}-d activations but {store.path} holds {store.dim}-d rows")
    check_provenance(sae, store.params, f"the store {store.path}")
    dev = resolve_device(device)
    sae.to(dev).eval()
    with torch.inference_mode():
        return encode_to_sparse(sae.encode, store.iter_batches(batch_size), sae.dict_size, device=dev)


def score_neurons(
    name: str, activations: Any, embeddings: torch.Tensor, top_k: int = 16, device: str | torch.device | None = "auto"
) -> NeuronReport:
    """MS (closed form) and top-k images of every neuron of ``activations`` ``[N, K]`` (dense or sparse),
    from one read of the activations (`scan_neurons`)."""
    if embeddings is None:
        raise ValueError("score_neurons needs the images' embeddings to score MS")
    ms, top = scan_neurons(activations, embeddings, top_k=top_k, device=device).both()
    return NeuronReport(name, ms, top, activations)


def ms_table(reports: Sequence[NeuronReport]) -> pd.DataFrame:
    """The paper's Table 1a / A2 layout: best, mean ± std MS, dead and flagged neurons per set of
    neurons (columns named in :mod:`~vlmsae_utils.columns`)."""
    rows = []
    for report in reports:
        summary = summarize_ms(report.ms)
        rows.append(
            {
                columns.NEURONS: report.name,
                columns.NEURON_COUNT: report.num_neurons,
                columns.MS_MAX: summary["max"],
                columns.MS_MEAN: summary["mean"],
                columns.MS_STD: summary["std"],
                "dead": summary["num_dead"],
                f"< {report.top.top_k} positive images": int(report.top.flagged.sum()),
            }
        )
    return pd.DataFrame(rows).set_index(columns.NEURONS)


def neurons_at_levels(report: NeuronReport, quantiles: Sequence[float] = (1.0, 0.75, 0.5, 0.25)) -> list[int]:
    """Neurons whose MS sits at the given quantiles among live neurons with a full top-k."""
    eligible = (~torch.isnan(report.ms)) & (~report.top.flagged)
    ids = torch.nonzero(eligible).flatten()
    if ids.numel() == 0:
        raise ValueError(f"{report.name}: no live neuron with {report.top.top_k} positive images")
    order = ids[torch.argsort(report.ms[ids], descending=True)]
    picks = [int(order[round((1.0 - q) * (len(order) - 1))]) for q in quantiles]
    return list(dict.fromkeys(picks))


def store_image_loader(store: ActivationStore) -> Callable[[int], Image.Image]:
    """Image ``i`` of a store (its position in ``store.image_ids``), read from the data root it was made from."""
    root = expand_home(store.params["data_root"])
    ids = store.image_ids

    def load(index: int) -> Image.Image:
        return load_image(root / ids[index])

    return load


def exemplar_images(report: NeuronReport, neuron: int, load: Callable[[int], Image.Image]) -> tuple[list, list]:
    """A neuron's top images (``None`` for absent slots) and their activation values."""
    indices = report.top.indices[neuron].tolist()
    values = report.top.values[neuron].tolist()
    return [load(i) if i >= 0 else None for i in indices], values


def ms_table_file(name: str) -> str:
    """File name of one set of neurons' per-neuron MS table (never taken raw from a hub id or folder)."""
    return f"ms_{safe_stem(name)}.csv"


def save_ms_tables(reports: Sequence[NeuronReport], out: Path) -> pd.DataFrame:
    """Write the summary (`MS_SUMMARY_FILE`, `ms_table`'s layout) and one per-neuron MS table per
    report (real names kept in the ``neurons`` column); returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for report in reports:
        table = pd.DataFrame({"neurons": report.name, "MS": report.ms.numpy()}).rename_axis("neuron")
        table.to_csv(out / ms_table_file(report.name))
    summary = ms_table(reports)
    summary.to_csv(out / MS_SUMMARY_FILE)
    return summary


def label_ms_table(out: Path, name: str, names: pd.DataFrame) -> pd.DataFrame:
    """Add each named latent's ``label`` and name ``score`` (:mod:`.naming`) to the per-neuron MS table
    of ``name`` in ``out``; unnamed latents keep empty cells. Returns the rewritten table."""
    path = Path(out) / ms_table_file(name)
    table = pd.read_csv(path, index_col="neuron").drop(columns=["label", "name score"], errors="ignore")
    named = names.set_index("latent")[["label", "score"]].rename(columns={"score": "name score"})
    table = table.join(named)
    table.to_csv(path)
    return table


def raw_name(activations: ActivationStore) -> str:
    """The name of a store's raw neurons in reports and tables (``raw <encoder>``; a store of rows
    computed elsewhere, without an encoder, is named by its folder)."""
    return f"raw {activations.params.get('encoder') or activations.path.name}"


def score_all(
    activations: ActivationStore,
    embeddings: ActivationStore,
    saes: dict[str, BaseSAE],
    top_k: int = 16,
    device: str | torch.device | None = "auto",
) -> list[NeuronReport]:
    """Reports for the raw neurons of ``activations`` and for each SAE's latents on the same images
    (chapter 3's comparison), scored against the same scorer embeddings."""
    check_aligned(activations, embeddings)
    dev = resolve_device(device)
    target = embeddings.to_tensor()
    # the raw neurons stream from the store's shards (one read), never loaded whole beside the embeddings
    reports = [score_neurons(raw_name(activations), activations, target, top_k, dev)]
    for name, sae in saes.items():
        reports.append(score_neurons(name, sae_codes(sae, activations, device=dev), target, top_k, dev))
    return reports


def top_images_of(
    activations: ActivationStore,
    saes: dict[str, BaseSAE],
    top_k: int = 16,
    device: str | torch.device | None = "auto",
) -> dict[str, torch.Tensor]:
    """Top-``top_k`` image indices ``[K, k]`` of the raw neurons and of each SAE's latents on
    ``activations`` (per image), named as :func:`score_all` names them: the authors count the
    uniqueness of top images on the train split, not on the images MS is scored on."""
    dev = resolve_device(device)
    tops = {raw_name(activations): top_k_images(activations, top_k, device=dev).indices}
    for name, sae in saes.items():
        tops[name] = top_k_images(sae_codes(sae, activations, device=dev), top_k, device=dev).indices
    return tops


def uniqueness_table(
    tops: dict[str, torch.Tensor], thresholds: Sequence[float] | None = None, *, paper_protocol: bool = True
) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Jaccard overlap of top-k image sets (``tops``: name → top image indices ``[K, k]``, −1 absent,
    e.g. :func:`top_images_of`), as a table and the raw results.

    ``paper_protocol`` follows the authors: neurons with fewer than k positive images are dropped
    and pairs are counted with J > t (t = 0.5, 0.8); otherwise every neuron is kept and J ≥ t is
    counted (t = 0.5, 0.8, 1: identical sets).
    """
    from .exemplars import uniqueness

    thresholds = thresholds or ((0.5, 0.8) if paper_protocol else (0.5, 0.8, 1.0))

    sign = ">" if paper_protocol else "≥"
    overlaps = {
        name: uniqueness(indices, thresholds, drop_partial=paper_protocol, strict=paper_protocol)
        for name, indices in tops.items()
    }
    rows = [
        {
            "neurons": name,
            "kept": u["num_neurons"] - u.get("num_dropped", 0),
            "pairs": u["num_pairs"],
            "J > 0": u["num_overlapping"],
            **{f"J {sign} {t:g}": n for t, n in u["counts"].items()},
        }
        for name, u in overlaps.items()
    ]
    return pd.DataFrame(rows).set_index(columns.NEURONS), overlaps


def save_uniqueness(tops: dict[str, torch.Tensor], out: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """`uniqueness_table` under the paper's protocol, written to `UNIQUENESS_FILE`."""
    table, overlaps = uniqueness_table(tops)
    Path(out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out) / UNIQUENESS_FILE)
    return table, overlaps
