"""One rule for where and in which precision the models run.

``device="auto"`` means the first CUDA device when one is available, else the CPU; explicit
``"cpu"``, ``"cuda"``, ``"cuda:1"`` are checked against what this machine has. Entry points
(notebooks, sweeps, the public stage functions) resolve the device once with
:func:`resolve_device` and pass a :class:`torch.device` down; nothing below picks one itself.

``model_dtype="auto"`` is the precision the authors run each frozen model in (:data:`AUTO_CUDA_DTYPES`):
float32 for the vision encoders, the DINOv2 scorer and the CLIP judge of steering, float16 for
LLaVA on CUDA; float32 for everything on the CPU. ``"float16"``/``"bfloat16"`` ask for half
precision explicitly (about twice as fast on a GPU; the stored activations then carry its
rounding). It is separate from the store's dtype (how activations are written to disk) and from
the SAE's training precision.
"""

from __future__ import annotations

import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: ``model_dtype="auto"`` on CUDA per model role, as the authors' code runs them: encoders and
#: DINOv2 in float32 (``models/clip.py``, ``models/dino.py``), the CLIP judge in float32
#: (``utils.get_text_model``), LLaVA-1.5 in float16 (``models/llava.py``).
AUTO_CUDA_DTYPES = {"encoder": torch.float32, "judge": torch.float32, "llava": torch.float16}
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "AUTO_CUDA_DTYPES",
    "DEVICE_NAMES",
    "MODEL_DTYPES",
    "available_devices",
    "cuda_synchronize",
    "resolve_device",
    "resolve_model_dtype",
]


def available_devices() -> list[str]:
    """Names of the devices this process can use, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA if available else CPU; other names are checked, with a clear error.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu', 'cuda', 'cuda:1'; got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICE_NAMES)}") from err
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but CUDA is not available here; "
                f"available: {', '.join(available_devices())} (use device='auto' or 'cpu')"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist; available: {', '.join(available_devices())}")
        return parsed
    if parsed.type == "mps" and "mps" in available_devices():
        return parsed
    raise ValueError(f"device {device!r} is not available; available: {', '.join(available_devices())}")


def resolve_model_dtype(
    model_dtype: str | torch.dtype | None, device: torch.device, role: str = "encoder"
) -> torch.dtype:
    """``"auto"`` → the authors' precision for ``role`` on CUDA (:data:`AUTO_CUDA_DTYPES`: float16 for
    ``"llava"`` only), float32 elsewhere.

    Half precision on the CPU is refused: many CPU kernels lack float16 and the rest are slow.
    """
    if isinstance(model_dtype, torch.dtype):
        name = str(model_dtype).removeprefix("torch.")
    else:
        name = "auto" if model_dtype in (None, "auto") else model_dtype
    if role not in AUTO_CUDA_DTYPES:
        raise ValueError(f"unknown model role {role!r}; valid: {', '.join(AUTO_CUDA_DTYPES)}")
    if name == "auto":
        return AUTO_CUDA_DTYPES[role] if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"unknown model_dtype {model_dtype!r}; valid: auto, {', '.join(MODEL_DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise ValueError(
            "model_dtype 'float16' is not supported on the CPU (missing and slow kernels); "
            "use 'float32' or 'bfloat16', or run on CUDA"
        )
    if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} does not support bfloat16; use 'float16' or 'float32'")
    return MODEL_DTYPES[name]


def cuda_synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (for honest timings); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
