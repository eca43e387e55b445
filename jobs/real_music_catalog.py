"""Build a small catalog of real music from Debian packages, for quality/efficacy evaluation.

    python jobs/real_music_catalog.py --out /work/catalog-real [--work /tmp/real-music-debs]

Each source is one file of one Debian package (`apt-get download NAME`, `dpkg -x`): recorded
soundtracks in Ogg Vorbis / MP3 (band-limited by their codec), tracker modules rendered by ffmpeg's
libopenmpt at 48 kHz, and MIDI files rendered by fluidsynth with the FluidR3 General MIDI soundfont
at 48 kHz (both full-band digital renders, no codec). Every track is trimmed to `--seconds` (default
40 s) from `--start` seconds in (default 30 s; earlier when the track is short), made stereo and
written as FLAC PCM_24 at 44.1 kHz (decoded lossy files) or 48 kHz (renders). `catalog.json` lists
each track's package, original file, genre label (from the package's description and the files' own
tags, not auditioned), rate, RMS level and measured bandwidth: the highest frequency whose Welch
power is within 60 dB of the spectrum's peak, and where the band above is empty (100 dB down: a
codec's low-pass; ViSQOL is harsh on noise added where the reference is empty).

Needs apt-get/dpkg (Debian), ffmpeg with libopenmpt, fluidsynth and fluid-soundfont-gm.
The data are not part of the repository: the output folder is data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import welch

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
RENDER_RATE = 48_000  # Hz: MIDI and tracker renders (full band)
DECODE_RATE = 44_100  # Hz: decoded Ogg/MP3 files (an MP3 at 22.05 kHz is resampled up)
BANDWIDTH_FLOOR_DB = 60.0  # bandwidth: highest frequency within this many dB of the spectrum's peak
EMPTY_FLOOR_DB = 100.0  # empty_above_hz: above it the spectrum is this far below its peak (a codec's low-pass)
FULL_BAND_HZ = 18_000.0  # at or above this bandwidth a track counts as full-band


@dataclass(frozen=True)
class Source:
    """One file of one Debian package and how to turn it into audio."""

    name: str  # output file stem
    package: str
    member: str  # path inside the unpacked package; "a.pk3:inner/path" for a file inside a zip
    genre: str  # label from the package description / file tags (not auditioned)
    kind: str  # decode (Ogg/MP3 via ffmpeg) | mix (sum of several decoded stems) | midi | tracker
    stems: tuple[str, ...] = ()  # kind "mix": further members summed with `member`


SOURCES: tuple[Source, ...] = (
    Source(
        "wesnoth-the-city-falls",
        "wesnoth-1.16-music",
        "usr/share/games/wesnoth/1.16/data/core/music/the_city_falls.ogg",
        "orchestral (fantasy game score)",
        "decode",
    ),
    Source(
        "muldjord-chaos-god",
        "fretsonfire-songs-muldjord",
        "usr/share/games/fretsonfire/data/songs/muldjord/chaos_god/song.ogg",
        "rock / death metal (band recording; backing + guitar stems summed)",
        "mix",
        stems=("usr/share/games/fretsonfire/data/songs/muldjord/chaos_god/guitar.ogg",),
    ),
    Source(
        "nexuiz-neuronal-diving",
        "nexuiz-music",
        "usr/share/games/nexuiz/data/music.pk3:sound/cdtracks/neuronal-diving.ogg",
        "electronic (game soundtrack)",
        "decode",
    ),
    Source(
        "hyperrogue-desert",
        "hyperrogue-music",
        "usr/share/hyperrogue/music/hr3-desert.ogg",
        "ambient (game score)",
        "decode",
    ),
    Source(
        "lincity-city-blues",
        "lincity-ng-data",
        "usr/share/games/lincity-ng/music/default/02 - Robert van Herk - City Blues.ogg",
        "blues / jazz (game soundtrack)",
        "decode",
    ),
    Source(
        "asc-machine-wars",
        "asc-music",
        "usr/share/games/asc/music/machine_wars.mp3",
        "game score (MP3 at 22.05 kHz)",
        "decode",
    ),
    Source(
        "pingus-big-march-in-space",
        "pingus-data",
        "usr/share/games/pingus/data/music/the_big_march_in_space.it",
        "tracker module (chiptune-ish), rendered",
        "tracker",
    ),
    Source(
        "frozen-bubble-mainzik",
        "fb-music-high",
        "usr/share/games/frozen-bubble/snd/frozen-mainzik-2p.xm",
        "tracker module (pop), rendered",
        "tracker",
    ),
    Source(
        "openmsx-boogi-marabi",
        "openttd-openmsx",
        "usr/share/games/openttd/baseset/openmsx/boogi_marabi_redfarn.mid",
        "boogie / jazz (MIDI, FluidR3 GM render)",
        "midi",
    ),
    Source(
        "planetblupi-music001",
        "planetblupi-music-midi",
        "usr/share/planetblupi/music/music001.mid",
        "game score (MIDI, FluidR3 GM render)",
        "midi",
    ),
)


@dataclass
class CatalogEntry:
    """One catalog track as listed in catalog.json."""

    file: str  # FLAC file name in the catalog folder
    package: str
    package_version: str
    original: str  # path of the source file inside the package
    genre: str
    kind: str
    sample_rate: int  # Hz
    channels: int
    seconds: float
    start_seconds: float  # where in the original the excerpt starts
    rms_dbfs: float
    peak: float  # max |sample|, full scale 1.0
    bandwidth_hz: float  # highest frequency within 60 dB of the peak of the Welch spectrum
    full_band: bool  # bandwidth ≥ 18 kHz
    empty_above_hz: float  # highest frequency within 100 dB of the peak: above it the band is empty


def run(cmd: list[str], cwd: Path | None = None) -> None:
    """Run a command; on failure raise with its last output lines."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): " + " | ".join(tail))


def unpack(package: str, work: Path) -> tuple[Path, str]:
    """Download (once) and unpack a Debian package; returns (unpacked root, package version)."""
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        print(f"  apt-get download {package}", file=sys.stderr, flush=True)
        run(["apt-get", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    root = work / "unpacked" / package
    if not root.exists():
        partial = root.with_name(package + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run(["dpkg", "-x", str(deb), str(partial)])
        partial.rename(root)
    return root, deb.name.split("_")[1]


def extract_member(root: Path, member: str, scratch: Path) -> Path:
    """The file `member` of an unpacked package; a "zip:inner" member is extracted to scratch."""
    if ":" not in member:
        return root / member
    archive, inner = member.split(":", 1)
    target = scratch / Path(inner).name
    with zipfile.ZipFile(root / archive) as z, z.open(inner) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def ffmpeg_decode(path: Path, rate: int, scratch: Path) -> np.ndarray:
    """Decode any ffmpeg-readable file (Ogg, MP3, tracker modules via libopenmpt) to float32
    [samples, 2] at `rate` Hz."""
    wav = scratch / (path.name + ".wav")
    run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(path),
         "-ac", "2", "-ar", str(rate), "-c:a", "pcm_f32le", str(wav)])  # fmt: skip
    samples, _ = sf.read(wav, dtype="float32", always_2d=True)
    return samples


def render_midi(path: Path, scratch: Path) -> np.ndarray:
    """Render a MIDI file with fluidsynth + FluidR3 GM at 48 kHz; float32 [samples, 2]."""
    if not SOUNDFONT.exists():
        raise FileNotFoundError(f"{SOUNDFONT} missing: apt-get install fluid-soundfont-gm")
    wav = scratch / (path.name + ".wav")
    run(["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(RENDER_RATE), "-O", "float", "-T", "wav",
         "-F", str(wav), str(SOUNDFONT), str(path)])  # fmt: skip
    samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    if rate != RENDER_RATE:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, expected {RENDER_RATE}")
    return samples


def load_source(source: Source, root: Path, scratch: Path) -> tuple[np.ndarray, int]:
    """Audio of a source: float32 [samples, 2] and its rate in Hz."""
    path = extract_member(root, source.member, scratch)
    if source.kind == "midi":
        return render_midi(path, scratch), RENDER_RATE
    if source.kind == "tracker":
        return ffmpeg_decode(path, RENDER_RATE, scratch), RENDER_RATE
    samples = ffmpeg_decode(path, DECODE_RATE, scratch)
    if source.kind == "mix":
        for stem in source.stems:
            other = ffmpeg_decode(extract_member(root, stem, scratch), DECODE_RATE, scratch)
            n = min(len(samples), len(other))
            samples = samples[:n] + other[:n]
    elif source.kind != "decode":
        raise ValueError(f"{source.name}: unknown kind {source.kind!r}")
    return samples, DECODE_RATE


def bandwidth_hz(samples: np.ndarray, rate: int, floor_db: float = BANDWIDTH_FLOOR_DB) -> float:
    """Highest frequency (Hz) whose Welch power (mono down-mix, 8192-point Hann segments) is within
    `floor_db` of the spectrum's peak."""
    freqs, power = welch(samples.astype(np.float64).mean(axis=1), fs=rate, nperseg=8192)
    level = 10 * np.log10(power + 1e-30)
    loud = np.flatnonzero(level >= level.max() - floor_db)
    return float(freqs[loud[-1]])


def excerpt(samples: np.ndarray, rate: int, start: float, seconds: float) -> tuple[np.ndarray, float]:
    """`seconds` of audio from `start` s in (earlier when the track is shorter); (audio, start used)."""
    length = round(seconds * rate)
    begin = max(0, min(round(start * rate), len(samples) - length))
    return samples[begin : begin + length], begin / rate


def build_entry(source: Source, work: Path, out: Path, start: float, seconds: float) -> CatalogEntry:
    """Download, decode or render, trim, write the FLAC and measure one source."""
    root, version = unpack(source.package, work)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        samples, rate = load_source(source, root, Path(tmp))
    clip, used_start = excerpt(samples, rate, start, seconds)
    peak = float(np.abs(clip).max())
    if peak == 0:
        raise RuntimeError(f"{source.name}: the excerpt is digital silence")
    if peak > 0.999:  # a summed mix can clip: scale it back under full scale
        clip = clip * (0.999 / peak)
        peak = 0.999
    name = f"{source.name}.flac"
    sf.write(out / name, clip, rate, subtype="PCM_24")
    bandwidth = bandwidth_hz(clip, rate)
    rms = float(np.sqrt(np.mean(clip.astype(np.float64) ** 2)))
    return CatalogEntry(
        file=name,
        package=source.package,
        package_version=version,
        original=source.member,
        genre=source.genre,
        kind=source.kind,
        sample_rate=rate,
        channels=clip.shape[1],
        seconds=round(len(clip) / rate, 3),
        start_seconds=round(used_start, 3),
        rms_dbfs=round(20 * np.log10(rms), 2),
        peak=round(peak, 4),
        bandwidth_hz=round(bandwidth, 1),
        full_band=bandwidth >= FULL_BAND_HZ,
        empty_above_hz=round(bandwidth_hz(clip, rate, EMPTY_FLOOR_DB), 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="catalog folder (FLAC files + catalog.json)")
    parser.add_argument("--work", default="/tmp/real-music-debs", help="downloaded and unpacked packages")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each track (s)")
    parser.add_argument("--start", type=float, default=30.0, help="where each excerpt starts (s)")
    parser.add_argument("--only", help="comma list of source names to build (default: all)")
    args = parser.parse_args(argv)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    wanted = {s.strip() for s in args.only.split(",")} if args.only else None
    entries: list[CatalogEntry] = []
    for source in SOURCES:
        if wanted is not None and source.name not in wanted:
            continue
        print(f"{source.name}: {source.package} {source.member}", file=sys.stderr, flush=True)
        entry = build_entry(source, work, out, args.start, args.seconds)
        band = "full-band" if entry.full_band else "band-limited"
        print(
            f"  -> {entry.file} {entry.sample_rate} Hz, {entry.seconds:.1f} s, {entry.rms_dbfs:.1f} dBFS RMS, "
            f"bandwidth {entry.bandwidth_hz / 1000:.1f} kHz ({band}), "
            f"empty above {entry.empty_above_hz / 1000:.1f} kHz",
            file=sys.stderr,
            flush=True,
        )
        entries.append(entry)
    catalog = {
        "description": "Real music excerpts from Debian packages (see jobs/real_music_catalog.py)",
        "bandwidth": f"highest frequency within {BANDWIDTH_FLOOR_DB:.0f} dB of the Welch spectrum's peak "
        f"(mono down-mix); full_band: >= {FULL_BAND_HZ:.0f} Hz; empty_above_hz: highest frequency within "
        f"{EMPTY_FLOOR_DB:.0f} dB of the peak (a codec's low-pass shows here)",
        "genre": "labels from the package descriptions and the files' tags, not auditioned",
        "tracks": [asdict(e) for e in entries],
    }
    (out / "catalog.json").write_text(json.dumps(catalog, indent=2) + "\n")
    print(f"{len(entries)} track(s) and catalog.json in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
