"""Quality-vs-efficacy frontier: how much Δe each perceptual setting buys, and at what ViSQOL.

`unlearnable frontier --catalog DIR --out OUT` protects excerpts of every audio file in DIR once per
"case" (a label plus config overrides such as `attack.perceptual=linf attack.eps=0.001`, applied on
top of `--config`), then scores each protected excerpt against its clean original with ViSQOL v3
(MOS-LQO, 1-4.73; CPU process pool, after all protection is done). Outputs in OUT:

- rows.parquet: one row per case × excerpt (Δe clean view and MusicLDM view, MOS-LQO, NMR, SNR, L∞)
- frontier.md: per case median/min MOS-LQO, share ≥ 4.0, median Δe (both views), NMR, SNR; per track
- frontier.png: median Δe (clean view, MusicLDM view) against median MOS-LQO, one line per mode

The catalog's optional catalog.json (jobs/real_music_catalog.py writes one) labels tracks with a
genre and a measured bandwidth. With random encoder weights the Δe figures show the mechanism only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

from pipeline.config import ConfigError, EncoderConfig, PipelineConfig, load_config
from pipeline.core.protect import Track, TrackProtector
from pipeline.encoders.load import LoadedEncoder

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
DEFAULT_EPS = (0.0001, 0.0003, 0.001, 0.003)  # linear amplitude, full scale 1.0
DEFAULT_STRENGTHS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Case:
    """One setting of the sweep: config overrides applied on top of the base config."""

    label: str
    overrides: tuple[str, ...]
    mode: str = ""  # plot/table group; empty: the resolved attack.perceptual
    level: float | None = None  # x position within its mode; None: attack.strength if set, else attack.eps


@dataclass
class FrontierRow:
    """One protected excerpt of one case (rows.parquet)."""

    case: str
    mode: str
    level: float  # the case's level within its mode (strength or ε)
    eps: float  # attack.eps, linear full scale
    strength: float  # attack.strength in the spectral mode, else NaN
    track: str  # file name in the catalog
    genre: str
    bandwidth_hz: float  # from catalog.json, NaN when unknown
    full_band: bool | None
    position: float  # excerpt centre, fraction of the track
    excerpt_seconds: float
    delta_e: float  # fp32 Δe, clean 48 kHz view, mean over windows
    delta_e_musicldm: float  # fp32 Δe through the deterministic MusicLDM view
    visqol_moslqo: float  # 1-4.73 against the clean excerpt
    nmr_db: float  # noise-to-mask ratio, dB
    mask_energy_above: float  # share of δ's energy above the masking threshold
    snr_db: float
    linf: float  # max |x' - x|
    seconds: float  # protection compute seconds attributed to the excerpt
    error: str = ""


@dataclass
class CatalogTrack:
    """An audio file of the catalog and its labels."""

    path: Path
    genre: str = ""
    bandwidth_hz: float = float("nan")
    full_band: bool | None = None


@dataclass
class Excerpt:
    """A clean excerpt of a catalog track: float32 [samples, channels] at `rate` Hz."""

    track: CatalogTrack
    position: float
    samples: np.ndarray
    rate: int
    mono: np.ndarray = field(init=False)  # float32 down-mix, what ViSQOL compares

    def __post_init__(self) -> None:
        self.mono = self.samples.mean(axis=1, dtype=np.float64).astype(np.float32)

    @property
    def key(self) -> str:
        return f"{self.track.path.name}@{self.position:g}"


# ------------------------------------------------------------------------------------------- cases


def default_cases() -> list[Case]:
    """Legacy modes as they shipped before the spectral mode (full band, α = ε/5 and σ = ε/4) over
    ε, and the spectral mode over its strength 1..5 (everything else: the base config)."""
    cases = []
    for mode in ("linf", "masking"):
        for eps in DEFAULT_EPS:
            overrides = (f"attack.perceptual={mode}", f"attack.eps={eps:g}", f"attack.alpha={eps / 5:g}",
                         f"attack.sigma={eps / 4:g}", "attack.passband_hz=null")  # fmt: skip
            cases.append(Case(f"{mode}-eps{eps:g}", overrides, mode, eps))
    for strength in DEFAULT_STRENGTHS:
        overrides = ("attack.perceptual=spectral", f"attack.strength={strength}")
        cases.append(Case(f"spectral-s{strength}", overrides, "spectral", float(strength)))
    return cases


def load_cases(path: str | Path) -> list[Case]:
    """Cases from YAML: a list (or `cases:` list) of {label, overrides: [k=v, ...], mode?, level?}."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("cases")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of cases (or a `cases:` list)")
    cases = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "label" not in item:
            raise ConfigError(f"{path}: case {i + 1} must be a mapping with a label")
        unknown = sorted(set(item) - {"label", "overrides", "mode", "level"})
        if unknown:
            raise ConfigError(f"{path}: case {item['label']!r}: unknown key(s) {unknown}")
        overrides = item.get("overrides") or []
        if isinstance(overrides, str):
            overrides = overrides.split()
        level = item.get("level")
        cases.append(
            Case(
                str(item["label"]),
                tuple(str(o) for o in overrides),
                str(item.get("mode") or ""),
                None if level is None else float(level),
            )
        )
    return cases


@dataclass(frozen=True)
class ResolvedCase:
    """A case with its validated config and the labels derived from it."""

    case: Case
    cfg: PipelineConfig
    mode: str
    level: float
    eps: float
    strength: float


def resolve_cases(
    cases: list[Case], base: str | None, common: list[str], steps: int | None, skip_invalid: bool = False
) -> list[ResolvedCase]:
    """Validate every case's config before any work starts. An invalid case raises ConfigError
    naming it (or is dropped with a warning under `skip_invalid`)."""
    labels = [c.label for c in cases]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ConfigError(f"case labels must be unique; repeated: {duplicated}")
    resolved = []
    for case in cases:
        overrides = [*common, *case.overrides, *([f"attack.steps={steps}"] if steps is not None else [])]
        try:
            cfg = load_config(base, overrides)
        except ConfigError as exc:
            message = f"case {case.label!r} ({' '.join(case.overrides)}): {exc}"
            if not skip_invalid:
                raise ConfigError(message + " (fix or drop the case; --skip-invalid leaves such cases out)") from exc
            print(f"frontier: skipping invalid {message}", file=sys.stderr, flush=True)
            continue
        spectral = cfg.attack.perceptual == "spectral"
        strength = float(getattr(cfg.attack, "strength", float("nan"))) if spectral else float("nan")
        mode = case.mode or cfg.attack.perceptual
        level = case.level
        if level is None:
            level = strength if spectral else cfg.attack.eps
        resolved.append(ResolvedCase(case, cfg, mode, float(level), cfg.attack.eps, strength))
    if not resolved:
        raise ConfigError("no valid case left to run")
    return resolved


# ----------------------------------------------------------------------------------------- catalog


def read_catalog(folder: str | Path, limit: int | None = None) -> list[CatalogTrack]:
    """The audio files of `folder` (sorted by name), labelled from its catalog.json when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"catalog folder {folder} does not exist")
    labels: dict[str, dict[str, Any]] = {}
    listing = folder / "catalog.json"
    if listing.exists():
        labels = {t["file"]: t for t in json.loads(listing.read_text()).get("tracks", [])}
    tracks = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            continue
        info = labels.get(path.name, {})
        bandwidth = info.get("bandwidth_hz")
        tracks.append(
            CatalogTrack(
                path,
                genre=str(info.get("genre", "")),
                bandwidth_hz=float("nan") if bandwidth is None else float(bandwidth),
                full_band=info.get("full_band"),
            )
        )
    if not tracks:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {folder}")
    return tracks[:limit] if limit else tracks


def cut_excerpts(track: CatalogTrack, positions: list[float], seconds: float) -> list[Excerpt]:
    """`seconds`-long excerpts centred at each position (fraction of the track), clamped inside it;
    the whole track when it is shorter."""
    samples, rate = sf.read(track.path, dtype="float32", always_2d=True)
    length = min(len(samples), round(seconds * rate))
    excerpts = []
    for position in positions:
        start = round(position * len(samples) - length / 2)
        start = max(0, min(start, len(samples) - length))
        excerpts.append(Excerpt(track, position, np.ascontiguousarray(samples[start : start + length]), rate))
    return excerpts


# -------------------------------------------------------------------------------------- protection


class ProtectorFactory:
    """build_protector for each case, loading each distinct encoder only once across cases
    (cache keyed by the frozen, hashable EncoderConfig and checkpoint spec)."""

    def __init__(self) -> None:
        self._encoders: dict[tuple[EncoderConfig, str], LoadedEncoder] = {}

    def build(self, cfg: PipelineConfig) -> TrackProtector:
        from pipeline.api import build_protector
        from pipeline.encoders.load import load_configured_encoder

        enc = cfg.encoder
        options = cfg.io.storage.storage_options()
        encoders = []
        for spec in (enc.checkpoint, *enc.ensemble):
            if (enc, spec) not in self._encoders:
                self._encoders[(enc, spec)] = load_configured_encoder(enc, options, spec)
            encoders.append(self._encoders[(enc, spec)])
        return build_protector(cfg, encoders)


def protect_case(
    resolved: ResolvedCase, protector: TrackProtector, excerpts: list[Excerpt], label: str
) -> tuple[list[FrontierRow], list[np.ndarray | None]]:
    """Protect every excerpt under one case (one call per track); rows without ViSQOL yet, and the
    protected mono down-mixes (None where protection failed)."""
    rows: list[FrontierRow] = []
    protected: list[np.ndarray | None] = []
    by_track: dict[Path, list[Excerpt]] = {}
    for excerpt in excerpts:
        by_track.setdefault(excerpt.track.path, []).append(excerpt)
    for t, group in enumerate(by_track.values()):
        started = time.perf_counter()
        results = protector.protect([Track(e.key, e.samples, e.rate, "PCM_24") for e in group])
        for excerpt, result in zip(group, results):
            ok = not result.error and result.samples is not None
            rows.append(
                FrontierRow(
                    case=resolved.case.label,
                    mode=resolved.mode,
                    level=resolved.level,
                    eps=resolved.eps,
                    strength=resolved.strength,
                    track=excerpt.track.path.name,
                    genre=excerpt.track.genre,
                    bandwidth_hz=excerpt.track.bandwidth_hz,
                    full_band=excerpt.track.full_band,
                    position=excerpt.position,
                    excerpt_seconds=len(excerpt.samples) / excerpt.rate,
                    delta_e=result.delta_e_mean,
                    delta_e_musicldm=result.delta_e_musicldm,
                    visqol_moslqo=float("nan"),
                    nmr_db=result.nmr_db,
                    mask_energy_above=result.mask_energy_above,
                    snr_db=result.snr_db,
                    linf=result.linf,
                    seconds=result.seconds,
                    error=result.error,
                )
            )
            mono = result.samples.mean(axis=1, dtype=np.float64).astype(np.float32) if ok else None
            protected.append(mono)
        figures = ", ".join(f"Δe {r.delta_e:.3f} (MusicLDM {r.delta_e_musicldm:.3f})" for r in rows[-len(group) :])
        print(
            f"[{label}] track {t + 1}/{len(by_track)} {group[0].track.path.name}: {figures}; "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows, protected


def _visqol_task(clean: np.ndarray, protected: np.ndarray, rate: int) -> float:
    """ViSQOL of two mono float32 signals (a top-level function, so process pools can run it)."""
    from pipeline.core.quality import visqol_moslqo

    return visqol_moslqo(clean[:, None], protected[:, None], rate)


def score_visqol(jobs: list[tuple[np.ndarray, np.ndarray, int]], workers: int) -> list[float]:
    """MOS-LQO of each (clean mono, protected mono, rate) in a spawn process pool; progress to stderr."""
    scores = [float("nan")] * len(jobs)
    if not jobs:
        return scores
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_visqol_task, *job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            scores[futures[future]] = future.result()
            if done == len(jobs) or done % max(1, len(jobs) // 20) == 0:
                print(f"visqol {done}/{len(jobs)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return scores


# --------------------------------------------------------------------------------------------- CLI


def _positions(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError("positions are fractions of the track in [0, 1], comma-separated")
    return values


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unlearnable frontier", description=__doc__)
    parser.add_argument("--catalog", required=True, help="folder of audio files (catalog.json optional)")
    parser.add_argument("--out", required=True, help="output folder: rows.parquet, frontier.md, frontier.png")
    parser.add_argument("--config", help="base YAML config (default: the code's defaults)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every case")
    parser.add_argument("--cases", help="YAML list of cases {label, overrides, mode?, level?} (default: built in)")
    parser.add_argument("--steps", type=int, help="attack.steps for every case")
    parser.add_argument("--excerpt-seconds", type=float, default=10.0, help="excerpt length (s)")
    parser.add_argument("--positions", type=_positions, default=[0.2, 0.5, 0.8], help="excerpt centres (fractions)")
    parser.add_argument("--tracks", type=int, help="use only the first N catalog tracks")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="ViSQOL processes")
    parser.add_argument("--skip-invalid", action="store_true", help="leave out cases the config refuses")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tracks, 1 position, 3 s excerpts, 2 steps")
    parser.set_defaults(func=cmd_frontier)
    return parser


def cmd_frontier(args: argparse.Namespace) -> int:
    if args.quick:
        args.tracks = min(args.tracks or 2, 2)
        args.positions = [0.5]
        args.excerpt_seconds = min(args.excerpt_seconds, 3.0)
        args.steps = 2 if args.steps is None else args.steps
    if args.excerpt_seconds < 1:
        raise ConfigError("--excerpt-seconds must be >= 1 (ViSQOL needs about a second or more)")
    cases = load_cases(args.cases) if args.cases else default_cases()
    resolved = resolve_cases(cases, args.config, list(args.set or []), args.steps, args.skip_invalid)
    tracks = read_catalog(args.catalog, args.tracks)
    excerpts = [e for track in tracks for e in cut_excerpts(track, args.positions, args.excerpt_seconds)]
    print(
        f"frontier: {len(resolved)} case(s) × {len(excerpts)} excerpt(s) of {len(tracks)} track(s)",
        file=sys.stderr,
        flush=True,
    )

    from pipeline.evaluation.frontier_render import render_markdown, write_outputs

    factory = ProtectorFactory()
    rows: list[FrontierRow] = []
    jobs: list[tuple[np.ndarray, np.ndarray, int]] = []
    job_rows: list[int] = []
    encoder_ids: list[str] = []
    random_encoder = False
    for i, case in enumerate(resolved):
        protector = factory.build(case.cfg)
        random_encoder |= any(e.is_random for e in protector.encoders)
        encoder_id = "+".join(e.encoder_id for e in protector.encoders)
        if encoder_id not in encoder_ids:
            encoder_ids.append(encoder_id)
        case_rows, protected = protect_case(case, protector, excerpts, f"{i + 1}/{len(resolved)} {case.case.label}")
        for excerpt, row, mono in zip(excerpts, case_rows, protected):
            if mono is not None:
                jobs.append((excerpt.mono, mono, excerpt.rate))
                job_rows.append(len(rows))
            rows.append(row)
    if random_encoder:
        print("NOTE: random CLAP weights: Δe shows the mechanism, not real protection.", file=sys.stderr)

    for index, score in zip(job_rows, score_visqol(jobs, max(1, args.workers))):
        rows[index].visqol_moslqo = score
    settings = {
        "catalog": f"{args.catalog} ({len(tracks)} tracks)",
        "base config": args.config or "code defaults",
        "common overrides": " ".join(args.set or []) or "none",
        "steps": args.steps if args.steps is not None else f"from config ({resolved[0].cfg.attack.steps})",
        "excerpts": f"{args.excerpt_seconds:g} s at positions {', '.join(f'{p:g}' for p in args.positions)}",
    }
    markdown = render_markdown(rows, resolved, tracks, settings, random_encoder, encoder_ids)
    out = Path(args.out)
    write_outputs(out, rows, markdown, resolved, random_encoder)
    print(markdown)
    print(f"outputs: {out / 'rows.parquet'}, {out / 'frontier.md'}, {out / 'frontier.png'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
