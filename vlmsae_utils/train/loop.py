"""The training loop: one :class:`~vlmsae_utils.train_config.TrainConfig`, resumable checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.profiler import record_function

from ..device import resolve_device
from ..io import atomic_torch_save
from ..sae import BaseSAE, sae_class
from ..store import TrainingData
from ..train_config import (
    TrainConfig,
    default_lr,
    resolve_decay_start,
)
from .batches import (
    _available_ram,
    _check_finite,
    _data_dim,
    _TrainingStream,
    data_fingerprint,
)
from .evaluate import evaluate_on
from .loss import dead_after_batch, estimate_input_scale, geometric_median, lr_lambda, project_decoder_grad, sae_loss

__all__ = [
    "CHECKPOINT_FILE",
    "RUN_ONLY_SETTINGS",
    "TRAINER_VERSION",
    "check_sae_fits",
    "checkpoint_settings",
    "make_config",
    "train_on",
    "train_sae",
]

CHECKPOINT_FILE = "checkpoint.pt"
#: Bumped whenever a change to the loss or to the batch sampling changes what a run trains
#: (2: Matryoshka 1/G² weighting, epoch-permutation batches, sampled input scale; 3: the authors'
#: uniform init, cycled batch order and dead-latent count after the batch). Written into
#: checkpoints — one of another version is refused — and meant for keys of cached SAEs.
TRAINER_VERSION = 3


# ----- checkpoints -----------------------------------------------------------------------------

# ----- trainer ---------------------------------------------------------------------------------


def make_config(
    config: TrainConfig | str | None = None, expansion: float | None = None, **overrides: Any
) -> TrainConfig:
    """The :class:`TrainConfig` of ``train_sae(data, config, expansion, **overrides)``: ``config`` (default
    ``TrainConfig()``) with ``overrides`` applied; a string ``config`` is the ``sae_type`` (short form)."""
    if isinstance(config, str):
        if "sae_type" in overrides:
            raise TypeError(f"sae_type given twice: {config!r} and {overrides['sae_type']!r}")
        overrides["sae_type"], config = config, None
    if expansion is not None:
        if "expansion" in overrides:
            raise TypeError(f"expansion given twice: {expansion!r} and {overrides['expansion']!r}")
        overrides["expansion"] = expansion
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or an sae_type string, got {type(config).__name__}")
    return (config or TrainConfig()).updated(**overrides)


#: TrainConfig fields that say how a training executes, not what it computes (every choice trains
#: bit-identically), so they stay out of a checkpoint's fingerprint; every other field is in it.
RUN_ONLY_SETTINGS = ("checkpoint_every", "data_on_device", "memory_fraction")


def checkpoint_settings(cfg: TrainConfig, **resolved: Any) -> dict[str, Any]:
    """Every setting of ``cfg`` that shapes the trained SAE, with the defaults ``train_sae`` resolved
    (``lr``, ``warmup_steps``, …) in ``resolved``: a checkpoint is resumed or reused only for the
    same training, however many settings TrainConfig grows."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUN_ONLY_SETTINGS}
    if settings["group_fractions"] is not None:
        settings["group_fractions"] = [float(f) for f in settings["group_fractions"]]
    return {**settings, "aux_alpha": float(cfg.aux_alpha), **resolved}


def train_sae(
    data: TrainingData,
    config: TrainConfig | str | None = None,
    expansion: float | None = None,
    *,
    device: str | torch.device = "auto",
    val_data: TrainingData | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
    **overrides: Any,
) -> tuple[BaseSAE, pd.DataFrame]:
    """Train an SAE on ``data`` (tensor [N, d] or ActivationStore); return (sae, history).

    Settings: ``config`` (a :class:`TrainConfig`; default ``TrainConfig()``) with ``overrides``
    (TrainConfig fields, e.g. ``k=8, steps=600``) applied; ``train_sae(data, "top_k", 4, k=8)``
    is the short form giving ``sae_type`` and ``expansion`` positionally. The rest says where and
    how the run executes: ``device``, ``val_data``, ``checkpoint_dir``, ``progress``, ``resume``
    (continue from a checkpoint there) and ``stop_after``.

    ``history`` has one row per evaluation (every ``eval_every`` steps and at the end): step, lr,
    loss, l2, aux, train L0, dead fraction (no firing within ``dead_tokens`` tokens), threshold
    and, with ``val_data``, val FVU/R²/authors' per-batch R²/L0 (+ per-prefix R² for Matryoshka).
    With ``checkpoint_dir``, resumable checkpoints are written atomically; a rerun resumes and
    ends identically. ``stop_after`` stops early after that many total steps (for tests /
    interrupted runs).

    Defaults reproduce the authors' runs: ``aux_alpha=0.03`` (their scripts; the paper text says
    1/32), ``decay_start=None`` (no LR decay: they decay from step 109,999 of 110k and keep the
    100k checkpoint; ``decay_start=DECAY_LAST_20PCT`` (0.8) restores the former decay over the
    last 20 %, an int is a step, a float a fraction of ``steps``), input scale from ~100 random
    batches (:func:`estimate_input_scale`).

    Device and data: ``device="auto"`` is CUDA when available, else the CPU (see
    :func:`vlmsae_utils.device.resolve_device`). ``data_on_device="auto"`` puts the whole training
    data on the device (in its storage dtype; float16 stores become float32 batch by batch on the
    device) when it takes at most ``memory_fraction`` (default 0.5) of the device's free memory —
    on the CPU that means loaded into RAM, within that share of the available RAM; a tensor
    already on the device is always used in place. Otherwise it streams in chunks of up to 64
    batches gathered by a background thread into pinned memory and copied asynchronously.
    ``True``/``False`` force either path. Batches are a function of ``(seed, step, batch_order)`` only —
    by default the authors' one seeded pass replayed every epoch (:func:`training_batch_rows`) — so
    both paths train bit-identically. ``autocast=False`` (default) computes in float32 as the authors do;
    ``True`` runs the encoder forward in bf16 on CUDA, ``None`` when the GPU supports it (never on the CPU).
    """
    cfg = make_config(config, expansion, **overrides)
    return train_on(data, cfg, resolve_device(device), val_data, checkpoint_dir, progress, resume, stop_after)


def train_on(
    data: TrainingData,
    cfg: TrainConfig,
    dev: torch.device,
    val_data: TrainingData | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
) -> tuple[BaseSAE, pd.DataFrame]:
    """:func:`train_sae` with its settings made and its device resolved by the caller (once, at the
    entry point: :func:`train_sae` or :func:`~vlmsae_utils.train.train_grid`)."""
    d = _check_data(data, val_data)
    dict_size, group_sizes = cfg.sizes(d)
    check_sae_fits(d, dict_size, dev)
    res = _resolve(cfg, dict_size, dev)
    stream = _TrainingStream(
        data, cfg.batch_size, cfg.seed, dev, cfg.data_on_device, cfg.memory_fraction, order=cfg.batch_order
    )
    state = _new_state(cfg, d, dict_size, group_sizes, res, dev)
    run_cfg = {
        **checkpoint_settings(cfg, **dataclasses.asdict(res)),
        "activation_dim": d,
        "dict_size": dict_size,
        "group_sizes": group_sizes,
        "trainer_version": TRAINER_VERSION,
        "data": data_fingerprint(data),
        # the history's validation columns come from this data: a checkpoint of other val data is not reused
        "val_data": data_fingerprint(val_data) if val_data is not None else None,
    }
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        state.restore(ckpt_path, run_cfg, dev)
    else:
        _initialise_from_data(state.sae, stream, cfg, dev)
    end = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    _loop(state, stream, end, cfg, res, val_data, dev, ckpt_path, run_cfg, progress)
    state.sae.eval()
    frame = pd.DataFrame(state.history)
    frame.attrs["training"] = run_cfg  # every resolved setting, for the SAE's config.json (train_grid)
    frame.attrs.update(device=str(dev), data_on_device=stream.resident)
    return state.sae, frame


#: Copies of the weights a training step holds: W_enc and W_dec, their gradients, two Adam moments each.
_WEIGHT_COPIES = 8


def check_sae_fits(d: int, dict_size: int, dev: torch.device) -> None:
    """Refuse, before allocating, an SAE whose weights, gradients and Adam state exceed the free memory
    of ``dev`` (a mistyped expansion of 10⁹ would otherwise fail deep in the allocator)."""
    needed = _WEIGHT_COPIES * d * dict_size * 4
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else _available_ram()
    if needed > free:
        raise ValueError(
            f"an SAE of {dict_size:,} latents on {d}-d activations needs about {needed / 2**30:.1f} GiB for its "
            f"weights, gradients and Adam state; {dev} has {free / 2**30:.1f} GiB free: lower the expansion"
        )


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """The settings a TrainConfig leaves to the run (``None``: a default of the steps or the width)."""

    lr: float
    warmup_steps: int
    decay_start: int | None
    threshold_start_step: int
    eval_every: int
    autocast: bool


def _resolve(cfg: TrainConfig, dict_size: int, dev: torch.device) -> _Resolved:
    """The run's learning rate, warm-up, decay start, threshold start, evaluation period and autocast."""
    steps = cfg.steps
    autocast = cfg.autocast
    if autocast is None:
        autocast = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    elif autocast and dev.type != "cuda":
        raise ValueError(f"autocast (bf16) is only used on CUDA; device is {dev}")
    return _Resolved(
        lr=default_lr(dict_size) if cfg.lr is None else float(cfg.lr),
        warmup_steps=min(1000, max(1, steps // 20)) if cfg.warmup_steps is None else cfg.warmup_steps,
        decay_start=resolve_decay_start(cfg.decay_start, steps),
        threshold_start_step=min(1000, steps // 4) if cfg.threshold_start_step is None else cfg.threshold_start_step,
        eval_every=max(1, steps // 20) if cfg.eval_every is None else cfg.eval_every,
        autocast=bool(autocast),
    )


def _check_data(data: TrainingData, val_data: TrainingData | None) -> int:
    """The activation width, after refusing empty data, a validation width that differs and NaN tensors."""
    d = _data_dim(data)
    if val_data is not None:
        vd = _data_dim(val_data)
        if vd != d:
            raise ValueError(f"val_data has dim {vd}, training data has dim {d}")
        if isinstance(val_data, torch.Tensor):
            _check_finite(val_data, "validation data")
    if len(data) < 1:
        raise ValueError("training data is empty")
    if isinstance(data, torch.Tensor):
        _check_finite(data, "training data")
    return d


@dataclasses.dataclass
class _State:
    """Everything a checkpoint holds: the SAE, its optimiser and schedule, the dead-latent counters,
    the history rows and the number of steps done."""

    sae: BaseSAE
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    since_fired: torch.Tensor
    history: list[dict]
    step: int = 0

    def save(self, path: Path, run_cfg: dict[str, Any]) -> None:
        """Write the state atomically (a rerun resumes from it)."""
        atomic_torch_save(
            {
                "config": run_cfg,
                "step": self.step,
                "model": self.sae.state_dict(),
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "since_fired": self.since_fired.cpu(),
                "history": self.history,
            },
            path,
        )

    def restore(self, path: Path, run_cfg: dict[str, Any], dev: torch.device) -> None:
        """Resume from a checkpoint written for exactly these settings and data (else a ValueError)."""
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt or pickled: torch's message advises weights_only=False
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"checkpoint {path} cannot be read safely ({first}); delete it to train from the start"
            ) from None
        if not isinstance(ck, dict) or not {"config", "model", "opt", "sched", "step"} <= set(ck):
            raise ValueError(
                f"checkpoint {path} is not a checkpoint of this trainer; delete it to train from the start"
            )
        recorded = {"val_data": run_cfg.get("val_data")} | ck["config"]  # written before val data was recorded
        if recorded != run_cfg:
            diff = {kk: (recorded.get(kk), v) for kk, v in run_cfg.items() if recorded.get(kk) != v}
            raise ValueError(f"checkpoint {path} was written with different settings (checkpoint, now): {diff}")
        self.sae.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        self.since_fired = ck["since_fired"].to(dev)
        self.history = list(ck["history"])
        self.step = int(ck["step"])


def _new_state(
    cfg: TrainConfig, d: int, dict_size: int, group_sizes: list[int] | None, res: _Resolved, dev: torch.device
) -> _State:
    """A fresh SAE (seeded, the authors' init unless ``cfg.init`` says otherwise), Adam and its schedule."""
    cls = sae_class(cfg.sae_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = cls.create(d, dict_size, cfg.k if cls.needs_k else None, group_sizes)
        if cfg.init != "uniform":  # the constructor draws the authors' uniform directions
            sae.init_directions(cfg.init)
    sae.to(dev).train()
    opt = _adam(list(sae.parameters()), res.lr)
    schedule = lambda s: lr_lambda(s, cfg.steps, res.warmup_steps, res.decay_start)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    since_fired = torch.zeros(dict_size, dtype=torch.long, device=dev)
    return _State(sae, opt, sched, since_fired, [])


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """The authors' Adam (betas 0.9, 0.999, eps 1e-8), as one fused kernel per step on the CPU and
    CUDA (no [ω, d] temporaries: about 8x faster at ω = 65,536, same update up to rounding);
    foreach elsewhere (MPS, float64)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused or None, foreach=None if fused else True)


def _initialise_from_data(sae: BaseSAE, stream: _TrainingStream, cfg: TrainConfig, dev: torch.device) -> None:
    """Input normalisation from ~100 random batches, geometric-median ``b_dec`` from the first batch (on the CPU)."""
    scale = estimate_input_scale(stream.src, batch_size=cfg.batch_size, seed=cfg.seed)
    first = stream.first_batch()
    with torch.no_grad():
        sae.input_scale.fill_(scale)
        sae.b_dec.copy_(geometric_median(first * scale).to(dev))


def _loop(
    state: _State,
    stream: _TrainingStream,
    end: int,
    cfg: TrainConfig,
    res: _Resolved,
    val_data: TrainingData | None,
    dev: torch.device,
    ckpt_path: Path | None,
    run_cfg: dict[str, Any],
    progress: bool,
) -> None:
    """Steps ``state.step … end − 1``: a history row every ``eval_every`` steps, a checkpoint every ``checkpoint_every``."""
    from tqdm.auto import tqdm

    checkpoint_every = res.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc=f"{cfg.sae_type} ε={cfg.expansion}")
    batches = stream.batches(state.step, end)
    try:
        for step, x in zip(range(state.step, end), batches):
            last = _training_step(state, x, step, cfg, res)
            state.step = done = step + 1
            if done % 10 == 0 or done == end:
                bar.set_postfix(loss=f"{last['loss']:.4g}", L0=f"{last['l0']:.1f}", refresh=False)
            bar.update(1)
            if done % res.eval_every == 0 or done == cfg.steps:
                state.history.append(_history_row(state, last, cfg, val_data, dev))
            if ckpt_path is not None and (done % checkpoint_every == 0 or done == end):
                state.save(ckpt_path, run_cfg)
    finally:
        batches.close()
        bar.close()


def _training_step(state: _State, x: torch.Tensor, step: int, cfg: TrainConfig, res: _Resolved) -> dict[str, float]:
    """One optimiser step of the reference trainer on batch ``x``; returns its loss terms and L0."""
    sae = state.sae
    dead = dead_after_batch(state.since_fired, cfg.dead_tokens, x.shape[0]) if sae.revives_dead_latents else None
    out = sae_loss(
        sae, x, dead_mask=dead, aux_alpha=cfg.aux_alpha, k_aux=cfg.k_aux, l1_coeff=cfg.l1_coeff, autocast=res.autocast
    )
    state.opt.zero_grad(set_to_none=True)
    with record_function("step.backward"):
        out["loss"].backward()
    with record_function("step.project_grad"):
        project_decoder_grad(sae.W_dec)
        if cfg.grad_clip is not None and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    with record_function("step.optimizer"):
        state.opt.step()
        state.sched.step()
    with record_function("step.normalize_decoder"):
        sae.normalize_decoder()
    with record_function("step.bookkeeping"), torch.no_grad():
        state.since_fired += x.shape[0]
        state.since_fired[out["fired"]] = 0
        if step > res.threshold_start_step:  # the threshold EMA starts after it (dictionary_learning's `>`)
            sae.update_threshold(out["min_kept"], cfg.threshold_beta)
    last = {"loss": float(out["loss"].detach()), "l2": float(out["l2"]), "aux": float(out["aux"]), "l0": out["l0"]}
    if not math.isfinite(last["loss"]):
        raise FloatingPointError(f"training diverged at step {step + 1}: loss={last['loss']}")
    return last


def _history_row(
    state: _State, last: dict[str, float], cfg: TrainConfig, val_data: TrainingData | None, dev: torch.device
) -> dict:
    """One row of the history: step, lr, the last step's loss terms, dead fraction, θ and validation metrics."""
    row = {
        "step": state.step,
        "lr": state.opt.param_groups[0]["lr"],
        **last,
        "dead_frac": float((state.since_fired >= cfg.dead_tokens).float().mean()),
        "threshold": float(state.sae.threshold),
    }
    if val_data is not None:
        row.update({f"val_{kk}": v for kk, v in evaluate_on(state.sae, val_data, cfg.batch_size, dev).items()})
    return row
