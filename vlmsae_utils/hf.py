"""Helpers around Hugging Face transformers shared by the model loaders and writers
(:mod:`.encoders`, :mod:`.llava`, :mod:`.rehearsal`); imports nothing else of the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "quiet_transformers",
]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading progress bars (unused text towers etc.)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
