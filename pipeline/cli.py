"""unlearnable: protect music catalogs from CLAP-conditioned diffusion models.

Protect path: `protect` (a catalog: WebDataset shards, a tree of audio files, Parquet audio
datasets), `protect-file` (one file, no Ray), `serve` (the ingest HTTP service on Ray Serve),
`verify` (is a delivered file a protected version of a clean one), `status` (complete / pending
units of a run), `pack` / `unpack` (a file tree to shards and back), `demo` (a synthetic catalog,
protected with a random encoder), `embed` (CLAP embedding of a file). Evaluation (with the
`[eval]` extra): `robustness`, `transfer`, `imitate`, `frontier`, `report`; `bench` benchmarks.
Wiring only: arguments -> config -> stages; each command imports its heavy libraries when it
runs, so `status` and `--help` start fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, load_config

# name: (module with build_parser(parser), help); imported only when its command runs.
EVALUATION_COMMANDS = {
    "robustness": (
        "pipeline.evaluation.robustness",
        "Δe retained under the attack suite (codecs, effects, denoising, chains)",
    ),
    "transfer": ("pipeline.evaluation.transfer", "Δe measured with encoders used and not used for δ"),
    "imitate": ("pipeline.evaluation.imitation", "train clean / protected / noise-control imitators and compare them"),
    "frontier": ("pipeline.evaluation.frontier", "ViSQOL quality vs Δe for a sweep of attack settings"),
    "report": ("pipeline.evaluation.report", "HTML report of an output folder: Δe, quality, errors"),
}
# Errors a user can act on (one line, no traceback without -v): (module, class name). Looked up only
# in modules already imported, so that the error path imports nothing heavy.
USER_ERRORS = (
    ("pipeline.encoders.base", "CheckpointError"),
    ("pipeline.io.storage", "ShardError"),
    ("pipeline.io.audio", "AudioDecodeError"),
    ("pipeline.api", "ProtectError"),
    ("pipeline.evaluation.report", "ReportError"),
    ("pipeline.evaluation.robustness", "AttackError"),
    ("pipeline.evaluation.extra", "EvalExtraMissing"),
    ("pipeline.service.limits", "BindRefused"),
)

# What `protect` writes under the output, per input layout (io.input_format).
OUTPUT_LAYOUTS = {
    "shards": "<shard>.tar, <shard>.parquet manifest, <shard>.stats.json marker",
    "files": "each protected file at its input path; _unit-*.parquet manifests, _unit-*.stats.json markers",
    "parquet": "each dataset file at its input path; _unit-*.parquet manifests, _unit-*.stats.json markers",
}
PACKAGE_ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = PACKAGE_ROOT.parent / "configs" / "demo.yaml"


def _config(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.set or [])
    if getattr(args, "input", None):
        overrides.append(f"io.input={args.input}")
    if getattr(args, "output", None):
        overrides.append(f"io.output={args.output}")
    if getattr(args, "overwrite", False):
        overrides.append("io.overwrite=true")
    cfg = load_config(args.config, overrides)
    if not cfg.io.input or not cfg.io.output:
        raise ConfigError("io.input and io.output are required (config file, --input/--output or --set)")
    return cfg


def print_summary(summary, stream=None) -> None:
    stream = stream or sys.stdout  # looked up per call (a captured or replaced stdout)
    total = summary.all_outputs
    run = summary.this_run
    lines = [
        "",
        "| totals            | this run | all outputs |",
        "|-------------------|---------:|------------:|",
        f"| shards            | {summary.processed_shards:8d} | {total.shards:11d} |",
        f"| items             | {run.items:8d} | {total.items:11d} |",
        f"| ok                | {run.ok:8d} | {total.ok:11d} |",
        f"| error             | {run.error:8d} | {total.error:11d} |",
        f"|  passthrough      | {run.passthrough:8d} | {total.passthrough:11d} |",
        f"|  dropped          | {run.dropped:8d} | {total.dropped:11d} |",
        f"| windows           | {run.windows:8d} | {total.windows:11d} |",
        f"| audio (s)         | {run.audio_seconds:8.1f} | {total.audio_seconds:11.1f} |",
        f"| Δe mean           | {run.delta_e_mean:8.3f} | {total.delta_e_mean:11.3f} |",
        f"| items Δe < target | {run.delta_e_below_target:8d} | {total.delta_e_below_target:11d} |",
        "",
        f"skipped (already complete): {summary.skipped_shards} shard(s); wall {summary.wall_seconds:.1f} s",
    ]
    if total.errors:
        lines.append("errors by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(total.errors.items())))
    if summary.random_encoder:
        lines.append("NOTE: random CLAP weights were used: these Δe figures show the machinery runs, nothing more.")
    print("\n".join(lines), file=stream, flush=True)


def cmd_protect(args: argparse.Namespace) -> int:
    from pipeline.stages.pipeline import run

    cfg = _config(args)
    summary = run(cfg)
    print_summary(summary)
    print(f"outputs: {cfg.io.output}  ({OUTPUT_LAYOUTS[summary.layout]})")
    if summary.failed_shards:
        for shard_id, why in summary.failed_shards:
            print(f"shard {shard_id} FAILED: {why}", file=sys.stderr)
        count = len(summary.failed_shards)
        print(f"{count} shard(s) not committed; rerun the same command to retry them", file=sys.stderr)
        return 3
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import write_demo_catalog
    from pipeline.stages.pipeline import run

    workdir = Path(args.workdir).resolve()
    catalog = workdir / "catalog"
    output = workdir / "protected"
    paths = write_demo_catalog(catalog)
    print(f"demo catalog: {len(paths)} shard(s) of synthetic music in {catalog}")
    overrides = [f"io.input={catalog}", f"io.output={output}", *(args.set or [])]
    if args.overwrite:
        overrides.append("io.overwrite=true")
    cfg = load_config(args.config or DEMO_CONFIG, overrides)
    summary = run(cfg)
    print_summary(summary)
    print(f"protected shards and manifests: {output}")
    manifest = output / "shard-000000.parquet"
    print(f"inspect: python -c \"import pyarrow.parquet as pq; print(pq.read_table('{manifest}').to_pandas())\"")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pipeline.encoders.base import ClapView
    from pipeline.encoders.load import load_encoder
    from pipeline.io.audio import decode

    decoded = decode(Path(args.input).read_bytes(), min_seconds=0.0)
    encoder = load_encoder(args.checkpoint, args.amodel, sha256=args.sha256, device=args.device)
    window = decoded.samples[: round(10.0 * decoded.sample_rate)]  # first 10 s
    x = torch.from_numpy(np.ascontiguousarray(window.T))[None].to(encoder.device)  # [1, channels, samples]
    view = ClapView(decoded.sample_rate).to(encoder.device)
    with torch.no_grad():
        embedding = encoder.model(view(x, torch.tensor([window.shape[0]], device=encoder.device)))[0]
    vector = embedding.float().cpu().numpy().astype(np.float32)
    np.save(args.out, vector)
    norm = np.linalg.norm(vector)
    print(f"{args.out}: float32 [{vector.shape[0]}], norm {norm:.6f}, encoder {encoder.encoder_id}")
    if encoder.is_random:
        print("NOTE: random CLAP weights: this embedding means nothing.", file=sys.stderr)
    return 0


def cmd_protect_file(args: argparse.Namespace) -> int:
    from pipeline.api import protect_file

    cfg = load_config(args.config, list(args.set or []))
    figures = protect_file(args.input, args.output, cfg)
    print(
        f"{figures['output']}: {figures['output_format']} (from {figures['input_format']}); "
        f"Δe {figures['delta_e_mean']:.3f}, L∞ written {figures['linf_written']:.5f} "
        f"(ε bound {'holds' if figures['eps_bound_holds'] else 'not claimed'}), "
        f"SNR {figures['snr_db']:.1f} dB, NMR {figures['nmr_db']:.1f} dB; encoder {figures['encoder_id']}"
    )
    if figures["random_encoder"]:
        print("NOTE: random CLAP weights: this file is NOT protected (set encoder.checkpoint).", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from pipeline.service import app

    def interrupt(signum, frame):  # SIGTERM (k8s, systemd) and SIGINT (also when inherited ignored)
        raise KeyboardInterrupt

    cfg = load_config(args.config, list(args.set or []))
    url = app.start(cfg, args.host, args.port)
    signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs its own (sys.exit)
    signal.signal(signal.SIGINT, interrupt)
    print(f"serving {url} (POST /protect, GET /healthz /readyz /metrics); Ctrl-C stops", flush=True)
    if cfg.encoder.checkpoint.startswith("random:"):
        print("NOTE: random CLAP weights: uploads are NOT protected (set encoder.checkpoint).", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import summary_line, verify_files

    cfg = load_config(args.config, list(args.set or []))
    report = verify_files(args.clean, args.delivered, cfg, min_delta_e=args.min_delta_e, reencode=not args.no_reencode)
    print(report.to_json() if args.json else summary_line(report))
    if not args.json:
        for reason in report.reasons:
            print(f"  {reason}", file=sys.stderr)
    return report.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.io.manifest import merge_stats
    from pipeline.io.output import OutputFolder
    from pipeline.stages.plan import plan

    cfg = _config(args)
    run_plan = plan(cfg)
    total = merge_stats(OutputFolder(cfg.io.output, cfg.io.storage.storage_options()))
    done, pending = len(run_plan.skipped), len(run_plan.pending)
    unit = "shards" if all(u.layout == "shards" for u in run_plan.shards) else "units"
    print(f"{unit}: {len(run_plan.shards)} total, {done} complete, {pending} pending")
    if run_plan.changed:
        print(f"changed inputs: {len(run_plan.changed)} completed shard(s) whose input changed (pending again):")
        for shard_id, why in run_plan.changed:
            print(f"  {shard_id}: {why}")
    print(f"items: {total.items} (ok {total.ok}, error {total.error}); Δe mean {total.delta_e_mean:.3f}")
    return 0


def _pack_report(summary) -> int:
    for where, why in summary.failed_files:
        print(f"FAILED {where}: {why}", file=sys.stderr)
    print(summary.line())
    return 0 if summary.ok else 3


def cmd_pack(args: argparse.Namespace) -> int:
    from pipeline.io import pack

    cfg = load_config(args.config, list(args.set or []))
    try:
        size = pack.parse_size(args.shard_size) if args.shard_size else None
    except ValueError as exc:
        raise ConfigError(f"--shard-size: {exc}") from exc
    summary = pack.pack(
        args.input, args.output, cfg.io.storage.storage_options(), tuple(cfg.audio.extensions), size,
        include_other=args.include_other, overwrite=args.overwrite, progress=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(f"shards: {args.output}  (shard-NNNNNN.tar; plan _pack.json; failed files _pack/failed.json)")
    return _pack_report(summary)


def cmd_unpack(args: argparse.Namespace) -> int:
    from pipeline.io import pack

    cfg = load_config(args.config, list(args.set or []))
    summary = pack.unpack(
        args.input, args.output, cfg.io.storage.storage_options(), overwrite=args.overwrite,
        max_member_bytes=int(cfg.audio.max_member_mb * 2**20), progress=lambda line: print(line, flush=True),
    )  # fmt: skip
    return _pack_report(summary)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; `command` (the first argument) picks the one evaluation command whose
    module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="unlearnable", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def job_args(p: argparse.ArgumentParser, config_required: bool) -> None:
        p.add_argument("--config", required=config_required, help="YAML config file")
        p.add_argument(
            "--input",
            help="WebDataset shards (folder, s3://bucket/prefix/, glob, {a..b} list), a folder or prefix of audio "
            "files, or Parquet audio datasets (io.input_format: auto detects which)",
        )
        p.add_argument("--output", help="output folder or s3://bucket/prefix/")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. attack.steps=20")
        p.add_argument("--overwrite", action="store_true", help="redo shards that already have a marker")

    p = sub.add_parser("protect", help="protect a catalog: WebDataset shards, a tree of audio files, Parquet datasets")
    job_args(p, config_required=True)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("protect-file", help="protect one audio file (no Ray): IN OUT")
    p.add_argument("input", help="audio file: path or s3:// URL")
    p.add_argument("output", help="where to write it (the extension follows the output format)")
    p.add_argument("--config", help="YAML config (default: the code's defaults, a RANDOM encoder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. attack.strength=4")
    p.set_defaults(func=cmd_protect_file)

    p = sub.add_parser("serve", help="the ingest HTTP service on Ray Serve (docs/service.md)")
    p.add_argument("--config", help="YAML config (default: the code's defaults, a RANDOM encoder)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; other than loopback needs UNLEARNABLE_API_TOKEN")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. service.max_batch_uploads=4")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="is DELIVERED a protected version of CLEAN? (exit 0 yes, 3/4/5 no)")
    p.add_argument("--clean", required=True, help="the original audio file")
    p.add_argument("--delivered", required=True, help="the file to check")
    p.add_argument("--config", help="YAML config: encoder and attack.eps (default: the code's defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--min-delta-e", type=float, help="Δe threshold (default 0.5 × attack.target_delta_e)")
    p.add_argument("--no-reencode", action="store_true", help="skip the MP3 128 kbps round-trip figure")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("status", help="count complete and pending shards (or units of files) of a run")
    job_args(p, config_required=True)
    p.set_defaults(func=cmd_status)

    for name, help_text in (
        ("pack", "a file tree of audio -> WebDataset shards of a target size (docs/storage.md)"),
        ("unpack", "(protected) shards made by `pack` -> the file tree again (docs/storage.md)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--input", required=True, help="folder or s3:// prefix (pack: a tree; unpack: shards)")
        p.add_argument("--output", required=True, help="output folder or s3://bucket/prefix/")
        p.add_argument("--config", help="YAML config (io.storage, audio.extensions; default: the code's defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. io.storage.region=eu-west-1")
        p.add_argument("--overwrite", action="store_true", help="pack: a new plan, every shard; unpack: redo all")
        if name == "pack":
            p.add_argument("--shard-size", help="target shard size: 256MB, 256MiB, 1GB (default: 256MiB)")
            p.add_argument("--include-other", action="store_true", help="pack non-audio files too (restored as is)")
        p.set_defaults(func=cmd_pack if name == "pack" else cmd_unpack)

    p = sub.add_parser("demo", help="generate a synthetic catalog and protect it (random encoder)")
    p.add_argument("--workdir", default="demo-output", help="where the catalog and outputs go")
    p.add_argument("--config", help=f"config (default {DEMO_CONFIG})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("embed", help="CLAP embedding of the first 10 s of an audio file")
    p.add_argument("input", help="audio file")
    p.add_argument("--checkpoint", required=True, help="random:HTSAT-tiny:0 | path | s3:// | https:// | hf://")
    p.add_argument("--amodel", default="HTSAT-base", choices=["HTSAT-tiny", "HTSAT-base"])
    p.add_argument("--sha256", help="pin the checkpoint file")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output .npy (float32 [512])")
    p.set_defaults(func=cmd_embed)

    # Each evaluation module owns its arguments; only the chosen command's module is imported.
    for name, (module, help_text) in EVALUATION_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=name == command)
        if name == command:
            importlib.import_module(module).build_parser(p)
    sub.add_parser("bench", help="benchmark engine, pipeline and baseline (see docs/benchmarks.md)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from pipeline.bench.runner import main as bench_main

        return bench_main(argv[1:])
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the CLI's last word: one clear line, the traceback with -v
        known = [FileNotFoundError]
        for module, name in USER_ERRORS:
            if module in sys.modules:
                known.append(getattr(sys.modules[module], name))
        if isinstance(exc, tuple(known)) and not args.verbose:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
