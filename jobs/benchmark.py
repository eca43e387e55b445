"""Benchmark job: the engine, the Ray Data pipeline and laion-clap's naive loop in one run.

Thin wrapper around :func:`pipeline.bench.runner.main` (same arguments), e.g.::

    python jobs/benchmark.py --quick
    python jobs/benchmark.py --out docs/benchmarks.md
"""

from __future__ import annotations

import sys

from pipeline.bench.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
