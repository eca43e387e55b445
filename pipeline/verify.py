"""`unlearnable verify --clean A --delivered B`: is B a protected version of A?

Checks, in order (docs/service.md, "Verify a delivered file"):

1. same rate and channels, and B aligned to A (codec_lag for lossy or length-changed files) with an
   aligned SNR of at least VERSION_MIN_SNR_DB: otherwise B is not a version of A (exit 3);
2. L∞ of B − A within attack.eps + one LSB of B's grid (lossless B only; a lossy B cannot hold
   the bound and is reported as lossy);
3. Δe of B against A through the configured encoder (CLAP's own view, mean over 10 s windows)
   and through MusicLDM's deterministic view: under `min_delta_e` the protection is missing or a
   lossy re-encode has eaten it (exit 4);
4. optionally, Δe left after an MP3 128 kbps round trip of B (would a re-encode eat it?).

Exit codes: 0 protected; 3 not a version of A; 4 protection missing or lost; 5 a lossless B
outside the ε bound. No Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PipelineConfig
from pipeline.core.views import musicldm
from pipeline.core.windows import plan_windows
from pipeline.encoders.base import ClapView
from pipeline.encoders.load import LoadedEncoder, load_configured_encoder
from pipeline.io.audio import LOSSY_FORMATS, DecodedAudio, aligned_linf, codec_lag, codec_round_trip, decode, lsb

VERSION_MIN_SNR_DB = 10.0  # aligned SNR of B against A below this: B is other audio, not a version of A
DEFAULT_THRESHOLD_SHARE = 0.5  # default min Δe = this × attack.target_delta_e
EXIT_CODES = {"protected": 0, "not_a_version": 3, "unprotected": 4, "protection_lost": 4, "out_of_bound": 5}


@dataclass
class VerifyReport:
    """What `verify` found; `to_json()` is what the command prints with --json."""

    verdict: str = "not_a_version"  # protected | not_a_version | unprotected | protection_lost | out_of_bound
    reasons: list[str] = field(default_factory=list)
    clean_format: str = ""
    delivered_format: str = ""
    lossy_delivered: bool = False
    sample_rate: int = 0  # Hz
    channels: int = 0
    lag: int = 0  # samples B is shifted by against A
    aligned_snr_db: float = float("nan")  # signal of A over (B − A) after alignment, dB
    linf: float = float("nan")  # max |B − A| after alignment
    eps: float = float("nan")
    within_bound: bool = False  # lossless, same length, linf ≤ ε + 1 LSB
    delta_e: float = float("nan")  # mean over windows, configured encoder
    delta_e_min: float = float("nan")
    delta_e_musicldm: float = float("nan")
    delta_e_mp3_128: float = float("nan")  # after an MP3 128 kbps round trip of B (NaN: not run)
    min_delta_e: float = float("nan")  # the threshold used
    encoder_id: str = ""
    random_encoder: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["exit_code"] = self.exit_code
        return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()})


def aligned_pair(clean: np.ndarray, delivered: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples both have once B is shifted by `lag`: (A part, B part), [samples, channels]."""
    first = max(0, -lag)
    last = min(clean.shape[0], delivered.shape[0] - lag)
    if last <= first:
        empty = np.zeros((0, clean.shape[1]), dtype=np.float32)
        return empty, empty
    return clean[first:last], delivered[first + lag : last + lag]


def snr_db(clean: np.ndarray, other: np.ndarray) -> float:
    """10·log10(Σ clean² / Σ (other − clean)²); +inf for identical, NaN for empty or silent A."""
    signal = float(np.square(clean, dtype=np.float64).sum())
    noise = float(np.square(other.astype(np.float64) - clean).sum())
    if clean.size == 0 or signal == 0:
        return float("nan")
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


@torch.no_grad()
def window_delta_e(
    encoder: LoadedEncoder, clean: np.ndarray, other: np.ndarray, rate: int, view: str = "clap", batch: int = 4
) -> np.ndarray:
    """Δe per 10 s window (1 s overlap) of `other` against `clean` (aligned, same shape
    [samples, channels]) through CLAP's view, or `view="musicldm"` MusicLDM's deterministic one."""
    plan = plan_windows(clean.shape[0], round(10.0 * rate), round(1.0 * rate))
    clap_view = ClapView(rate).to(encoder.device)
    out = []
    for begin in range(0, len(plan.starts), batch):
        starts, lengths = plan.starts[begin : begin + batch], plan.lengths[begin : begin + batch]
        pair = []
        for source in (clean, other):
            stacked = np.zeros((len(starts), clean.shape[1], plan.window), dtype=np.float32)
            for b, (s, n) in enumerate(zip(starts, lengths)):
                stacked[b, :, :n] = source[s : s + n].T
            x = torch.from_numpy(stacked).to(encoder.device)
            clap_input = clap_view(x, torch.tensor(lengths, device=encoder.device))
            if view == "musicldm":
                clap_input = musicldm(clap_input)
            pair.append(encoder.model(clap_input).float())
        out.append((pair[1] - pair[0]).norm(dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def verify_audio(
    clean: DecodedAudio,
    delivered: DecodedAudio,
    cfg: PipelineConfig,
    *,
    encoder: LoadedEncoder | None = None,
    min_delta_e: float | None = None,
    reencode: bool = True,
) -> VerifyReport:
    """The report for decoded A (`clean`) and B (`delivered`); see the module docstring."""
    r = VerifyReport(
        clean_format=f"{clean.format}/{clean.subtype}",
        delivered_format=f"{delivered.format}/{delivered.subtype}",
        lossy_delivered=delivered.format in LOSSY_FORMATS,
        sample_rate=delivered.sample_rate,
        channels=delivered.channels,
        eps=cfg.attack.eps,
        min_delta_e=min_delta_e if min_delta_e is not None else DEFAULT_THRESHOLD_SHARE * cfg.attack.target_delta_e,
    )
    if (clean.sample_rate, clean.channels) != (delivered.sample_rate, delivered.channels):
        r.reasons.append(
            f"B is {delivered.channels} ch at {delivered.sample_rate} Hz, "
            f"A is {clean.channels} ch at {clean.sample_rate} Hz"
        )
        return r
    a, b = clean.samples, delivered.samples
    same_length = a.shape[0] == b.shape[0]
    r.lag = codec_lag(a, b) if r.lossy_delivered or not same_length else 0
    part_a, part_b = aligned_pair(a, b, r.lag)
    r.aligned_snr_db = snr_db(part_a, part_b)
    r.linf = aligned_linf(a, b, r.lag)
    if not part_a.size or not (r.aligned_snr_db >= VERSION_MIN_SNR_DB):
        r.reasons.append(f"aligned SNR {r.aligned_snr_db:.1f} dB < {VERSION_MIN_SNR_DB:g} dB: B is other audio")
        return r
    if r.linf == 0:  # sample-identical: δ is zero, and so is Δe (no encoder needed to say so)
        r.verdict, r.delta_e, r.delta_e_min, r.delta_e_musicldm = "unprotected", 0.0, 0.0, 0.0
        r.reasons.append("B is sample-identical to A")
        return r
    r.within_bound = bool(
        not r.lossy_delivered and same_length and r.lag == 0 and r.linf <= cfg.attack.eps + lsb(delivered.subtype)
    )
    encoder = encoder or load_configured_encoder(cfg.encoder, cfg.io.storage.storage_options())
    r.encoder_id, r.random_encoder = encoder.encoder_id, encoder.is_random
    rate = delivered.sample_rate
    per_window = window_delta_e(encoder, part_a, part_b, rate)
    r.delta_e, r.delta_e_min = float(per_window.mean()), float(per_window.min())
    r.delta_e_musicldm = float(window_delta_e(encoder, part_a, part_b, rate, view="musicldm").mean())
    if reencode and not r.lossy_delivered:
        try:
            trip = codec_round_trip(part_b, rate, "mp3", 128)
            r.delta_e_mp3_128 = float(window_delta_e(encoder, part_a, trip, rate).mean())
        except Exception as exc:  # ffmpeg missing or failing: the figure stays NaN, the reason is said
            r.reasons.append(f"MP3 128 kbps round trip not measured: {type(exc).__name__}: {exc}")
    if not r.delta_e >= r.min_delta_e:
        r.verdict = "protection_lost" if r.lossy_delivered else "unprotected"
        where = "a lossy re-encode has eaten it" if r.lossy_delivered else "B carries no effective δ"
        r.reasons.append(f"Δe {r.delta_e:.3f} < {r.min_delta_e:.3f}: {where}")
    elif not r.lossy_delivered and not r.within_bound:
        r.verdict = "out_of_bound"
        r.reasons.append(f"L∞ {r.linf:.5f} exceeds ε {cfg.attack.eps:g} (+1 LSB) or the length changed")
    else:
        r.verdict = "protected"
    if r.random_encoder:
        r.reasons.append("RANDOM encoder weights: these Δe figures say nothing about real protection")
    return r


def verify_files(
    clean_path: str,
    delivered_path: str,
    cfg: PipelineConfig,
    *,
    min_delta_e: float | None = None,
    reencode: bool = True,
) -> VerifyReport:
    """`verify_audio` of two local files (decoded with pipeline.io.audio.decode)."""
    clean = decode(Path(clean_path).read_bytes())
    delivered = decode(Path(delivered_path).read_bytes())
    return verify_audio(clean, delivered, cfg, min_delta_e=min_delta_e, reencode=reencode)


def summary_line(r: VerifyReport) -> str:
    """One human line: verdict, Δe figures, bound."""
    return (
        f"{r.verdict.upper()}: Δe {r.delta_e:.3f} (min {r.delta_e_min:.3f}, MusicLDM view {r.delta_e_musicldm:.3f}, "
        f"after MP3 128k {r.delta_e_mp3_128:.3f}; threshold {r.min_delta_e:.3f}), L∞ {r.linf:.5f} "
        f"(ε {r.eps:g}: {'within' if r.within_bound else 'not within'}), lag {r.lag}, SNR {r.aligned_snr_db:.1f} dB, "
        f"{r.delivered_format}; encoder {r.encoder_id or '-'}"
    )
