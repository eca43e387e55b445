"""Robustness evaluation on a cluster: `python -m jobs.robustness [--count N] [--attacks ...]`.

The protected output and the clean input come from UNLEARNABLE_OUTPUT / UNLEARNABLE_INPUT unless
given as --input / --clean; the encoder and storage settings from the run's saved
`<output>/_config.yaml` (or --config). Results: `<output>/robustness.parquet` and `.md`.
"""

from __future__ import annotations

import os
import sys

from pipeline.cli import main


def build_argv(argv: list[str], environ: dict[str, str]) -> list[str]:
    """`unlearnable robustness` arguments from this entrypoint's arguments and environment."""
    out = ["robustness", *argv]
    if environ.get("UNLEARNABLE_OUTPUT") and "--input" not in argv:
        out += ["--input", environ["UNLEARNABLE_OUTPUT"]]
    if environ.get("UNLEARNABLE_INPUT") and "--clean" not in argv:
        out += ["--clean", environ["UNLEARNABLE_INPUT"]]
    return out


if __name__ == "__main__":
    sys.exit(main(build_argv(sys.argv[1:], dict(os.environ))))
