"""One plotting style for the whole book, and the figures several chapters share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import columns

__all__ = [
    "TRAINING_PANELS",
    "activation_stats",
    "class_grid",
    "concept_tree_figure",
    "depth_per_level",
    "images_beside_rows",
    "latent_strips",
    "ms_curves",
    "ms_distributions",
    "ms_heatmaps",
    "overlap_histogram",
    "quality_by_expansion",
    "raw_vs_sae",
    "set_style",
    "tile_images",
    "training_curves",
]

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

#: Grey of an absent slot in an image mosaic (a neuron with fewer positive images than slots).
ABSENT_GREY = 238


def set_style() -> None:
    """The book's look: seaborn whitegrid, readable fonts, compact figures (call once per notebook)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update(
        {"figure.dpi": 100, "savefig.dpi": 120, "figure.figsize": (7, 4), "axes.titlesize": 11, "axes.labelsize": 10}
    )


def _square_thumbnail(image: Image.Image | None, size: int) -> np.ndarray:
    """``image`` letterboxed into a white ``size``-pixel square (pixel-sharp when enlarged); ``None`` is grey."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    if image is None:
        return np.full((size, size, 3), ABSENT_GREY, np.uint8)
    image = image.convert("RGB")
    method = PILImage.Resampling.NEAREST if max(image.size) <= size else PILImage.Resampling.LANCZOS
    return np.asarray(ImageOps.pad(image, (size, size), method=method, color=(255, 255, 255)))


def tile_images(
    images: Sequence[Image.Image | None], ncols: int, *, thumb: int = 96, gap: int = 4, header: int = 0
) -> np.ndarray:
    """One RGB array holding ``images`` in rows of ``ncols`` square tiles of ``thumb`` pixels, ``gap``
    pixels apart and ``header`` white pixels above each row (room for captions). One image drawn
    once is an order of magnitude faster to lay out and render than one matplotlib axes per image."""
    nrows = max(1, -(-len(images) // ncols))
    step_x, step_y = thumb + gap, header + thumb + gap
    canvas = np.full((nrows * step_y - gap, ncols * step_x - gap, 3), 255, np.uint8)
    for slot, image in enumerate(images):
        top, left = (slot // ncols) * step_y + header, (slot % ncols) * step_x
        canvas[top : top + thumb, left : left + thumb] = _square_thumbnail(image, thumb)
    return canvas


def class_grid(
    images_by_class: Mapping[str, Sequence],
    labels: Mapping[str, str] | None = None,
    *,
    thumb: float = 0.9,
    title: str | None = None,
) -> Figure:
    """One row of thumbnails per class, labelled on the left (e.g. with the class's taxonomy)."""
    classes = list(images_by_class)
    ncols = max(len(v) for v in images_by_class.values())
    label_width = 3.2
    fig, axes = plt.subplots(
        len(classes),
        ncols + 1,
        squeeze=False,
        figsize=(label_width + thumb * ncols, thumb * len(classes)),
        gridspec_kw={"width_ratios": [label_width / thumb] + [1] * ncols},
    )
    for row, name in enumerate(classes):
        label_ax = axes[row, 0]
        label_ax.axis("off")
        label_ax.text(
            1.0, 0.5, (labels or {}).get(name, name), ha="right", va="center", fontsize=8, transform=label_ax.transAxes
        )
        for col in range(ncols):
            ax = axes[row, col + 1]
            ax.axis("off")
            if col < len(images_by_class[name]):
                ax.imshow(np.asarray(images_by_class[name][col]))
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.01, right=0.99, top=0.97 if title else 0.99, bottom=0.01)
    return fig


def activation_stats(rows: np.ndarray, title: str = "") -> Figure:
    """Row-norm histogram and per-dimension mean ± std: the scale and anisotropy an SAE will face."""
    rows = np.asarray(rows, dtype=np.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    sns.histplot(np.linalg.norm(rows, axis=1), bins=30, ax=left)
    left.set(xlabel="‖activation row‖₂", ylabel="rows", title="row norms")
    order = np.argsort(rows.mean(0))
    dims = np.arange(rows.shape[1])
    right.plot(dims, rows.mean(0)[order], lw=1.2, label="mean")
    right.fill_between(
        dims, (rows.mean(0) - rows.std(0))[order], (rows.mean(0) + rows.std(0))[order], alpha=0.3, label="± std"
    )
    right.set(xlabel="dimension (sorted by mean)", ylabel="value", title="per-dimension statistics")
    right.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def images_beside_rows(images: Sequence, rows: np.ndarray, captions: Sequence[str]) -> Figure:
    """Each image next to its activation row drawn as a colour strip (diverging, shared scale)."""
    rows = np.asarray(rows, dtype=np.float64)
    limit = float(np.abs(rows).max()) or 1.0
    fig, axes = plt.subplots(
        len(images), 2, figsize=(9, 0.9 * len(images)), squeeze=False, gridspec_kw={"width_ratios": [1, 8]}
    )
    for (image_ax, row_ax), image, row, caption in zip(axes, images, rows, captions):
        image_ax.imshow(np.asarray(image))
        image_ax.axis("off")
        row_ax.imshow(row[None, :], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        row_ax.set_yticks([])
        row_ax.set_title(caption, fontsize=8, loc="left")
    axes[-1, 1].set_xlabel("activation dimension")
    fig.tight_layout()
    return fig


TRAINING_PANELS = {
    "loss": "training loss",
    "val_r2": "val R²",
    "val_l0": "val L0",
    "val_dead_frac_val": "val dead fraction",
}


def training_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss, validation R², L0 and dead fraction over steps, one line per trained SAE."""
    import pandas as pd

    frames = [h.assign(run=name) for name, h in histories.items()]
    long = pd.concat(frames, ignore_index=True)
    panels = [c for c in TRAINING_PANELS if c in long.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, column in zip(axes[0], panels):
        sns.lineplot(data=long, x="step", y=column, hue="run", ax=ax, legend=column == panels[-1])
        ax.set(title=TRAINING_PANELS[column], ylabel="")
        if column == "loss":
            ax.set_yscale("log")
    if len(panels) and axes[0, -1].get_legend():
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title=None)
    fig.tight_layout()
    return fig


def ms_curves(scores: Mapping[str, np.ndarray]) -> Figure:
    """Sorted MS curves (paper Fig. 5 style): MS against neuron rank, relative to the number of neurons."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, ms in scores.items():
        live = np.sort(np.asarray(ms, dtype=float)[~np.isnan(np.asarray(ms, dtype=float))])[::-1]
        ax.plot(np.linspace(0, 1, len(live)), live, label=f"{name} ({len(live)})")
    ax.set(xlabel="neuron rank (fraction of live neurons)", ylabel="MS", title="sorted monosemanticity scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ms_distributions(scores: Mapping[str, np.ndarray]) -> Figure:
    """Distribution of MS per model (raw neurons vs SAE latents), dead neurons left out."""
    import pandas as pd

    long = pd.concat(
        [pd.DataFrame({"MS": np.asarray(ms, dtype=float), "neurons": name}) for name, ms in scores.items()]
    )
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.violinplot(
        data=long.dropna(), x="MS", y="neurons", hue="neurons", cut=0, density_norm="width", ax=ax, legend=False
    )
    ax.set(ylabel="", title="MS distributions")
    fig.tight_layout()
    return fig


def overlap_histogram(max_jaccard: Mapping[str, np.ndarray]) -> Figure:
    """Per neuron, the largest Jaccard overlap of its top images with any other neuron's (NaN = dropped)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in max_jaccard.items():
        values = np.asarray(values, dtype=float)
        sns.histplot(
            values[~np.isnan(values)],
            bins=np.linspace(0, 1, 21),
            ax=ax,
            label=name,
            element="step",
            fill=False,
            stat="percent",
        )
    ax.set(
        xlabel="max Jaccard overlap of top-k images with another neuron",
        ylabel="% of neurons",
        title="uniqueness of top images",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def depth_per_level(depths: pd.DataFrame, levels: np.ndarray) -> Figure:
    """LCA depth of each latent's top images per Matryoshka level (mean and majority), excluded latents left out."""
    import pandas as pd

    kept = depths.assign(level=levels)[lambda d: ~d.excluded]
    long = pd.concat(
        [
            kept.assign(depth=kept.depth_rounded, statistic="rounded mean"),
            kept.assign(depth=kept.depth_majority, statistic="majority"),
        ]
    )
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.pointplot(data=long, x="level", y="depth", hue="statistic", dodge=0.3, errorbar="se", ax=ax)
    ax.set(
        xlabel="Matryoshka level (0 = coarsest)",
        ylabel="LCA depth of top images",
        title="deeper = more specific concepts",
    )
    fig.tight_layout()
    return fig


def concept_tree_figure(
    tree: Sequence[tuple[int, Sequence[int]]], top_indices, load, paths: Sequence[Sequence[str]], thumbs: int = 3
) -> Figure:
    """Each root latent above its children; a node is a strip of its top images labelled by the ranks they share."""
    width = max(1, max(len(children) for _, children in tree))
    fig, axes = plt.subplots(2 * len(tree), width, figsize=(2.3 * width, 1.6 * 2 * len(tree)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (root, children) in enumerate(tree):
        _node(axes[2 * row, 0], root, "root", top_indices, load, paths, thumbs)
        for col, child in enumerate(children):
            _node(axes[2 * row + 1, col], child, "└ child", top_indices, load, paths, thumbs)
    fig.suptitle("concept tree: level-0 latents and their closest level-1 latents", fontsize=10)
    fig.tight_layout()
    return fig


def _node(ax, latent: int, role: str, top_indices, load, paths, thumbs: int) -> None:
    """One tree node: up to ``thumbs`` top images side by side, titled with the shared taxonomy."""
    from .hierarchy import shared_prefix

    images = [int(i) for i in np.asarray(top_indices[latent]) if i >= 0]
    if not images:
        ax.set_title(f"{role} {latent}: never fires", fontsize=7)
        return
    strip = np.concatenate([np.asarray(load(i).resize((64, 64))) for i in images[:thumbs]], axis=1)
    ax.imshow(strip)
    shared = shared_prefix([paths[i] for i in images])[1:] or ("(nothing shared)",)
    ax.set_title(f"{role} {latent}: {' › '.join(shared[-2:])}", fontsize=7)


def latent_strips(
    latents: Sequence[int], top_indices, load, labels: Sequence[str] | None = None, thumbs: int = 6
) -> Figure:
    """One row of top images per latent: what each steered latent stands for."""
    fig, axes = plt.subplots(len(latents), thumbs, figsize=(1.1 * thumbs, 1.2 * len(latents)), squeeze=False)
    for row, latent in enumerate(latents):
        images = [int(i) for i in np.asarray(top_indices[latent]) if i >= 0][:thumbs]
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(images):
                ax.imshow(np.asarray(load(images[col])))
                if labels is not None:
                    ax.set_title(labels[images[col]], fontsize=6)
        axes[row, 0].text(
            -0.15, 0.5, f"latent {latent}", transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8
        )
    fig.tight_layout()
    return fig


def ms_heatmaps(sae: pd.DataFrame, value: str = columns.MS_MAX) -> Figure:
    """Layer × expansion heat map of an MS statistic, one panel per SAE type (the paper's Table 1a)."""
    types = sorted(sae["SAE"].unique())
    fig, axes = plt.subplots(1, len(types), figsize=(3.6 * len(types), 2.8), squeeze=False)
    for ax, sae_type in zip(axes[0], types):
        grid = sae[sae["SAE"] == sae_type].pivot_table(index="layer", columns="expansion", values=value)
        sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, cbar=False, ax=ax)
        ax.set(title=f"{sae_type}: {value}", xlabel="expansion ε", ylabel="layer")
    fig.tight_layout()
    return fig


def quality_by_expansion(sae: pd.DataFrame) -> Figure:
    """R² and L0 against the expansion factor, per SAE type and layer."""
    fig, (r2, l0) = plt.subplots(1, 2, figsize=(9, 3.2))
    frame = sae.assign(run=sae["SAE"] + " · layer " + sae["layer"].astype(str))
    sns.lineplot(data=frame, x="expansion", y=columns.R2, hue="run", marker="o", ax=r2)
    sns.lineplot(data=frame, x="expansion", y=columns.L0, hue="run", marker="o", ax=l0, legend=False)
    r2.set(xscale="log", title="reconstruction")
    l0.set(xscale="log", title="active latents per input")
    sns.move_legend(r2, "lower right", fontsize=7, title=None)
    fig.tight_layout()
    return fig


def sparsity_by_k(sae: pd.DataFrame) -> Figure:
    """R² and mean MS against K, per SAE type, scorer, layer and expansion (the paper's K sweep: as K
    grows, R² rises and mean MS falls)."""
    frame = sae.assign(
        run=sae["SAE"] + " ×" + sae["expansion"].map("{:g}".format) + " · layer " + sae["layer"].astype(str)
    )
    fig, (r2, ms) = plt.subplots(1, 2, figsize=(9, 3.2))
    sns.lineplot(data=frame, x=columns.K, y=columns.R2, hue="run", marker="o", ax=r2)
    sns.lineplot(data=frame, x=columns.K, y=columns.MS_MEAN, hue="run", style="scorer", marker="o", ax=ms, legend=False)
    r2.set(xscale="log", title="reconstruction")
    ms.set(xscale="log", title="mean MS of the latents")
    sns.move_legend(r2, "lower right", fontsize=7, title=None)
    fig.tight_layout()
    return fig


def raw_vs_sae(sae: pd.DataFrame, raw: pd.DataFrame) -> Figure:
    """Mean MS of raw neurons next to the SAEs' latents, per layer."""
    import pandas as pd

    rows = [
        raw.assign(kind="raw neurons")[["layer", "kind", columns.MS_MEAN]],
        sae.assign(kind=sae["SAE"] + " ×" + sae["expansion"].map("{:g}".format))[["layer", "kind", columns.MS_MEAN]],
    ]
    frame = pd.concat(rows, ignore_index=True).assign(layer=lambda d: d.layer.astype(str))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.barplot(data=frame, x="layer", y=columns.MS_MEAN, hue="kind", ax=ax)
    ax.set(title="mean MS: raw neurons vs SAE latents", ylabel="mean MS")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title=None)
    fig.tight_layout()
    return fig


def latent_heatmaps(maps, images: Sequence, names: Mapping[int, str] | None = None, per_latent: int = 4) -> Figure:
    """One row per latent of a :class:`~.heatmaps.PatchHeatmaps` over its images (``maps`` holds the
    images in latent order, ``per_latent`` each): the image, its patch codes on one colour scale per
    latent, and the latent's name where ``names`` gives one."""
    rows = len(maps.latents)
    fig, axes = plt.subplots(rows, per_latent, figsize=(2.0 * per_latent, 2.1 * rows), squeeze=False)
    for r, latent in enumerate(maps.latents):
        vmax = maps.scale(latent)
        for c in range(per_latent):
            index, ax = r * per_latent + c, axes[r][c]
            ax.imshow(images[index])
            ax.imshow(maps.image_map(index, latent), cmap="magma", alpha=0.55, vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
        title = f"latent {latent}" + (f": {names[latent]}" if names and latent in names else "")
        axes[r][0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_heatmaps(maps, image, names: Mapping[int, str] | None = None) -> Figure:
    """One image and, beside it, where each latent of ``maps`` fires on it (one colour scale each)."""
    count = len(maps.latents)
    fig, axes = plt.subplots(1, count + 1, figsize=(2.0 * (count + 1), 2.3), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_title("image" if maps.patch is None else f"image, patch {maps.patch}", fontsize=9)
    if maps.patch is not None:  # the patch the latents were chosen at
        left, top, right, bottom = maps.patch_box(0, *maps.patch)
        axes[0][0].add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, color="cyan", lw=1.5))
    for ax, latent in zip(axes[0][1:], maps.latents):
        ax.imshow(image)
        ax.imshow(maps.image_map(0, latent), cmap="magma", alpha=0.55, vmin=0, vmax=maps.scale(latent))
        ax.set_title(f"{latent}" + (f": {names[latent]}" if names and latent in names else ""), fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
