"""Throughput of the durable shard writer (rows of incomplete shards spilled under _tmp/spill/)
against the old memory-only one, on the demo catalog. Not a test; run it by hand:

    HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled .venv/bin/python tests/stages/writer_spill_bench.py /tmp/spill-bench

1. The writer alone (no Ray): the demo's rows, protected by a stand-in (tests/factories.py's
   fake_protect) and encoded, fed one row per call (every incomplete shard spills after every
   call: the worst case); seconds per shard, durable vs memory-only.
2. The whole pipeline (`pipeline.stages.pipeline.run`) on the demo catalog with configs/demo.yaml,
   one track per call and 64 KiB blocks (every shard reaches the writer in several blocks),
   ROUNDS times each design in alternating order, same Ray session; mean items/s and their ratio.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.demo import write_demo_catalog
from pipeline.io.shards import list_shards
from pipeline.stages import rows as R
from pipeline.stages.pipeline import run
from pipeline.stages.read import ReadSettings, read_shard
from pipeline.stages.write import ShardWriter, WriteSettings, encode_batch

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2  # pipeline runs of each design (alternating order)


def _repo_tests_module(name: str) -> Any:
    """A module of this repository's tests/ (laion-clap installs a `tests` package that would win)."""
    import importlib.util
    import types

    package = types.ModuleType("tests")
    package.__path__ = [str(REPO / "tests")]
    sys.modules["tests"] = package
    for module in (name,):
        spec = importlib.util.spec_from_file_location(f"tests.{module}", REPO / "tests" / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[f"tests.{module}"] = loaded
        spec.loader.exec_module(loaded)
    return sys.modules[f"tests.{name}"]


def writer_only(catalog: Path, work: Path, durable: bool, repeats: int = 5) -> float:
    """Seconds per shard of ShardWriter fed one row per call."""
    fake_protect = _repo_tests_module("factories").fake_protect

    settings = ReadSettings(("wav", "flac", "ogg", "mp3"), 1 << 30, {})
    shards = []
    for ref in list_shards(str(catalog)):
        rows = fake_protect(list(read_shard({R.SHARD_ID: ref.shard_id, R.SHARD_URL: ref.url}, settings)))
        shards.append(R.batch_to_rows(encode_batch(R.rows_to_batch(rows, list(rows[0])))))
    started = time.perf_counter()
    for i in range(repeats):
        out = work / f"writer-{durable}-{i}"
        writer = ShardWriter(WriteSettings(str(out), {}, "passthrough", "h", 0.5, durable=durable))
        for rows in shards:
            for row in rows:
                writer(R.rows_to_batch([row], list(row)))
        shutil.rmtree(out)
    return (time.perf_counter() - started) / (repeats * len(shards))


def pipeline_run(catalog: Path, out: Path, durable: bool) -> float:
    """Items/s of one whole run (multi-block shards)."""
    import ray

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"io.input={catalog}", f"io.output={out}", "runtime.tracks_per_call=1", "runtime.progress=false"],
    )
    ray.data.DataContext.get_current().target_max_block_size = 64 * 1024
    summary = run(cfg, durable=durable)
    assert not summary.failed_shards and summary.this_run.shards == 2
    return summary.this_run.items / summary.wall_seconds


def main(work: Path) -> None:
    import ray

    shutil.rmtree(work, ignore_errors=True)
    catalog = work / "catalog"
    write_demo_catalog(catalog)
    writer_only(catalog, work, durable=True, repeats=2)  # warm-up: first imports, codecs, caches
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ROUNDS * 2):
        for durable in (False, True):
            times[durable].append(writer_only(catalog, work, durable=durable))
    memory, durable = min(times[False]), min(times[True])
    print(f"writer alone, one row per call (best of {ROUNDS * 2}): memory-only {memory * 1000:.1f} ms/shard, ", end="")
    print(f"durable {durable * 1000:.1f} ms/shard (time ratio durable/memory {durable / memory:.2f})")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(ROUNDS):  # alternating, so that warm-up and machine load fall on both designs
        for durable in (False, True) if i % 2 == 0 else (True, False):
            rates[durable].append(pipeline_run(catalog, work / f"out-{durable}-{i}", durable=durable))
            print(f"  pipeline round {i}, durable={durable}: {rates[durable][-1]:.3f} items/s", flush=True)
    old, new = sum(rates[False]) / ROUNDS, sum(rates[True]) / ROUNDS
    print(f"demo pipeline (mean of {ROUNDS} alternating runs each): memory-only {old:.3f} items/s, ", end="")
    print(f"durable {new:.3f} items/s, throughput ratio durable/memory {new / old:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/spill-bench"))
