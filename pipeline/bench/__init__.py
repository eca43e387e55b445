"""The benchmark: one run that measures, on the same machine and at the same PGD settings:

1. the bare engine (:func:`pipeline.core.engine.pgd` on in-memory 48 kHz mono windows), per batch size,
   precision (fp32 / bf16 autocast) and optionally with ``torch.compile`` (``engine``);
2. laion-clap's own audio path in a naive per-item fp32 loop (weights not frozen), the baseline
   (``baseline``);
3. the real Ray Data pipeline (:func:`pipeline.stages.pipeline.run`) from tar shards on disk to
   written shards and manifests, as an efficiency against an engine reference timed in the same
   section at the same steps (``--pipeline-steps``, default 50), batch, precision and torch threads,
   with the actor on dedicated cores (CPU stages on the rest) and, on CPU, sharing all cores
   (``pipeline``);
4. peak RSS of a process that protects a short vs a long track with :class:`TrackProtector`
   (``memory``);
5. on a CUDA device: HTSAT-base, 50 bf16 steps, windows/s, × realtime and achieved TFLOP/s against a
   measured bf16 matmul ceiling (``gpu``);
6. an encoder ensemble (1, 2, 3 random HTSAT-tiny encoders, TrackProtector's embed and mean distance):
   seconds per PGD step per window and the peak memory increase, each size in its own process
   (``ensemble``).

``common`` holds what the sections share (timing, the synthetic clip, /proc memory, the CPU
contention meter), ``results`` the rows, settings and report, ``render`` the Markdown tables,
``page`` the docs/benchmarks.md page around them, ``runner`` the command line (entry point
:func:`pipeline.bench.runner.main`; ``python -m pipeline.bench`` runs it).

Early stop is disabled (target_delta_e = inf) so every window runs exactly the stated steps. Times
are medians of ``--repeats`` runs after ``--warmup`` runs. Ratios (speedup, efficiency, memory) are
the result; absolute CPU times are context only.

Example::

    python -m pipeline.bench --quick                  # < 3 minutes on 2 cores, prints the tables
    python -m pipeline.bench --out docs/benchmarks.md # the full run (HTSAT-tiny and HTSAT-base)
"""
