"""`unlearnable report`: one self-contained HTML page about a run's output folder.

Reads every `<shard>.parquet` manifest and `<shard>.stats.json` marker under an output folder (local
or s3://), plus `_config.yaml`, `robustness.parquet` / `robustness.md` when present, and writes an
HTML file with its PNG figures and audio clips embedded (base64): Δe against the target, ViSQOL
MOS-LQO against its target, quality distributions, slowest and worst items, errors by kind, and,
from the clean input (the run's `_config.yaml` io.input, or `--clean`), clean vs protected
spectrograms with the spectrum of δ and A/B players (short FLAC clips) of the lowest-MOS-LQO and
lowest-Δe items. Nothing is fetched from the network by the page itself.

Example::

    unlearnable report --output s3://bucket/protected/ \
        --endpoint-url http://127.0.0.1:8333 --addressing-style path --out report.html
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.config import StorageConfig, load_config
from pipeline.evaluation.report.html import render
from pipeline.evaluation.report.read import (
    CLIP_SECONDS,
    LISTEN_BUDGET_BYTES,
    LISTEN_ITEMS,
    OutputData,
    ReportError,
    load_output,
    read_members,
)
from pipeline.evaluation.report.sections import clip_bounds, listening_section, pick_examples, pick_listening
from pipeline.evaluation.report.tables import html_table, markdown_to_html
from pipeline.io.storage import open_url

__all__ = [
    "LISTEN_BUDGET_BYTES",
    "OutputData",
    "ReportError",
    "build_parser",
    "clip_bounds",
    "cmd_report",
    "html_table",
    "listening_section",
    "load_output",
    "main",
    "markdown_to_html",
    "pick_examples",
    "pick_listening",
    "read_members",
    "render",
]

# ------------------------------------------------------------------------------------------- CLI


def storage_options_from(args: argparse.Namespace) -> dict[str, Any]:
    storage = load_config(args.config).io.storage if args.config else StorageConfig()
    storage = StorageConfig(
        endpoint_url=args.endpoint_url or storage.endpoint_url,
        region=args.region or storage.region,
        addressing_style=args.addressing_style or storage.addressing_style,
        anon=args.anon or storage.anon,
    )
    return storage.storage_options()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `unlearnable report` (pass a subparser to add them to it)."""
    p = parser or argparse.ArgumentParser(prog="unlearnable report", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the run's output folder (local or s3://bucket/prefix/)")
    p.add_argument("--out", default="report.html", help="HTML file to write (local path or s3://…)")
    p.add_argument(
        "--clean",
        help="the input shards (folder, s3:// prefix, glob) for spectrograms and A/B clips "
        "(default: io.input of the run's _config.yaml)",
    )
    p.add_argument("--examples", type=int, default=3, help="items with spectrograms (lowest, median, highest Δe, …)")
    p.add_argument(
        "--listen", type=int, default=LISTEN_ITEMS, help="items with A/B clips per list (lowest MOS-LQO, lowest Δe)"
    )
    p.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS, help="length of each A/B clip, seconds")
    p.add_argument("--top", type=int, default=15, help="rows of the slowest / worst tables")
    p.add_argument("--target", type=float, help="Δe target (default: attack.target_delta_e of _config.yaml, else 0.5)")
    p.add_argument("--config", help="YAML config whose io.storage section gives the S3 client settings")
    p.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:8333")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--addressing-style", choices=["path", "virtual"], help="S3 addressing style")
    p.add_argument("--anon", action="store_true", help="anonymous S3 access")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    options = storage_options_from(args)
    data = load_output(args.output, options)
    page = render(
        data,
        clean_url=args.clean,
        examples=args.examples,
        top=args.top,
        target=args.target,
        storage_options=options,
        listen=args.listen,
        clip_seconds=args.clip_seconds,
    )
    with open_url(args.out, "wb", options) as f:
        f.write(page.encode("utf-8"))
    print(
        f"{args.out}: {len(data.shards)} shard(s), {data.n_rows} manifest row(s), "
        f"Δe mean {data.stats.delta_e_mean:.3f}, {len(page) / 1e6:.1f} MB"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_report(args)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
