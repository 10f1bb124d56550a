"""The authors' released SAEs by name (Pach et al. 2025, the SAEs behind Tables 1, A8 and Figure 6).

The release is a hub repository of dictionary_learning checkpoints laid out as the authors' scripts
write them: ``<variant>/<data>_train_activations_<model>_<layer>_<hook>_<variant>/trainer_0/
checkpoints/ae_<step>.pt`` (``<variant>`` = ``batch_top_k_20_x<ε>`` or ``matroyshka_batch_top_k_20_x<ε>``,
their spelling; layer ``-1`` = ``post_projection``, the paper's "last"; the steering SAE sits under
``random_k_2/``). The paper's numbers use step 100,000 (``ae_100000.pt``); ``ae.pt`` is step 110,000.

:func:`load_released` reads a local snapshot folder (``snapshot=`` or ``$VLMSAE_RELEASE_DIR``) or
downloads only the one SAE through ``huggingface_hub`` where a hub is reachable. Notebook parameters
name a released SAE as ``released:<model>/<layer>/<sae>/x<ε>[/random_k][@<step>]``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .base import BaseSAE

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PAPER_STEP",
    "RELEASED",
    "RELEASE_PREFIX",
    "RELEASE_REPO",
    "ReleasedSAE",
    "load_released",
    "parse_released",
    "released_table",
]

RELEASE_REPO = "mateuszpach/sae-for-vlm"
#: The checkpoint the paper's scripts read (``ae_100000.pt``); training ran to 110,000 steps.
PAPER_STEP = 100_000
RELEASE_PREFIX = "released:"
#: The release's SAE kinds as our names and the variant folder names the authors gave them.
_VARIANTS = {"batch_top_k": "batch_top_k_20_x{e}", "matryoshka": "matroyshka_batch_top_k_20_x{e}"}
_EXPANSIONS = (1, 2, 4, 8, 16, 64)
_CLIP, _SIGLIP = "clip-vit-large-patch14-336", "siglip-so400m-patch14-384"


@dataclass(frozen=True)
class ReleasedSAE:
    """One released SAE: what it reads and where it lies in the release."""

    model: str  # the authors' model name, e.g. clip-vit-large-patch14-336
    layer: int | str  # a block index, or "last" (post_projection)
    sae: str  # "batch_top_k" or "matryoshka"
    expansion: int
    tokens: str = "cls"  # "cls" (MS, hierarchy) or "random_k" (2 random patch tokens: steering)
    data: str = "imagenet"  # "imagenet" or "inat" (the hierarchy SAE)
    #: How the path is known: the authors' scripts write it; nobody here could list the hub repository.
    source: str = "authors' scripts; not checked against the hub listing"

    @property
    def name(self) -> str:
        """The name a notebook parameter uses (after ``released:``)."""
        extra = {("cls", "imagenet"): "", ("random_k", "imagenet"): "/random_k", ("cls", "inat"): "/inat"}
        return f"{self.model}/{self.layer}/{self.sae}/x{self.expansion}{extra[self.tokens, self.data]}"

    @property
    def folder(self) -> str:
        """The SAE's folder in the release (holding ``trainer_0/``)."""
        variant = _VARIANTS[self.sae].format(e=self.expansion)
        layer, hook = ("-1", "post_projection") if self.layer == "last" else (str(self.layer), "post_mlp_residual")
        run = f"{self.data}_train_activations_{self.model}_{layer}_{hook}_{variant}"
        return f"{variant}/random_k_2/{run}" if self.tokens == "random_k" else f"{variant}/{run}"

    def checkpoint(self, step: int | None = PAPER_STEP) -> str:
        """The checkpoint file in the release: ``ae_<step>.pt`` (``None``: ``ae.pt``, the last step)."""
        return f"{self.folder}/trainer_0/{'ae.pt' if step is None else f'checkpoints/ae_{step}.pt'}"


def _release() -> list[ReleasedSAE]:
    """Every SAE the authors' three scripts train: Table 1's grid for CLIP-L (and SigLIP, the scripts'
    alternative model), the ε = 64 steering SAE and the ε = 2 iNaturalist hierarchy SAE."""
    grid = [
        ReleasedSAE(model, layer, sae, e)
        for model, layers in ((_CLIP, ("last", 11, 17, 22, 23)), (_SIGLIP, ("last",)))
        for layer in layers
        for sae in _VARIANTS
        for e in _EXPANSIONS
    ]
    return [
        *grid,
        ReleasedSAE(_CLIP, 22, "matryoshka", 64, tokens="random_k"),
        ReleasedSAE(_CLIP, "last", "matryoshka", 2, data="inat"),
    ]


RELEASED: dict[str, ReleasedSAE] = {entry.name: entry for entry in _release()}


def released_table() -> pd.DataFrame:
    """The release as a table (one row per SAE: name, model, layer, kind, ε, tokens, data, path, source)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "name": e.name,
                "model": e.model,
                "layer": e.layer,
                "sae": e.sae,
                "expansion": e.expansion,
                "tokens": e.tokens,
                "data": e.data,
                "path": e.checkpoint(),
                "source": e.source,
            }
            for e in RELEASED.values()
        ]
    )


def parse_released(spec: str) -> tuple[ReleasedSAE, int | None]:
    """``released:<name>[@<step>]`` → the release entry and its step (``@last``: ``ae.pt``); an
    unknown name is an error listing the nearest known ones."""
    body = spec.removeprefix(RELEASE_PREFIX)
    name, _, step_text = body.partition("@")
    entry = RELEASED.get(name.strip("/"))
    if entry is None:
        near = difflib.get_close_matches(name, list(RELEASED), n=4, cutoff=0.5)
        raise ValueError(
            f"{spec!r} is not a released SAE; nearest: {near or sorted(RELEASED)[:4]} "
            "(names: <model>/<layer>/<batch_top_k|matryoshka>/x<ε>[/random_k|/inat])"
        )
    if not step_text:
        return entry, PAPER_STEP
    if step_text == "last":
        return entry, None
    if not re.fullmatch(r"\d+", step_text):
        raise ValueError(f"{spec!r}: the step after '@' is a number of steps or 'last', got {step_text!r}")
    return entry, int(step_text)


def _snapshot_file(entry: ReleasedSAE, step: int | None, snapshot: str | os.PathLike | None) -> Path:
    """The checkpoint in a local snapshot of the release, or downloaded alone from the hub."""
    relative = entry.checkpoint(step)
    root = snapshot or os.environ.get("VLMSAE_RELEASE_DIR")
    if root:
        file = Path(root).expanduser() / relative
        if not file.is_file():
            raise FileNotFoundError(f"{file} is not in the release snapshot {root} (the released SAE {entry.name})")
        return file
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise FileNotFoundError(
            f"the released SAE {entry.name} needs huggingface_hub or a local snapshot (snapshot= or $VLMSAE_RELEASE_DIR)"
        ) from err
    try:
        return Path(hf_hub_download(RELEASE_REPO, relative))
    except Exception as err:  # offline, unknown file, no access: one message naming the file
        raise FileNotFoundError(
            f"could not fetch {relative} from {RELEASE_REPO} ({type(err).__name__}); "
            "download the release once and give its folder as snapshot= or $VLMSAE_RELEASE_DIR"
        ) from None


def load_released(
    model: str = _CLIP,
    layer: int | str = 22,
    sae: str = "matryoshka",
    expansion: int = 16,
    *,
    tokens: str = "cls",
    data: str = "imagenet",
    step: int | None = PAPER_STEP,
    snapshot: str | os.PathLike | None = None,
) -> BaseSAE:
    """A released SAE by what it is (``step=None``: ``ae.pt``), with its provenance from the release's
    folder names and its release name."""
    from .io import load_sae

    suffix = "" if step == PAPER_STEP else ("@last" if step is None else f"@{step}")
    name = ReleasedSAE(model, layer, sae, expansion, tokens, data).name
    entry, step = parse_released(RELEASE_PREFIX + name + suffix)
    loaded = load_sae(_snapshot_file(entry, step, snapshot))
    loaded.provenance = {**(loaded.provenance or {}), "tokens": entry.tokens, "release": entry.name}
    return loaded
