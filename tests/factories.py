"""What tests build and check, in one place (fixtures live in conftest.py): encoded audio from the
demo's synthetic music (`pipeline.demo.synthesize`), tars of members, small catalogs, a minimal
run config, the protect stage without PGD, and reading outputs back. Imported one way:
`from tests.factories import ...`."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from pipeline.demo import synthesize
from pipeline.records import SampleStatus
from pipeline.stages import rows as R
from pipeline.stages.write import WriteSettings, encode_batch, shard_outputs

# Every audio extension the read stage takes (ReadSettings.extensions).
EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "oga", "aiff", "aif")


def encode_audio(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    """Samples [n, channels] (float, full scale 1.0) encoded by libsndfile."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def audio_bytes(
    seconds: float, rate: int, channels: int, fmt: str = "WAV", subtype: str = "PCM_16", seed: int = 0
) -> bytes:
    """A short music-like clip (the demo catalog's synthesis) encoded by libsndfile."""
    samples = synthesize(seconds, rate, channels, tempo_bpm=120, root_hz=220.0, seed=seed)
    return encode_audio(samples, rate, fmt, subtype)


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members, names as given (tests write unsafe ones on purpose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_members(path: Path) -> dict[str, bytes]:
    """Regular members of a tar: name -> bytes."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def catalog(root: Path, shards: int, per_shard: int, seconds: float, bad: bool = False) -> list[str]:
    """`shards` tars `s-000.tar`… of `per_shard` 16 kHz mono clips (+ a json member each), and with
    `bad` one undecodable key in the first; returns every input key."""
    keys = []
    for i in range(shards):
        members = []
        for j in range(per_shard):
            key = f"t{i:02d}-{j}"
            members += [(f"{key}.wav", audio_bytes(seconds, 16000, 1, seed=10 * i + j)), (f"{key}.json", b"{}")]
            keys.append(key)
        if bad and i == 0:
            members.append(("broken.wav", b"not audio" * 30))
            keys.append("broken")
        write_shard(root / f"s-{i:03d}.tar", members)
    return keys


def config_dict(input_url: str, output_url: str, steps: int = 1) -> dict[str, Any]:
    """A small run: random HTSAT-tiny, 1 s windows, `steps` attack steps."""
    return {
        "io": {"input": input_url, "output": output_url},
        "encoder": {"checkpoint": "random:HTSAT-tiny:0"},
        "attack": {"steps": steps, "seed": 7},
        "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25},
        "runtime": {"progress": True, "tracks_per_call": 2},
    }


def manifest_keys(out: Path) -> Counter:
    """How often each key appears over the manifests of a local output folder."""
    keys: Counter = Counter()
    for path in sorted(out.glob("*.parquet")):
        keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


def fake_protect(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the protect stage adds, without PGD (δ = 0): stats columns and the encoder id."""
    out = []
    for row in rows:
        row = dict(row)
        for name in R.STATS:
            row[name] = 0.0 if row[R.STATUS] == SampleStatus.OK else float("nan")
        row[R.ENCODER_ID] = "random:HTSAT-tiny:0"
        out.append(row)
    return out


def written(rows: list[dict[str, Any]], on_error: str) -> Any:
    """The writer's outputs (tar members, manifest, stats) of read rows, without PGD or storage."""
    protected = fake_protect(rows)
    encoded = R.batch_to_rows(encode_batch(R.rows_to_batch(protected, list(protected[0]))))
    settings = WriteSettings(output="", storage_options={}, on_error=on_error, config_hash="h", target_delta_e=0.5)
    return shard_outputs(encoded, settings)


def process_ids(title: str) -> list[int]:
    """PIDs of processes whose command line (Ray's process title) contains `title`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title in cmd:
                found.append(int(entry.name))
    return found
