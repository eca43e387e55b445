"""Protect a catalog on a cluster: `python -m jobs.protect_catalog --config /etc/unlearnable/config.yaml`.

Input/output come from the config, or from UNLEARNABLE_INPUT / UNLEARNABLE_OUTPUT; the S3 endpoint
from AWS_ENDPOINT_URL when the config leaves it empty; credentials only from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, mounted from a Secret). Extra arguments pass through
to `unlearnable protect` (e.g. --set attack.steps=30).
"""

from __future__ import annotations

import os
import sys

from pipeline.cli import main


def build_argv(argv: list[str], environ: dict[str, str]) -> list[str]:
    """`unlearnable protect` arguments from this entrypoint's arguments and environment."""
    out = ["protect", *argv]
    if environ.get("UNLEARNABLE_INPUT") and "--input" not in argv:
        out += ["--input", environ["UNLEARNABLE_INPUT"]]
    if environ.get("UNLEARNABLE_OUTPUT") and "--output" not in argv:
        out += ["--output", environ["UNLEARNABLE_OUTPUT"]]
    if environ.get("AWS_ENDPOINT_URL") and not any("io.storage.endpoint_url" in a for a in argv):
        out += ["--set", f"io.storage.endpoint_url={environ['AWS_ENDPOINT_URL']}"]
    return out


if __name__ == "__main__":
    sys.exit(main(build_argv(sys.argv[1:], dict(os.environ))))
