"""The neuron browser: pick a model and a neuron (or an MS rank) and see why it scores as it does.

:func:`neuron_card` draws one neuron as a static matplotlib figure (top images with their
activations, MS, and the neuron's activation histogram) — the book shows these; the
interactive :func:`neuron_browser` wraps the same card in ipywidgets for JupyterLab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image

from .scoring import NeuronReport, exemplar_images

__all__ = [
    "neuron_browser",
    "neuron_card",
    "rank_to_neuron",
]


def neuron_card(
    report: NeuronReport,
    neuron: int,
    load: Callable[[int], Image.Image],
    labels: list[str] | None = None,
    ncols: int = 8,
) -> Figure:
    """Top images of one neuron (activation and class under each), its MS, and its activation histogram."""
    images, values = exemplar_images(report, neuron, load)
    nrows = -(-len(images) // ncols)
    fig = plt.figure(figsize=(1.25 * ncols + 2.6, 1.35 * nrows + 0.5))
    grid = fig.add_gridspec(nrows, ncols + 2, width_ratios=[1] * ncols + [0.25, 2.2])
    top = report.top.indices[neuron].tolist()
    for slot, (image, value) in enumerate(zip(images, values)):
        ax = fig.add_subplot(grid[slot // ncols, slot % ncols])
        ax.set_xticks([])
        ax.set_yticks([])
        if image is None:
            ax.set_facecolor("#eeeeee")
            ax.set_title("absent", fontsize=7, color="#888888")
            continue
        ax.imshow(np.asarray(image))
        caption = f"{value:.2f}" + (f"\n{labels[top[slot]]}" if labels else "")
        ax.set_title(caption, fontsize=6)
    hist = fig.add_subplot(grid[:, ncols + 1])
    activations = report.values(neuron)
    sns.histplot(activations, bins=30, ax=hist)
    hist.set(yscale="log", xlabel="activation", ylabel="images", title="all images")
    ms = float(report.ms[neuron])
    flag = (
        f" · only {int(report.top.count_positive[neuron])} positive images" if bool(report.top.flagged[neuron]) else ""
    )
    fig.suptitle(f"{report.name} · neuron {neuron} · MS {ms:.3f}{flag}", fontsize=10)
    fig.tight_layout()
    return fig


def rank_to_neuron(report: NeuronReport, rank: int) -> int:
    """The neuron with the ``rank``-th highest MS (0 = best), dead neurons last."""
    scores = torch.nan_to_num(report.ms, nan=-np.inf)
    order = torch.argsort(scores, descending=True)
    if not 0 <= rank < len(order):
        raise ValueError(f"rank {rank} out of range (0..{len(order) - 1})")
    return int(order[rank])


def neuron_browser(
    reports: Mapping[str, NeuronReport], load: Callable[[int], Image.Image], labels: list[str] | None = None
):
    """An ipywidgets browser: model dropdown, MS-rank slider or neuron id → :func:`neuron_card`."""
    import ipywidgets as widgets
    from IPython.display import display

    names = list(reports)
    model = widgets.Dropdown(options=names, description="neurons")
    by = widgets.ToggleButtons(options=["MS rank", "neuron id"], description="choose by")
    index = widgets.IntSlider(
        min=0, max=reports[names[0]].num_neurons - 1, description="value", continuous_update=False
    )
    output = widgets.Output()

    def redraw(*_):
        report = reports[model.value]
        index.max = report.num_neurons - 1
        neuron = rank_to_neuron(report, index.value) if by.value == "MS rank" else index.value
        with output:
            output.clear_output(wait=True)
            figure = neuron_card(report, neuron, load, labels)
            display(figure)
            plt.close(figure)

    for control in (model, by, index):
        control.observe(redraw, names="value")
    redraw()
    browser = widgets.VBox([widgets.HBox([model, by, index]), output])
    browser.add_class("vlmsae-neuron-browser")  # a stable handle for tests/test_lab.py
    return browser
