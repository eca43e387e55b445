"""Robustness evaluation: does Δe survive what happens to music before a model trains on it?

`unlearnable robustness --input PROTECTED_URL --clean CLEAN_URL` samples protected items, applies
each attack to the protected audio (real ffmpeg codecs, soxr resampling, a low-pass, noise, the
MusicLDM view) and measures Δe between CLAP(clean) and CLAP(attacked protected) on the first
10 s window. `retained = Δe_after / Δe_before`. The same attack applied to the clean audio is
reported too (`delta_e_attack_on_clean`): how far the attack alone moves the embedding.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.evaluation.common import Embedder, run_config, sample_pairs, write_outputs
from pipeline.evaluation.extra import require
from pipeline.io.audio import AudioEncodeError, codec_round_trip, decode

Attack = Callable[[np.ndarray, int], np.ndarray]  # [samples, channels] at rate -> same shape


class AttackError(RuntimeError):
    """An attack could not run (e.g. ffmpeg missing or refusing the input)."""


def ffmpeg_round_trip(samples: np.ndarray, rate: int, codec: str, kbps: int) -> np.ndarray:
    """Encode with a real ffmpeg encoder and decode back (pipeline.io.audio.codec_round_trip, with
    its timeout): float32 of the input's shape. AttackError when ffmpeg is missing or fails."""
    try:
        return codec_round_trip(samples, rate, codec, kbps)
    except AudioEncodeError as exc:
        raise AttackError(str(exc)) from exc


def resample_round_trip(samples: np.ndarray, rate: int, via: int) -> np.ndarray:
    import soxr

    down = soxr.resample(samples, rate, via)
    back = soxr.resample(down, via, rate).astype(np.float32)
    out = np.zeros_like(samples)
    n = min(len(back), len(samples))
    out[:n] = back[:n]
    return out


def lowpass(samples: np.ndarray, rate: int, cutoff_hz: float = 8000.0) -> np.ndarray:
    signal = require("scipy.signal", "unlearnable robustness")
    butter, sosfiltfilt = signal.butter, signal.sosfiltfilt

    if cutoff_hz >= rate / 2:
        return samples
    sos = butter(8, cutoff_hz, btype="low", fs=rate, output="sos")
    return sosfiltfilt(sos, samples, axis=0).astype(np.float32)


def white_noise(samples: np.ndarray, rate: int, snr_db: float = 40.0, seed: int = 0) -> np.ndarray:
    power = float(np.mean(samples.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).standard_normal(samples.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + noise).astype(np.float32)


ATTACKS: dict[str, Attack] = {
    "mp3_128": lambda x, r: ffmpeg_round_trip(x, r, "mp3", 128),
    "mp3_192": lambda x, r: ffmpeg_round_trip(x, r, "mp3", 192),
    "mp3_320": lambda x, r: ffmpeg_round_trip(x, r, "mp3", 320),
    "aac_128": lambda x, r: ffmpeg_round_trip(x, r, "aac", 128),
    # libopus runs at 8/12/16/24/48 kHz: ffmpeg encodes at the supported rate nearest the input's
    # (48 kHz for 44.1 kHz), decoding resamples back.
    "opus_96": lambda x, r: ffmpeg_round_trip(x, r, "opus", 96),
    "resample_44k": lambda x, r: resample_round_trip(x, r, 44_100),
    "resample_22k": lambda x, r: resample_round_trip(x, r, 22_050),
    "resample_16k": lambda x, r: resample_round_trip(x, r, 16_000),
    "lowpass_8k": lowpass,
    "noise_40db": white_noise,
}
MUSICLDM_VIEW = "musicldm_view"  # applied in CLAP's 48 kHz domain, not to the file


@dataclass
class RobustnessRow:
    key: str
    shard_id: str
    attack: str
    delta_e_before: float  # Δe(clean, protected)
    delta_e_after: float  # Δe(clean, attacked protected)
    retained: float  # after / before
    delta_e_attack_on_clean: float  # Δe(clean, attacked clean): the attack's own effect
    error: str = ""


def evaluate(
    cfg: PipelineConfig,
    protected_url: str,
    clean_url: str,
    count: int = 20,
    seed: int = 0,
    attacks: list[str] | None = None,
) -> list[RobustnessRow]:
    """Run every attack on up to `count` sampled items; one row per (item, attack)."""
    names = attacks or [*ATTACKS, MUSICLDM_VIEW]
    unknown = [a for a in names if a not in ATTACKS and a != MUSICLDM_VIEW]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {[*ATTACKS, MUSICLDM_VIEW]}")
    embed = Embedder(cfg)
    rows: list[RobustnessRow] = []
    for shard_id, key, clean_bytes, prot_bytes in sample_pairs(
        protected_url, clean_url, cfg.io.storage.storage_options(), count, seed
    ):
        clean, prot = decode(clean_bytes), decode(prot_bytes)
        rate = clean.sample_rate
        e_clean = embed(clean.samples, rate)
        before = float((embed(prot.samples, rate) - e_clean).norm())
        for name in names:
            try:
                if name == MUSICLDM_VIEW:
                    after = float((embed(prot.samples, rate, musicldm_view=True) - e_clean).norm())
                    alone = float((embed(clean.samples, rate, musicldm_view=True) - e_clean).norm())
                else:
                    attack = ATTACKS[name]
                    after = float((embed(attack(prot.samples, rate), rate) - e_clean).norm())
                    alone = float((embed(attack(clean.samples, rate), rate) - e_clean).norm())
                rows.append(RobustnessRow(key, shard_id, name, before, after, after / before, alone))
            except Exception as exc:  # one failing attack never sinks the evaluation
                nan = float("nan")
                rows.append(RobustnessRow(key, shard_id, name, before, nan, nan, nan, f"{type(exc).__name__}: {exc}"))
    return rows


def summary_table(rows: list[RobustnessRow], target: float) -> str:
    """Markdown: attack × median Δe after, median retained, share still ≥ target, attack alone."""
    lines = [
        "| attack | items | median Δe after | median retained | share ≥ target | median Δe of attack alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_attack: dict[str, list[RobustnessRow]] = {}
    for row in rows:
        by_attack.setdefault(row.attack, []).append(row)
    for attack, group in by_attack.items():
        ok = [r for r in group if not r.error]
        if not ok:
            lines.append(f"| {attack} | 0 | error: {group[0].error[:60]} | | | |")
            continue
        after = np.median([r.delta_e_after for r in ok])
        retained = np.median([r.retained for r in ok])
        share = np.mean([r.delta_e_after >= target for r in ok])
        alone = np.median([r.delta_e_attack_on_clean for r in ok])
        lines.append(f"| {attack} | {len(ok)} | {after:.3f} | {retained:.2f} | {share:.0%} | {alone:.3f} |")
    if rows:
        lines.insert(0, f"Δe before attacks (median): {np.median([r.delta_e_before for r in rows]):.3f}\n")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unlearnable robustness", description=__doc__)
    parser.add_argument("--input", required=True, help="protected output folder (has <shard>.parquet)")
    parser.add_argument("--clean", required=True, help="the clean input shards' folder")
    parser.add_argument("--config", help="config (default: the run's saved <input>/_config.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--count", type=int, default=20, help="items to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", help=f"comma list (default all): {', '.join([*ATTACKS, MUSICLDM_VIEW])}")
    parser.add_argument("--out", help="where robustness.parquet/.md go (default: --input)")
    parser.set_defaults(func=cmd_robustness)
    return parser


def cmd_robustness(args: argparse.Namespace) -> int:
    cfg = run_config(args, args.input)
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else None
    rows = evaluate(cfg, args.input, args.clean, args.count, args.seed, attacks)
    if not rows:
        print("no protected items found to evaluate", file=sys.stderr)
        return 1
    table = summary_table(rows, cfg.attack.target_delta_e)
    if cfg.encoder.checkpoint.startswith("random:"):
        table = "RANDOM CLAP WEIGHTS: these figures show the evaluation runs, not real protection.\n\n" + table
    options = cfg.io.storage.storage_options()
    write_outputs([asdict(r) for r in rows], args.out or args.input, options, table, "robustness")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
