"""Sparse autoencoders (BatchTopK, Matryoshka BatchTopK, TopK, ReLU), their registry and on-disk formats.

Formulas (Pach et al. 2025): ``z = ReLU((x·s − b_dec) W_enc + b_enc)``, ``x̂ = (f W_dec + b_dec) / s``
where ``s = input_scale`` (1 for imported checkpoints). Shapes: ``W_enc [d, ω]``, ``b_enc [ω]``,
``W_dec [ω, d]``, ``b_dec [d]``.

Every SAE type is a :class:`BaseSAE` subclass registered with :func:`register_sae`: the class owns
its type name, table label, dictionary_learning class name, training selection rule
(:meth:`BaseSAE.select` / :meth:`BaseSAE.select_indices`) and loss terms
(:meth:`BaseSAE.sparse_reconstruction`, :meth:`BaseSAE.sparsity_penalty`). :data:`SAE_TYPES`,
:data:`SAE_CLASSES`, :data:`SAE_LABELS` and the dictionary_learning name map are live views of
the registry, so a type registered from another module is known everywhere (make_sae, load_sae,
train_sae, TrainConfig, sweeps) without editing the package.

The package: :mod:`.base` (the shared SAE and its kernels), :mod:`.registry` (the registry and the
built-in types), :mod:`.io` (formats on disk).
"""

from __future__ import annotations

from .base import (
    CONFIG_FILE,
    FORMAT_NAME,
    INITS,
    WEIGHTS_FILE,
    BaseSAE,
    bag_offsets,
    batch_topk_indices,
    batch_topk_mask,
    random_directions,
    topk_mask,
)
from .interop import export_saelens, export_saev
from .io import load_sae, sae_name, save_sae
from .provenance import ProvenanceError, check_provenance, provenance_from_path, store_provenance
from .registry import (
    SAE_CLASSES,
    SAE_LABELS,
    SAE_TYPES,
    BatchTopKSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    TopKSAE,
    make_sae,
    register_sae,
    sae_class,
    unregister_sae,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "INITS",
    "SAE_CLASSES",
    "SAE_LABELS",
    "SAE_TYPES",
    "WEIGHTS_FILE",
    "BaseSAE",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "ProvenanceError",
    "ReLUSAE",
    "TopKSAE",
    "bag_offsets",
    "batch_topk_indices",
    "batch_topk_mask",
    "check_provenance",
    "export_saelens",
    "export_saev",
    "load_sae",
    "make_sae",
    "provenance_from_path",
    "random_directions",
    "register_sae",
    "sae_class",
    "sae_name",
    "save_sae",
    "store_provenance",
    "topk_mask",
    "unregister_sae",
]
