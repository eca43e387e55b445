"""Transfer matrix: does protection optimised against some encoders hold against others?

`unlearnable transfer --protected URL --clean URL --encoders A,B,C` measures, for a sample of
items, Δe = ||CLAP(protected) − CLAP(clean)|| on the first 10 s window with each listed encoder,
whether or not it was used to optimise δ. Several `--protected` runs (each optimised on other
encoders, as recorded in their manifests' `encoder_id`) give the rows of the matrix:
optimised-on × measured-on (median Δe, share ≥ target).

Random encoders with different seeds stand in for different checkpoints here; the output says so.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline.evaluation.common import Embedder, run_config, sample_pairs, write_outputs
from pipeline.io.audio import decode
from pipeline.io.output import OutputFolder


@dataclass
class TransferRow:
    optimised_on: str  # encoder id(s) the protected run used ("+" joins an ensemble)
    measured_on: str  # encoder id measuring Δe
    key: str
    delta_e: float


def optimised_on(protected_url: str, storage_options: dict) -> str:
    """The encoder id recorded in a protected run's manifests."""
    out = OutputFolder(protected_url, storage_options)
    for shard_id in sorted(out.completed()):
        with out.fs.open(out.key(f"{shard_id}.parquet"), "rb") as f:
            ids = {i for i in pq.read_table(f, columns=["encoder_id"]).column("encoder_id").to_pylist() if i}
        if ids:
            return sorted(ids)[0]
    return "unknown"


def measure(
    args: argparse.Namespace, protected_urls: list[str], encoders: list[str], count: int, seed: int
) -> list[TransferRow]:
    rows: list[TransferRow] = []
    cfg = run_config(args, protected_urls[0])
    options = cfg.io.storage.storage_options()
    embedders = {spec: Embedder(cfg, spec) for spec in encoders}
    for protected in protected_urls:
        source = optimised_on(protected, options)
        for _, key, clean_bytes, prot_bytes in sample_pairs(
            protected, args.clean, options, count, seed, cfg.io.audio_column
        ):
            clean, prot = decode(clean_bytes), decode(prot_bytes)
            for embed in embedders.values():
                distance = float(
                    (embed(prot.samples, prot.sample_rate) - embed(clean.samples, clean.sample_rate)).norm()
                )
                rows.append(TransferRow(source, embed.encoder.encoder_id, key, distance))
    return rows


def matrix_table(rows: list[TransferRow], target: float) -> str:
    """Markdown: one line per (optimised-on, measured-on): median Δe and share ≥ target."""
    lines = [
        "| optimised on | measured on | items | median Δe | share ≥ target |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row.optimised_on, row.measured_on), []).append(row.delta_e)
    for (source, measured), values in groups.items():
        mark = " (optimised on)" if measured in source.split("+") else ""
        share = np.mean([v >= target for v in values])
        lines.append(f"| {source} | {measured}{mark} | {len(values)} | {np.median(values):.3f} | {share:.0%} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unlearnable transfer", description=__doc__)
    parser.add_argument("--protected", required=True, action="append", help="a protected output folder (repeatable)")
    parser.add_argument("--clean", required=True, help="the clean input shards' folder")
    parser.add_argument("--encoders", required=True, help="comma list of encoder specs to measure with")
    parser.add_argument("--config", help="config (default: the first run's saved _config.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="where transfer.parquet/.md go (default: the first --protected)")
    parser.set_defaults(func=cmd_transfer)
    return parser


def cmd_transfer(args: argparse.Namespace) -> int:
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    rows = measure(args, args.protected, encoders, args.count, args.seed)
    if not rows:
        print("no protected items found", file=sys.stderr)
        return 1
    cfg = run_config(args, args.protected[0])
    table = matrix_table(rows, cfg.attack.target_delta_e)
    if any(e.startswith("random:") for e in encoders):
        table = (
            "RANDOM CLAP WEIGHTS: encoders with different seeds stand in for different checkpoints; "
            "these figures show the harness, not real transfer.\n\n" + table
        )
    options = cfg.io.storage.storage_options()
    write_outputs([asdict(r) for r in rows], args.out or args.protected[0], options, table, "transfer")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
