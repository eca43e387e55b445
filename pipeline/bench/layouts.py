"""Section "layouts": the same audio as WebDataset shards, as a tree of files and as a Parquet
audio dataset, each protected by the real pipeline in one run (same config, same actor), so the
ratios say whether listing and small-object I/O, rather than the protect actor, set the pace."""

from __future__ import annotations

import io
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench.common import cpu_meter, log
from pipeline.bench.pipeline import bench_pipeline, choose_pipeline_batch, write_catalog
from pipeline.bench.results import BenchReport, BenchSettings, PipelineResult
from pipeline.stages.pipeline import ray_running, shutdown_ray

LAYOUTS = ("shards", "files", "parquet")
ARTISTS = 3  # the tree spreads its tracks over this many artist folders


def write_layouts(root: Path, tracks: int, per_unit: int) -> dict[str, Path]:
    """The bench catalog (`write_catalog`) three ways: `root/shards` (tars of `per_unit` tracks),
    `root/files` (each track at `Artist N/Album/<key>.flac`) and `root/parquet` (files of
    `per_unit` rows, a Hugging Face Audio column of {bytes, path} structs)."""
    shards = write_catalog(root / "shards", tracks, per_unit)
    files_root, parquet_root = root / "files", root / "parquet"
    parquet_root.mkdir(parents=True, exist_ok=True)
    number = 0
    for index, shard in enumerate(sorted(shards)):
        rows = []
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".flac"):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                target = files_root / f"Artist {number % ARTISTS}" / "Album" / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                rows.append({"bytes": data, "path": member.name})
                number += 1
        audio = pa.array(rows, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        buffer = io.BytesIO()
        pq.write_table(pa.table({"audio": audio}), buffer)
        (parquet_root / f"train-{index:05d}.parquet").write_bytes(buffer.getvalue())
    return {"shards": root / "shards", "files": files_root, "parquet": parquet_root}


def run_layouts(settings: BenchSettings, report: BenchReport, device: str) -> list[PipelineResult]:
    """One pipeline run per layout over the same tracks (first precision of the pipeline section,
    the shared placement on CPU), files per unit = tracks per shard; rows tagged with their layout."""
    batch = choose_pipeline_batch(settings)
    precision = settings.pipeline_precisions[0]
    placement = "dedicated" if device.startswith("cuda") else "shared"
    amodel = settings.amodels[0]
    started_ray = not ray_running()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="unlearnable-layouts-") as tmp:
            inputs = write_layouts(Path(tmp), settings.pipeline_tracks, batch)
            for layout in LAYOUTS:
                output = Path(tmp) / f"out-{layout}"
                with cpu_meter(f"layouts {layout}", report.contention):
                    result = bench_pipeline(
                        amodel,
                        settings.pipeline_steps,
                        precision,
                        batch,
                        inputs[layout],
                        output,
                        device=device,
                        placement=placement,
                        io_overrides={"files_per_unit": batch},
                    )
                results.append(replace(result, layout=layout))
                log(f"layout {layout}: {result.windows_per_s:.3f} windows/s steady, {result.wall_seconds:.1f} s wall")
    finally:
        if started_ray:
            shutdown_ray()
    return results
