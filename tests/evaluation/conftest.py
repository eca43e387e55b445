"""Fixtures of the evaluation tests: a protected run (clean shard + output folder) made without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.engine import PGDParams
from pipeline.core.protect import Track, TrackProtector
from pipeline.io.audio import decode, encode, output_format_for
from pipeline.io.manifest import commit_shard
from pipeline.io.output import OutputFolder
from pipeline.io.shards import build_tar
from pipeline.records import ManifestRow, SampleStatus, ShardStats
from tests.factories import audio_bytes, write_shard


@pytest.fixture(scope="module")
def protected_run(tmp_path_factory, tiny_encoder) -> tuple[Path, Path]:
    """A clean shard and its protected output, made with TrackProtector (no Ray needed)."""
    root = tmp_path_factory.mktemp("robust")
    members = [
        ("k1.wav", audio_bytes(3.0, 44_100, 2, seed=1)),
        ("k2.flac", audio_bytes(2.0, 22_050, 1, "FLAC", seed=2)),
    ]
    write_shard(root / "clean" / "s0.tar", members)
    protector = TrackProtector(tiny_encoder, PGDParams(0.003, 0.0006, 3, 0.00075), batch_windows=2, perceptual="linf")
    out_members, rows = [], []
    for name, data in members:
        clean = decode(data)
        fmt = output_format_for(clean.format, clean.subtype, name.split(".")[1])
        result = protector.protect([Track(name.split(".")[0], clean.samples, clean.sample_rate, fmt.subtype)])[0]
        out_members.append((name, encode(result.samples, clean.sample_rate, fmt)))
        rows.append(ManifestRow(key=result.key, status=SampleStatus.OK, input_member=name, output_member=name))
    out = OutputFolder(str(root / "protected"))
    out.ensure()
    commit_shard(out, "s0", build_tar(out_members), rows, ShardStats(shards=1, items=2, ok=2))
    return root / "clean", root / "protected"
