"""The evaluation extra: libraries only the evaluation commands use (matplotlib, diffusers, librosa,
tqdm, scipy), installed with `pip install 'music-unlearnable[eval]'` and imported only when a
command needs them, with one clear error when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'music-unlearnable[eval]'"


class EvalExtraMissing(ImportError):
    """An evaluation library is not installed."""


def require(module: str, what: str) -> ModuleType:
    """Import `module` (e.g. "matplotlib.figure") for `what` (e.g. "unlearnable report").

    Raises:
        EvalExtraMissing: the library is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise EvalExtraMissing(f"{what} needs the evaluation extra: {INSTALL_HINT} ({top} is not installed)") from exc
