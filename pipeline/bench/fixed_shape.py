"""`python -m pipeline.bench.fixed_shape`: the default PGD loop against the fixed-shape one
(attack.fixed_shape) on the same windows, interleaved, in one run: seconds per call (median) and
their ratio, and whether both found the same Δe. On CPU the fixed shape must not be slower when no
window stops early; its gain (a step CUDA graphs can capture) is a GPU figure (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.bench.common import ALPHA, EPS, SIGMA
from pipeline.core.engine import PGDParams, pgd
from pipeline.encoders.base import CLAP_RATE, ClapView
from pipeline.encoders.load import load_encoder, pick_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.fixed_shape", description=__doc__)
    p.add_argument("--amodel", default="HTSAT-tiny")
    p.add_argument("--batch", type=int, default=4, help="10 s windows per call")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per loop, interleaved (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed 1-step calls per loop first (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    encoder = load_encoder(f"random:{args.amodel}:0", device=str(device))
    x = torch.randn(args.batch, 1, CLAP_RATE * 10, generator=torch.Generator().manual_seed(0)).to(device) * 0.1
    view = ClapView(CLAP_RATE).to(device)
    lengths = torch.full((args.batch,), CLAP_RATE * 10, device=device)

    def embed(rows_x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return encoder.model(view(rows_x, lengths[rows]))

    seconds: dict[bool, list[float]] = {False: [], True: []}
    found: dict[bool, torch.Tensor] = {}
    for fixed in (False, True) * args.warmup:  # one-time kernel selection and allocation outside the timing
        pgd(embed, x, PGDParams(EPS, ALPHA, 1, SIGMA, fixed_shape=fixed), generator=torch.Generator().manual_seed(0))
    for _ in range(args.repeats):
        for fixed in (False, True):
            params = PGDParams(eps=EPS, alpha=ALPHA, steps=args.steps, sigma=SIGMA, fixed_shape=fixed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = pgd(embed, x, params, generator=torch.Generator().manual_seed(0))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[fixed].append(time.perf_counter() - started)
            found[fixed] = result.delta_e.cpu()
    default, fixed = statistics.median(seconds[False]), statistics.median(seconds[True])
    same = torch.allclose(found[False], found[True], rtol=1e-5, atol=1e-6)
    work = args.batch * args.steps
    print(
        f"{args.amodel} on {device}, batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads "
        f"(random weights): default {work / default:.3f} window-steps/s, fixed shape {work / fixed:.3f}; "
        f"fixed ÷ default time {fixed / default:.3f}; same Δe: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
