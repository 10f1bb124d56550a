"""SAE trainer faithful to the dictionary_learning reference (Pach et al. 2025), with sparse gradients.

Training tricks: input normalisation to unit mean squared norm (factor stored in
``sae.input_scale``, estimated on ~100 random batches), geometric-median ``b_dec``, tied init,
unit-norm decoder rows with gradient projection, grad-norm clip 1.0, Adam(0.9, 0.999), linear
warm-up (and an optional linear decay, off by default as in the authors' runs), auxiliary-K loss
for dead latents (weight 0.03 as the authors' scripts), threshold EMA, Matryoshka prefix losses
weighted as dictionary_learning (each prefix 1/G, then averaged over the G prefixes).
Speed: for the top-k variants only the ``B·k`` kept (plus auxiliary) entries carry gradient,
so encoder and decoder gradients are computed sparsely (sparse mm / ``embedding_bag``); the
dense encoder forward is the only ``B·d·ω`` product per step. Training data sits on the device
when it fits (``data_on_device``), else streams in large pinned chunks; bf16 autocast of the
encoder forward is an option on CUDA only (float32 by default, as the authors). Every setting, with its default, is a field of
:class:`~vlmsae_utils.train_config.TrainConfig`; what differs between SAE types (selection rule,
loss terms) is decided by the SAE class (:mod:`vlmsae_utils.sae`).

The trainer is a package: :mod:`.batches` (which rows, on which device), :mod:`.loss` (the
objective and what a run starts from), :mod:`.evaluate` (validation metrics), :mod:`.loop`
(``train_sae``: named steps over one state) and :mod:`.grid` (``train_grid``).
"""

from __future__ import annotations

from ..sae import SAE_LABELS, SAE_TYPES, BaseSAE, MatryoshkaBatchTopKSAE, batch_topk_indices, sae_class
from ..train_config import (
    DATA_MEMORY_FRACTION,
    DECAY_LAST_20PCT,
    DEFAULT_AUX_ALPHA,
    DEFAULT_GROUP_FRACTIONS,
    TrainConfig,
    default_lr,
    grid_configs,
    group_sizes_from_fractions,
    resolve_decay_start,
)
from .batches import CHUNK_BATCHES, CHUNK_MAX_BYTES, data_fingerprint, free_device_memory, training_batch_rows
from .evaluate import evaluate_sae
from .grid import run_name, train_grid
from .loop import CHECKPOINT_FILE, RUN_ONLY_SETTINGS, TRAINER_VERSION, checkpoint_settings, make_config, train_sae
from .loss import dead_after_batch, estimate_input_scale, geometric_median, lr_lambda, project_decoder_grad, sae_loss

__all__ = [
    "CHECKPOINT_FILE",
    "CHUNK_BATCHES",
    "CHUNK_MAX_BYTES",
    "DATA_MEMORY_FRACTION",
    "DECAY_LAST_20PCT",
    "DEFAULT_AUX_ALPHA",
    "DEFAULT_GROUP_FRACTIONS",
    "RUN_ONLY_SETTINGS",
    "SAE_LABELS",
    "SAE_TYPES",
    "TRAINER_VERSION",
    "BaseSAE",
    "MatryoshkaBatchTopKSAE",
    "TrainConfig",
    "batch_topk_indices",
    "checkpoint_settings",
    "data_fingerprint",
    "dead_after_batch",
    "default_lr",
    "estimate_input_scale",
    "evaluate_sae",
    "free_device_memory",
    "geometric_median",
    "grid_configs",
    "group_sizes_from_fractions",
    "lr_lambda",
    "make_config",
    "project_decoder_grad",
    "resolve_decay_start",
    "run_name",
    "sae_class",
    "sae_loss",
    "train_grid",
    "train_sae",
    "training_batch_rows",
]
