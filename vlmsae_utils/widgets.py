"""The neuron browser: pick a model and a neuron (or an MS rank) and see why it scores as it does.

:func:`neuron_card` draws one neuron as a static matplotlib figure (top images with their
activations, MS, and the neuron's activation histogram) — the book shows these; the
interactive :func:`neuron_browser` wraps the same card in ipywidgets for JupyterLab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure
from PIL import Image

from . import plots
from .scoring import NeuronReport, exemplar_images

__all__ = [
    "image_explorer",
    "neuron_browser",
    "neuron_card",
    "neuron_heatmaps",
    "rank_to_neuron",
    "strongest_latents_view",
]


def neuron_card(
    report: NeuronReport,
    neuron: int,
    load: Callable[[int], Image.Image],
    labels: list[str] | None = None,
    ncols: int = 8,
    name: str | None = None,
) -> Figure:
    """Top images of one neuron (activation and class above each), its MS, its name where known
    (:mod:`.naming`), and its activation histogram.

    The images are one mosaic (:func:`~vlmsae_utils.plots.tile_images`) with the captions as text,
    so a chapter drawing a dozen cards spends its time on the neurons, not on laying out axes."""
    images, values = exemplar_images(report, neuron, load)
    nrows = -(-len(images) // ncols)
    thumb, header = 96, 40
    mosaic = plots.tile_images(images, ncols, thumb=thumb, header=header)
    tiles_width = 1.35 * nrows * mosaic.shape[1] / mosaic.shape[0]  # inches, so the mosaic fills its axes
    fig, (tiles, hist) = plt.subplots(
        1, 2, figsize=(tiles_width + 3.2, 1.35 * nrows + 0.9), width_ratios=[tiles_width, 2.2]
    )
    tiles.imshow(mosaic)
    tiles.set_axis_off()
    top = report.top.indices[neuron].tolist()
    for slot, (image, value) in enumerate(zip(images, values)):
        x = (slot % ncols) * (thumb + 4) + thumb / 2
        y = (slot // ncols) * (header + thumb + 4) + header - 3
        absent = image is None
        caption = "absent" if absent else f"{value:.2f}" + (f"\n{labels[top[slot]]}" if labels else "")
        tiles.text(x, y, caption, ha="center", va="bottom", fontsize=6, color="#888888" if absent else "black")
    activations = report.values(neuron)
    sns.histplot(activations, bins=30, ax=hist)
    hist.set(yscale="log", xlabel="activation", ylabel="images", title="all images")
    ms = float(report.ms[neuron])
    flag = (
        f" · only {int(report.top.count_positive[neuron])} positive images" if bool(report.top.flagged[neuron]) else ""
    )
    named = f" · “{name}”" if name else ""
    fig.suptitle(f"{report.name} · neuron {neuron}{named} · MS {ms:.3f}{flag}", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.98, bottom=0.2, top=0.86, wspace=0.15)  # fixed: no layout search
    return fig


def rank_to_neuron(report: NeuronReport, rank: int) -> int:
    """The neuron with the ``rank``-th highest MS (0 = best), dead neurons last."""
    order = report.by_ms()
    if not 0 <= rank < len(order):
        raise ValueError(f"rank {rank} out of range (0..{len(order) - 1})")
    return int(order[rank])


def neuron_browser(
    reports: Mapping[str, NeuronReport],
    load: Callable[[int], Image.Image],
    labels: list[str] | None = None,
    *,
    latent_names: Mapping[str, Mapping[int, str]] | None = None,
    heatmap: Callable[[str, int], Figure | None] | None = None,
):
    """An ipywidgets browser: model dropdown, MS-rank slider or neuron id → :func:`neuron_card` (with
    the neuron's name from ``latent_names[model]``), and with ``heatmap`` a toggle that adds the neuron's
    patch heatmaps on its top images (:func:`neuron_heatmaps`)."""
    import ipywidgets as widgets

    names = list(reports)
    model = widgets.Dropdown(options=names, description="neurons")
    by = widgets.ToggleButtons(options=["MS rank", "neuron id"], description="choose by")
    index = widgets.IntSlider(
        min=0, max=reports[names[0]].num_neurons - 1, description="value", continuous_update=False
    )
    output = widgets.Output()
    show_maps = widgets.Checkbox(value=False, description="heatmaps", layout={"display": "" if heatmap else "none"})

    def redraw(*_):
        report = reports[model.value]
        index.max = report.num_neurons - 1
        neuron = rank_to_neuron(report, index.value) if by.value == "MS rank" else index.value
        name = (latent_names or {}).get(model.value, {}).get(neuron)
        figures = [neuron_card(report, neuron, load, labels, name=name)]
        if heatmap is not None and show_maps.value:
            figures.append(heatmap(model.value, neuron))
        _show(output, figures)

    for control in (model, by, index, show_maps):
        control.observe(redraw, names="value")
    redraw()
    browser = widgets.VBox([widgets.HBox([model, by, index, show_maps]), output])
    browser.add_class("vlmsae-neuron-browser")  # a stable handle for tests/test_lab.py
    return browser


def _show(output, figures: list[Figure | None]) -> None:
    """Replace what an ipywidgets ``Output`` shows with ``figures`` (``None`` entries skipped), closed after."""
    from IPython.display import display

    with output:
        output.clear_output(wait=True)
        for figure in figures:
            if figure is not None:
                display(figure)
                plt.close(figure)


def image_explorer(draw: Callable[..., Figure | None], count: int, point: bool = False):
    """An ipywidgets image picker: the image index → ``draw(index)`` (e.g. the image with the latents
    that fire most on it and their heatmaps, :func:`~vlmsae_utils.heatmaps.strongest_latents`). With
    ``point``, a patch selector too: tick *one patch* and move x/y (fractions of the image) →
    ``draw(index, (x, y))``, the latents that fire most on the patch under that point."""
    import ipywidgets as widgets

    if count < 1:
        raise ValueError("image_explorer needs at least one image")
    index = widgets.IntSlider(min=0, max=count - 1, description="image", continuous_update=False)
    at_patch = widgets.Checkbox(value=False, description="one patch")
    x, y = (
        widgets.FloatSlider(value=0.5, min=0, max=1, step=0.01, description=a, continuous_update=False) for a in "xy"
    )
    output = widgets.Output()

    def redraw(*_):
        _show(output, [draw(index.value, (x.value, y.value)) if at_patch.value else draw(index.value)])

    for control in (index, at_patch, x, y):
        control.observe(redraw, names="value")
    redraw()
    controls = [index, widgets.HBox([at_patch, x, y])] if point else [index]
    explorer = widgets.VBox([*controls, output])
    explorer.add_class("vlmsae-image-explorer")
    return explorer


def strongest_latents_view(
    params: dict,
    sae,
    load: Callable[[int], Image.Image],
    names: Mapping[int, str] | None = None,
    n: int = 5,
    device: str = "auto",
) -> Callable[[int], Figure | None]:
    """``draw(index, point=None)`` for :func:`image_explorer`: image ``index`` of a store (its ``params``
    give the encoder, hook and block) beside the ``n`` latents of ``sae`` that fire most on it (or on
    the patch under ``point``), with their heatmaps."""
    from .heatmaps import strongest_latents

    def draw(index: int, point: tuple[float, float] | None = None) -> Figure | None:
        image = load(index)
        maps = strongest_latents(params, sae, image, n, point=point, device=device)
        return plots.image_heatmaps(maps, image, names) if maps is not None else None

    return draw


def neuron_heatmaps(
    params: dict,
    saes: Mapping[str, object],
    reports: Mapping[str, NeuronReport],
    load: Callable[[int], Image.Image],
    per_latent: int = 4,
    device: str = "auto",
) -> Callable[[str, int], Figure | None]:
    """``draw(model, neuron)`` for :func:`neuron_browser`'s heatmap toggle: the latent's codes on the
    patches of its first ``per_latent`` top images (``None`` for raw neurons and pooled hooks)."""
    from .heatmaps import heatmaps_for

    def draw(model: str, neuron: int) -> Figure | None:
        if model not in saes:
            return None
        top = [i for i in reports[model].top.indices[neuron].tolist()[:per_latent] if i >= 0]
        if not top:
            return None
        images = [load(i) for i in top]
        maps = heatmaps_for(params, saes[model], images, [neuron], device=device)
        return plots.latent_heatmaps(maps, images, per_latent=len(images)) if maps is not None else None

    return draw
