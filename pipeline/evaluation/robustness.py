"""Robustness evaluation: does Δe survive what happens to music before a model trains on it?

`unlearnable robustness --input PROTECTED_URL --clean CLEAN_URL` samples protected items, applies
each attack to the protected audio (real ffmpeg codecs, soxr resampling, a low-pass, noise, the
MusicLDM view) and measures Δe between CLAP(clean) and CLAP(attacked protected) on the first
10 s window. `retained = Δe_after / Δe_before`. The same attack applied to the clean audio is
reported too (`delta_e_attack_on_clean`): how far the attack alone moves the embedding.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
import yaml

from pipeline.config import PipelineConfig, config_from_dict, load_config
from pipeline.core.views import musicldm
from pipeline.encoders.base import ClapView
from pipeline.encoders.load import load_configured_encoder
from pipeline.io.audio import decode
from pipeline.io.output import OutputFolder
from pipeline.io.shards import read_samples

Attack = Callable[[np.ndarray, int], np.ndarray]  # [samples, channels] at rate -> same shape


class AttackError(RuntimeError):
    """An attack could not run (e.g. ffmpeg missing or refusing the input)."""


def ffmpeg_round_trip(samples: np.ndarray, rate: int, codec_args: list[str], suffix: str) -> np.ndarray:
    """Encode with ffmpeg (a real encoder), decode back to float32 at the same rate, channels and
    length. Temp files, not pipes: containers then carry encoder delay, so decoding is gapless."""
    binary = shutil.which("ffmpeg")
    if binary is None:
        raise AttackError("ffmpeg not found (apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory() as tmp:
        source, coded, back = Path(tmp) / "in.wav", Path(tmp) / f"coded{suffix}", Path(tmp) / "out.wav"
        sf.write(source, samples, rate, subtype="FLOAT")
        for args in (
            [binary, "-v", "error", "-y", "-i", str(source), *codec_args, str(coded)],
            [binary, "-v", "error", "-y", "-i", str(coded), "-ar", str(rate), "-c:a", "pcm_f32le", str(back)],
        ):
            done = subprocess.run(args, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise AttackError(f"ffmpeg failed: {done.stderr.strip()[-300:]}")
        decoded, _ = sf.read(back, dtype="float32", always_2d=True)
    out = np.zeros_like(samples)
    n = min(len(decoded), len(samples))
    out[:n] = decoded[:n, : samples.shape[1]]
    return out


def resample_round_trip(samples: np.ndarray, rate: int, via: int) -> np.ndarray:
    import soxr

    down = soxr.resample(samples, rate, via)
    back = soxr.resample(down, via, rate).astype(np.float32)
    out = np.zeros_like(samples)
    n = min(len(back), len(samples))
    out[:n] = back[:n]
    return out


def lowpass(samples: np.ndarray, rate: int, cutoff_hz: float = 8000.0) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    if cutoff_hz >= rate / 2:
        return samples
    sos = butter(8, cutoff_hz, btype="low", fs=rate, output="sos")
    return sosfiltfilt(sos, samples, axis=0).astype(np.float32)


def white_noise(samples: np.ndarray, rate: int, snr_db: float = 40.0, seed: int = 0) -> np.ndarray:
    power = float(np.mean(samples.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).standard_normal(samples.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + noise).astype(np.float32)


ATTACKS: dict[str, Attack] = {
    "mp3_128": lambda x, r: ffmpeg_round_trip(x, r, ["-c:a", "libmp3lame", "-b:a", "128k"], ".mp3"),
    "mp3_192": lambda x, r: ffmpeg_round_trip(x, r, ["-c:a", "libmp3lame", "-b:a", "192k"], ".mp3"),
    "mp3_320": lambda x, r: ffmpeg_round_trip(x, r, ["-c:a", "libmp3lame", "-b:a", "320k"], ".mp3"),
    "aac_128": lambda x, r: ffmpeg_round_trip(x, r, ["-c:a", "aac", "-b:a", "128k"], ".m4a"),
    "opus_96": lambda x, r: ffmpeg_round_trip(
        x, r, ["-c:a", "libopus", "-b:a", "96k", "-ar", "48000"], ".opus"
    ),  # opus runs at 48 kHz; decoding resamples back
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


class Embedder:
    """CLAP embedding of the first 10 s window of a track, with an optional 48 kHz view."""

    def __init__(self, cfg: PipelineConfig, spec: str | None = None):
        self.encoder = load_configured_encoder(cfg.encoder, cfg.io.storage.storage_options(), spec)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, rate: int, musicldm_view: bool = False) -> torch.Tensor:
        window = samples[: round(10.0 * rate)]
        x = torch.from_numpy(np.ascontiguousarray(window.T))[None].to(self.encoder.device)
        clap_input = ClapView(rate).to(self.encoder.device)(x, torch.tensor([window.shape[0]], device=x.device))
        if musicldm_view:
            clap_input = musicldm(clap_input)
        return self.encoder.model(clap_input)[0].float().cpu()


def sample_pairs(protected_url: str, clean_url: str, storage_options: dict, count: int, seed: int):
    """Up to `count` (shard_id, key, clean bytes, protected bytes) of ok items, sampled by seed;
    `clean_url` is the folder of the input shards (same shard names as the outputs)."""
    out = OutputFolder(protected_url, storage_options)
    candidates: list[tuple[str, str, str, str]] = []
    for shard_id in sorted(out.completed()):
        with out.fs.open(out.key(f"{shard_id}.parquet"), "rb") as f:
            table = pq.read_table(f, columns=["key", "status", "input_member", "output_member"])
        for row in table.to_pylist():
            if row["status"] == "ok":
                candidates.append((shard_id, row["key"], row["input_member"], row["output_member"]))
    random.Random(seed).shuffle(candidates)
    chosen = candidates[:count]
    by_shard: dict[str, list[tuple[str, str, str]]] = {}
    for shard_id, key, input_member, output_member in chosen:
        by_shard.setdefault(shard_id, []).append((key, input_member, output_member))
    clean_root = clean_url.rstrip("/")
    for shard_id, items in sorted(by_shard.items()):
        clean_samples, _ = read_samples(f"{clean_root}/{shard_id}.tar", storage_options)
        prot_samples, _ = read_samples(out.url + f"/{shard_id}.tar", storage_options)
        clean_members = {n: d for s in clean_samples for n, d in zip(s.names, s.data)}
        prot_members = {n: d for s in prot_samples for n, d in zip(s.names, s.data)}
        for key, input_member, output_member in items:
            if input_member in clean_members and output_member in prot_members:
                yield shard_id, key, clean_members[input_member], prot_members[output_member]


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


def write_outputs(rows: list[dict], out_dir: str, storage_options: dict, table: str, stem: str) -> None:
    """`<stem>.parquet` (one row per dict) and `<stem>.md` under `out_dir` (local or s3://)."""
    folder = OutputFolder(out_dir, storage_options)
    folder.ensure()
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    folder.write_atomic(f"{stem}.parquet", buffer.getvalue().to_pybytes())
    folder.write_atomic(f"{stem}.md", (table + "\n").encode())


def run_config(args: argparse.Namespace, output_url: str) -> PipelineConfig:
    """--config if given, else the run's saved `<output>/_config.yaml`; then --set overrides."""
    overrides = list(args.set or [])
    if args.config:
        return load_config(args.config, overrides)
    saved = OutputFolder(output_url)
    try:
        data = yaml.safe_load(saved.read_text("_config.yaml"))
    except FileNotFoundError:
        data = {}
    return config_from_dict(data or {}, overrides)


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
