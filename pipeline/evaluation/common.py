"""What the evaluation commands that measure Δe on a protected run share (robustness, transfer):
the run's config, sampled (clean, protected) pairs, the first-window CLAP embedder, the
`<stem>.parquet` + `<stem>.md` outputs."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from pipeline.config import PipelineConfig, config_from_dict, load_config
from pipeline.core.views import musicldm
from pipeline.encoders.base import ClapView
from pipeline.encoders.load import load_configured_encoder
from pipeline.io.output import OutputFolder
from pipeline.io.pairs import read_pairs
from pipeline.records import SampleStatus


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


def sample_pairs(
    protected_url: str, clean_url: str, storage_options: dict, count: int, seed: int, audio_column: str = "audio"
):
    """Up to `count` (shard_id, key, clean bytes, protected bytes) of ok items, sampled by seed;
    `clean_url` is the run's input: the folder of the input shards (same shard names as the
    outputs), the tree's root, or the dataset's root, whose audio is in `audio_column` (the run's
    io.audio_column; pipeline.io.pairs.read_pairs)."""
    out = OutputFolder(protected_url, storage_options)
    candidates: list[tuple[str, str, str, str]] = []
    for shard_id in sorted(out.completed()):
        with out.fs.open(out.key(f"{shard_id}.parquet"), "rb") as f:
            table = pq.read_table(f, columns=["key", "status", "input_member", "output_member"])
        for row in table.to_pylist():
            if row["status"] == SampleStatus.OK:
                candidates.append((shard_id, row["key"], row["input_member"], row["output_member"]))
    random.Random(seed).shuffle(candidates)
    chosen = candidates[:count]
    by_shard: dict[str, list[tuple[str, str, str]]] = {}
    for shard_id, key, input_member, output_member in chosen:
        by_shard.setdefault(shard_id, []).append((key, input_member, output_member))
    for shard_id, items in sorted(by_shard.items()):
        members = [(i, o) for _, i, o in items]
        found = read_pairs(out, shard_id, clean_url, members, storage_options, audio_column)
        for key, input_member, output_member in items:
            if (input_member, output_member) in found:
                yield shard_id, key, *found[(input_member, output_member)]


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
