"""The report's figures (matplotlib, the evaluation extra), each returned as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np

from pipeline.evaluation.extra import require
from pipeline.evaluation.report.read import (
    CLAP_FMAX,
    MOS_CEILING,
    MOS_HIGH,
    MOS_TARGET,
    MUSICLDM_FMAX,
    QUALITY_LABELS,
    SPECTRO_SECONDS,
)

WHAT = "unlearnable report"  # for the missing-extra message


def _figure(width: float, height: float) -> Any:
    Figure = require("matplotlib.figure", WHAT).Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def delta_e_figure(mean: np.ndarray, minimum: np.ndarray, target: float) -> str:
    fig = _figure(10, 3.6)
    ax = fig.add_subplot()
    mean, minimum = finite(mean), finite(minimum)
    top = max(1.4, float(np.max(mean, initial=0.0)), float(np.max(minimum, initial=0.0))) * 1.02
    bins = np.linspace(0.0, top, 57)
    ax.hist(mean, bins=bins, alpha=0.75, label=f"Δe mean per item (n={mean.size})", color="#3465a4")
    ax.hist(
        minimum,
        bins=bins,
        histtype="step",
        linewidth=1.6,
        label="Δe min per item (worst window)",
        color="#cc0000",
    )
    ax.axvline(target, color="black", linestyle="--", linewidth=1.4, label=f"target {target:g}")
    ax.set_xlabel("Δe = ‖CLAP(x+δ) − CLAP(x)‖₂ (fp32, on the written audio)")
    ax.set_ylabel("items")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _png(fig)


def mos_figure(moslqo: np.ndarray, measured: int, total: int) -> str:
    """Histogram of per-item ViSQOL MOS-LQO with the target (4.0) and 4.5 marked."""
    MaxNLocator = require("matplotlib.ticker", WHAT).MaxNLocator

    fig = _figure(12, 3.4)
    ax = fig.add_subplot()
    values = finite(moslqo)
    low = min(3.0, float(np.floor(np.min(values, initial=3.0) * 4) / 4))
    ax.hist(values, bins=np.arange(low, MOS_CEILING + 0.05, 0.05), color="#75507b", alpha=0.85,
            label=f"MOS-LQO per item (worst excerpt)\n{measured:,} of {total:,} ok items measured")  # fmt: skip
    ax.axvline(MOS_TARGET, color="black", linestyle="--", linewidth=1.4, label=f"target {MOS_TARGET:g}")
    ax.axvline(MOS_HIGH, color="gray", linestyle=":", linewidth=1.4, label=f"{MOS_HIGH:g}")
    ax.axvline(MOS_CEILING, color="#4e9a06", linewidth=1, label=f"identical copy ({MOS_CEILING:g})")
    ax.set_xlim(low, MOS_CEILING + 0.07)
    ax.set_xlabel("ViSQOL v3 audio mode MOS-LQO (48 kHz mono, protected vs clean)")
    ax.set_ylabel("items")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a bar
    ax.grid(alpha=0.3)
    return _png(fig)


def quality_figure(columns: dict[str, np.ndarray], names: list[str]) -> str:
    MaxNLocator = require("matplotlib.ticker", WHAT).MaxNLocator

    cols = 3
    rows = math.ceil(len(names) / cols)
    fig = _figure(12, 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = finite(columns[name])
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # one value: a narrow bar around it, not ±0.5
                pad = max(abs(hi) * 0.05, 1e-6)
                lo, hi = lo - pad, hi + pad
            ax.hist(values, bins=np.linspace(lo, hi, 41), color="#4e9a06", alpha=0.85)
            ax.axvline(float(np.median(values)), color="black", linewidth=1, linestyle=":")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels (0.00295) must not collide
        ax.set_title(f"{QUALITY_LABELS.get(name, name)}  (n={values.size})", fontsize=10)
        ax.grid(alpha=0.3)
    return _png(fig)


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def _stft_db(x: np.ndarray, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """|STFT| in dB re full-scale sine, [freq, frames]."""
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    window = np.hanning(n_fft).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * window
    magnitude = np.abs(np.fft.rfft(frames, axis=1)).T * (2.0 / window.sum())
    return 20.0 * np.log10(np.maximum(magnitude, 1e-10))


def _welch_db(x: np.ndarray, n_fft: int = 4096) -> np.ndarray:
    """Average magnitude spectrum in dB re full-scale sine."""
    spec = _stft_db(x, n_fft=n_fft, hop=n_fft // 2)
    return 10.0 * np.log10(np.maximum(np.mean(10.0 ** (spec / 10.0), axis=1), 1e-20))


def spectrogram_figure(clean: np.ndarray, protected: np.ndarray, rate: int, title: str) -> str:
    n = min(clean.shape[0], protected.shape[0], int(SPECTRO_SECONDS * rate))
    x, y = _mono(clean[:n]), _mono(protected[:n])
    delta = y - x
    s_clean, s_prot, s_delta = _stft_db(x), _stft_db(y), _stft_db(delta)
    extent = (0.0, n / rate, 0.0, rate / 2000.0)
    fig = _figure(12, 6.6)
    fig.suptitle(title, fontsize=11)
    vmax = float(np.max(s_clean, initial=-120.0))
    panels = [
        (s_clean, "clean x", vmax - 90, vmax),
        (s_prot, "protected x+δ", vmax - 90, vmax),
        (s_delta, "δ = protected − clean", None, None),
    ]
    for i, (spec, label, lo, hi) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        if lo is None:
            hi = float(np.percentile(s_delta, 99.5))
            lo = hi - 60
        im = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("s")
        ax.set_ylabel("kHz")
        fig.colorbar(im, ax=ax, label="dBFS")
    ax = fig.add_subplot(2, 2, 4)
    freqs = np.fft.rfftfreq(4096, 1.0 / rate) / 1000.0
    ax.plot(freqs, _welch_db(x), label="clean", color="#3465a4", linewidth=1)
    ax.plot(freqs, _welch_db(delta), label="δ", color="#cc0000", linewidth=1)
    for fmax, label in ((MUSICLDM_FMAX, "MusicLDM fmax"), (CLAP_FMAX, "CLAP fmax")):
        if fmax < rate / 2:
            ax.axvline(fmax / 1000.0, color="gray", linestyle="--", linewidth=1)
            ax.text(
                fmax / 1000.0, 0.97, label + " ", transform=ax.get_xaxis_transform(), fontsize=8,
                rotation=90, ha="right", va="top", color="dimgray",
            )  # fmt: skip
    ax.set_xlabel("kHz")
    ax.set_ylabel("dBFS (mean spectrum)")
    ax.set_title("spectrum of δ vs clean", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a line
    ax.grid(alpha=0.3)
    return _png(fig)
