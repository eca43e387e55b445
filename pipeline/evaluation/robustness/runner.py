"""Robustness evaluation: does Δe survive what a purifying attacker does to protected music?

`unlearnable robustness --input PROTECTED_URL --clean CLEAN_URL` samples protected items, runs
every attack of the suite (attacks.py; neural ones with a local checkpoint, neural.py) on the
first 10 s window of the clean and of the protected audio with the same random draw, and measures

- `delta_e_attacked` = ||CLAP(A(x+δ)) − CLAP(A(x))||: what an attacker who purifies everything
  still faces (the headline figure); `retained` = delta_e_attacked / Δe(x, x+δ);
- `delta_e_vs_clean` = ||CLAP(A(x+δ)) − CLAP(x)|| and `delta_e_attack_on_clean` = ||CLAP(A(x)) − CLAP(x)||
  (how far the attack moves the embedding by itself);
- `mos_lqo`: ViSQOL v3 MOS-LQO of A(x+δ) against the clean x (an attack that destroys the music
  is no attack);
- `above_target`: delta_e_attacked ≥ attack.target_delta_e.

`--compare LABEL=URL` adds other protected runs of the same clean catalog (e.g. with and without
EOT): one table with the runs side by side and their seconds per PGD step from their manifests.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from pipeline.config import PipelineConfig, config_from_dict
from pipeline.core.quality import visqol_moslqo
from pipeline.core.views import get_view
from pipeline.evaluation.common import Embedder, run_config, sample_pairs, write_outputs
from pipeline.evaluation.robustness.attacks import MUSICLDM_VIEW, SUITE, AttackError, resolve
from pipeline.evaluation.robustness.neural import NEURAL, NeuralAttacks
from pipeline.io.audio import decode
from pipeline.io.output import OutputFolder
from pipeline.records import SampleStatus

WINDOW_SECONDS = 10.0  # the first CLAP window is what is measured
RANDOM_NOTE = "RANDOM CLAP WEIGHTS: these figures show the evaluation runs, not real protection."

__all__ = ["AttackError", "RobustnessRow", "evaluate", "run_eot_views", "step_cost", "step_seconds"]


@dataclass
class RobustnessRow:
    """One (run, item, attack): Δe figures are L2 distances of unit CLAP embeddings."""

    run: str
    key: str
    shard_id: str
    attack: str
    family: str
    strength: str
    library: str
    delta_e_before: float  # Δe(x, x+δ)
    delta_e_attacked: float  # Δe(A(x), A(x+δ)): what survives the attack
    retained: float  # delta_e_attacked / delta_e_before
    delta_e_vs_clean: float  # Δe(x, A(x+δ))
    delta_e_attack_on_clean: float  # Δe(x, A(x)): the attack's own effect
    mos_lqo: float  # ViSQOL MOS-LQO of A(x+δ) vs x (1-4.73), NaN when not measured
    above_target: bool  # delta_e_attacked ≥ target
    attack_seconds: float  # wall seconds of the attack on one item (clean + protected)
    error: str = ""

    @classmethod
    def failed(cls, run: str, key: str, shard_id: str, attack: tuple[str, str, str, str], before: float, error: str):
        """A row without figures: `attack` = (name, family, strength, library)."""
        nan = float("nan")
        return cls(run, key, shard_id, *attack, before, nan, nan, nan, nan, nan, False, 0.0, error)


def _first_window(samples: np.ndarray, rate: int) -> np.ndarray:
    return np.ascontiguousarray(samples[: round(WINDOW_SECONDS * rate)])


def _to_reference(attacked: np.ndarray, rate: int, reference: np.ndarray, ref_rate: int) -> np.ndarray:
    """`attacked` on the reference's grid: same rate (soxr), channels and length (cut or zero-padded)."""
    import soxr

    if rate != ref_rate:
        attacked = soxr.resample(attacked, rate, ref_rate).astype(np.float32)
    if attacked.shape[1] != reference.shape[1]:
        attacked = np.repeat(attacked.mean(axis=1, keepdims=True), reference.shape[1], axis=1)
    out = np.zeros_like(reference)
    n = min(len(out), len(attacked))
    out[:n] = attacked[:n]
    return out


class _Measure:
    """Embeddings and quality of one item under the attacks, with the attacked-clean side cached
    (it is the same for every protected run of one clean catalog)."""

    def __init__(self, embed: Embedder, neural: NeuralAttacks, mos_seconds: float):
        self.embed, self.neural, self.mos_seconds = embed, neural, mos_seconds
        self._clean_cache: dict[tuple[str, str], object] = {}

    def attack(self, name: str, samples: np.ndarray, rate: int, seed: int) -> tuple[np.ndarray, int]:
        if name in NEURAL:
            return self.neural.run(name, samples, rate)
        return SUITE[name].fn(samples, rate, seed)

    def clean_side(self, key: str, name: str, clean: np.ndarray, rate: int, seed: int, e_clean: torch.Tensor):
        """(embedding of A(x), Δe(x, A(x)), seconds), cached per (key, attack)."""
        if (key, name) not in self._clean_cache:
            start = time.perf_counter()
            if name == MUSICLDM_VIEW:
                e_att = self.embed(clean, rate, musicldm_view=True)
            else:
                attacked, att_rate = self.attack(name, clean, rate, seed)
                e_att = self.embed(attacked, att_rate)
            self._clean_cache[(key, name)] = (e_att, float((e_att - e_clean).norm()), time.perf_counter() - start)
        return self._clean_cache[(key, name)]

    def row(
        self,
        run: str,
        shard_id: str,
        key: str,
        name: str,
        clean: np.ndarray,
        prot: np.ndarray,
        rate: int,
        seed: int,
        target: float,
        e_clean: torch.Tensor,
        e_prot: torch.Tensor,
        with_mos: bool,
    ) -> RobustnessRow:
        """One row: `e_clean`, `e_prot` are CLAP(x), CLAP(x+δ); ViSQOL only `with_mos`."""
        spec = SUITE.get(name)
        family, strength, library = (
            (spec.family, spec.strength, spec.library)
            if spec
            else ((name, "", "neural") if name in NEURAL else ("musicldm_view", "", "julius"))
        )
        before = float((e_prot - e_clean).norm())
        nan = float("nan")
        try:
            e_att_clean, alone, clean_seconds = self.clean_side(key, name, clean, rate, seed, e_clean)
            start = time.perf_counter()
            if name == MUSICLDM_VIEW:
                e_att_prot, mos = self.embed(prot, rate, musicldm_view=True), nan
            else:
                attacked, att_rate = self.attack(name, prot, rate, seed)
                e_att_prot = self.embed(attacked, att_rate)
                mos = nan
                if with_mos and self.mos_seconds > 0:
                    n = round(self.mos_seconds * rate)
                    mos = visqol_moslqo(clean[:n], _to_reference(attacked, att_rate, clean, rate)[:n], rate)
            seconds = clean_seconds + time.perf_counter() - start
        except Exception as exc:  # one failing attack never sinks the evaluation
            error = f"{type(exc).__name__}: {exc}"
            return RobustnessRow.failed(run, key, shard_id, (name, family, strength, library), before, error)
        attacked_de = float((e_att_prot - e_att_clean).norm())
        return RobustnessRow(
            run,
            key,
            shard_id,
            name,
            family,
            strength,
            library,
            before,
            attacked_de,
            attacked_de / before,
            float((e_att_prot - e_clean).norm()),
            alone,
            mos,
            attacked_de >= target,
            seconds,
        )


def evaluate(
    cfg: PipelineConfig,
    runs: dict[str, str],
    clean_url: str,
    count: int = 20,
    seed: int = 0,
    attacks: list[str] | None = None,
    mos_seconds: float = 5.0,
    checkpoints: dict[str, str] | None = None,
) -> list[RobustnessRow]:
    """Every attack on up to `count` sampled items of every protected run (label -> output URL);
    one row per (run, item, attack). The items are the same in every run where they exist (same
    seed over the same keys). A neural attack without a checkpoint gives rows with an error
    `unmeasured: ...`. ViSQOL (`mos_seconds` of the window; 0 skips it) scores the first run's
    attacked audio only: what an attack does to the music hardly depends on which δ it carries,
    and ViSQOL is the slowest part of the evaluation."""
    neural = NeuralAttacks(checkpoints or {})
    names = resolve(attacks, list(NEURAL))
    measure = _Measure(Embedder(cfg), neural, mos_seconds)
    target = cfg.attack.target_delta_e
    options = cfg.io.storage.storage_options()
    rows: list[RobustnessRow] = []
    clean_embeddings: dict[str, torch.Tensor] = {}
    for index, (run, url) in enumerate(runs.items()):
        pairs = sample_pairs(url, clean_url, options, count, seed, cfg.io.audio_column)
        for shard_id, key, clean_bytes, prot_bytes in pairs:
            clean, prot = decode(clean_bytes), decode(prot_bytes)
            rate = clean.sample_rate
            clean_w, prot_w = _first_window(clean.samples, rate), _first_window(prot.samples, rate)
            if key not in clean_embeddings:
                clean_embeddings[key] = measure.embed(clean_w, rate)
            e_clean, e_prot = clean_embeddings[key], measure.embed(prot_w, rate)
            item_seed = seed * 1_000_003 + sum(key.encode())  # the same draw for clean and protected
            for name in names:
                if name in NEURAL and not neural.available(name):
                    why = f"unmeasured: {neural.why(name)}"
                    rows.append(RobustnessRow.failed(run, key, shard_id, (name, name, "", "neural"), float("nan"), why))
                    continue
                rows.append(
                    measure.row(
                        run, shard_id, key, name, clean_w, prot_w, rate, item_seed, target, e_clean, e_prot, index == 0
                    )
                )
    return rows


def step_seconds(url: str, storage_options: dict) -> float:
    """Median seconds per PGD step and window over a run's ok items (manifest `seconds` /
    (`n_windows` × `steps_mean`)); NaN when the manifests do not say."""
    out = OutputFolder(url, storage_options)
    per_step: list[float] = []
    for shard_id in sorted(out.completed()):
        with out.fs.open(out.key(f"{shard_id}.parquet"), "rb") as f:
            table = pq.read_table(f, columns=["status", "seconds", "n_windows", "steps_mean"]).to_pylist()
        for row in table:
            if row["status"] == SampleStatus.OK and row["n_windows"] and row["steps_mean"] and row["steps_mean"] > 0:
                per_step.append(row["seconds"] / (row["n_windows"] * row["steps_mean"]))
    return float(np.median(per_step)) if per_step else float("nan")


def run_eot_views(url: str, storage_options: dict) -> tuple[str, ...]:
    """attack.eot_views of the run at `url` (its saved _config.yaml; the default without one)."""
    try:
        data = yaml.safe_load(OutputFolder(url, storage_options).read_text("_config.yaml")) or {}
    except FileNotFoundError:
        data = {}
    return config_from_dict(data).attack.eot_views


def step_cost(
    embed: Embedder, views_by_run: dict[str, tuple[str, ...]], repeats: int = 3, seed: int = 0
) -> dict[str, float]:
    """Seconds of one PGD step's forward + backward through each run's EOT views, on one 10 s CLAP
    window (random audio at -20 dBFS), the runs interleaved `repeats` times (so a change of load
    on a shared machine hits them alike), median per run. The engine's sign step and projection
    (microseconds) are left out."""
    model = embed.encoder.model
    generator = torch.Generator().manual_seed(seed)
    base = 0.1 * torch.randn(1, 480_000, generator=generator)
    times: dict[str, list[float]] = {run: [] for run in views_by_run}
    for _ in range(max(1, repeats)):
        for run, views in views_by_run.items():
            x = base.clone().to(embed.encoder.device).requires_grad_()
            start = time.perf_counter()
            clap_input = x if views == ("clean48k",) else torch.cat([get_view(v)(x, generator) for v in views])
            model(clap_input).float().norm(dim=-1).sum().backward()
            times[run].append(time.perf_counter() - start)
    return {run: float(np.median(t)) for run, t in times.items()}


def _parse_runs(args: argparse.Namespace) -> dict[str, str]:
    runs = {args.label: args.input}
    for item in args.compare or []:
        label, sep, url = item.partition("=")
        if not sep or not label or not url:
            raise ValueError(f"--compare wants LABEL=URL, got {item!r}")
        runs[label] = url
    return runs


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `unlearnable robustness` arguments (the CLI calls this with its sub-parser)."""
    parser = parser or argparse.ArgumentParser(prog="unlearnable robustness", description=__doc__)
    parser.add_argument("--input", required=True, help="protected output folder (has <shard>.parquet)")
    parser.add_argument("--label", default="protected", help="name of --input's run in the tables")
    parser.add_argument(
        "--compare",
        action="append",
        metavar="LABEL=URL",
        help="another protected run of the same clean shards, side by side (repeatable)",
    )
    parser.add_argument("--clean", required=True, help="the clean input shards' folder")
    parser.add_argument("--config", help="config (default: the run's saved <input>/_config.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--count", type=int, default=20, help="items to sample per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", help="comma list of attacks and families, `quick` or `all` (default all)")
    parser.add_argument("--mos-seconds", type=float, default=5.0, help="ViSQOL excerpt length, s (0: no MOS-LQO)")
    parser.add_argument(
        "--checkpoint",
        action="append",
        metavar="NAME=PATH",
        help=f"local checkpoint of a neural attack ({', '.join(NEURAL)}); repeatable",
    )
    parser.add_argument(
        "--step-repeats", type=int, default=3, help="interleaved timings of a PGD step per run's EOT views (0: skip)"
    )
    parser.add_argument("--out", help="where robustness.parquet/.md/.png go (default: --input)")
    parser.set_defaults(func=cmd_robustness)
    return parser


def cmd_robustness(args: argparse.Namespace) -> int:
    """Run the suite, write robustness.parquet, robustness.md and robustness.png, print the table."""
    from pipeline.evaluation.robustness.render import plot_png, summary_table

    cfg = run_config(args, args.input)
    runs = _parse_runs(args)
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else None
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint or [])
    rows = evaluate(cfg, runs, args.clean, args.count, args.seed, attacks, args.mos_seconds, checkpoints)
    if not rows:
        print("no protected items found to evaluate", file=sys.stderr)
        return 1
    options = cfg.io.storage.storage_options()
    views = {label: run_eot_views(url, options) for label, url in runs.items()}
    timing = {
        "eot_views": views,
        "manifest": {label: step_seconds(url, options) for label, url in runs.items()},
        "measured": step_cost(Embedder(cfg), views, args.step_repeats) if args.step_repeats > 0 else {},
    }
    table = summary_table(rows, cfg.attack.target_delta_e, timing)
    if cfg.encoder.checkpoint.startswith("random:"):
        table = f"{RANDOM_NOTE}\n\n{table}"
    out_dir = args.out or args.input
    write_outputs([asdict(r) for r in rows], out_dir, options, table, "robustness")
    folder = OutputFolder(out_dir, options)
    folder.write_atomic("robustness.png", plot_png(rows, cfg.encoder.checkpoint.startswith("random:")))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.evaluation.robustness ...`."""
    args = build_parser().parse_args(argv)
    return args.func(args)
