"""`unlearnable imitate`: the run in steps (catalog and prepared data, reference embeddings, per
model: train, sample, score; summary and outputs) and its command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from pipeline.config import ConfigError
from pipeline.encoders.base import set_hub_offline
from pipeline.evaluation.extra import EvalExtraMissing, require
from pipeline.evaluation.imitation.catalog import (
    CatalogItem,
    add_noise_control,
    load_catalog,
    load_encoder_for,
    make_catalog,
)
from pipeline.evaluation.imitation.config import (
    MODELS,
    MODES,
    RANDOM_NOTE,
    REAL_NOTE,
    ImitationConfig,
    load_imitation_config,
)
from pipeline.evaluation.imitation.coverage import (
    add_coverage,
    coverage_markdown,
    coverage_table,
    is_covered,
    parse_shares,
)
from pipeline.evaluation.imitation.data import MelFrontEnd, clap_embed, peak_normalise, prepare
from pipeline.evaluation.imitation.metrics import (
    centred_cosine,
    cosine,
    markdown,
    median,
    style_match,
    summarise,
    write_png,
)
from pipeline.evaluation.imitation.model import load_state, sample_mels, save_state, train_model

logger = logging.getLogger(__name__)
EVAL_LIBRARIES = ("diffusers", "librosa", "matplotlib", "tqdm")
SIMILARITY_COLUMNS = ("sim_protecting", "sim_held_out", "sim_protecting_centred", "sim_held_out_centred")


def prepared_data(
    cfg: ImitationConfig,
    folder: Any,
    front: MelFrontEnd,
    protecting: Any,
    timings: dict[str, float],
    *,
    make_catalog_n: int,
    clean_url: str | None,
    protected_url: str | None,
    items: list[CatalogItem] | None,
) -> dict[str, Any]:
    """Crops, log-mels and CLAP conditions of the three catalogs: from `prepared.pt` when its
    digest matches these settings, else built (catalog, noise control, prepare) and saved."""
    source = "make" if make_catalog_n else "urls"
    data_digest = cfg.digest("catalog", "attack", "mel", "encoder") + f"-{source}-{make_catalog_n}"
    data = load_state(folder, "prepared.pt")
    if data is not None and data.get("digest") == data_digest and items is None:
        logger.info("reusing prepared data from %s/prepared.pt", folder.url)
        return data
    t0 = time.perf_counter()
    if items is None:
        if make_catalog_n:
            items = make_catalog(cfg, make_catalog_n, protecting)
        elif clean_url and protected_url:
            items = load_catalog(clean_url, protected_url, cfg.storage.storage_options())
        else:
            raise ValueError("give --make-catalog N, or both --clean and --protected")
    add_noise_control(items, cfg.attack.eps, cfg.attack.seed)
    timings["catalog+protect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = prepare(cfg, items, protecting, front)
    data["digest"] = data_digest
    save_state(folder, "prepared.pt", data)
    timings["prepare"] = time.perf_counter() - t0
    return data


@dataclass
class Scorer:
    """Scores generated log-mels against the clean crops the imitator was prompted with: CLAP
    similarity with the protecting and the held-out encoder (raw, centred, nearest style), mel L1."""

    cfg: ImitationConfig
    front: MelFrontEnd
    data: dict[str, Any]
    encoders: dict[str, Any]  # protecting, held_out
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys, self.styles = list(self.data["keys"]), list(self.data["styles"])
        self.first_crop = torch.arange(len(self.keys)) * self.cfg.mel.crops_per_track
        # The imitator's prompt: e(x) of the clean crop; the reference: the clean crop itself.
        self.prompts = self.data["clean/cond"][self.first_crop]
        self.reference_logmel = self.data["clean/logmel"][self.first_crop]
        reference_wave = self.data["clean/wave"][self.first_crop].numpy()
        self.reference = {"protecting": self.prompts, "held_out": self.embed("held_out", reference_wave)}
        self.means = {k: v.mean(0) for k, v in self.reference.items()}

    def embed(self, which: str, waves: np.ndarray) -> torch.Tensor:
        return clap_embed(self.encoders[which], waves, self.cfg.mel.sample_rate, self.cfg.encoder.batch)

    def _add_time(self, name: str, since: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since

    def score(self, model: str, mode: str, logmels: torch.Tensor) -> list[dict]:
        cfg = self.cfg
        t0 = time.perf_counter()
        waves = np.stack(
            [self.front.griffin_lim(m.numpy(), cfg.sample.griffin_lim_iters, cfg.sample.mel_inverse) for m in logmels]
        )
        waves = peak_normalise(waves) if cfg.mel.peak_normalise else waves
        self._add_time("griffin_lim", t0)
        t0 = time.perf_counter()
        generated = {which: self.embed(which, waves) for which in ("protecting", "held_out")}
        self._add_time("clap_eval", t0)
        figures = {}
        for enc in ("protecting", "held_out"):
            ref, mean = self.reference[enc], self.means[enc]
            figures[f"sim_{enc}"] = cosine(generated[enc], ref)
            figures[f"sim_{enc}_centred"] = centred_cosine(generated[enc], ref, mean)
            figures[f"style_match_{enc}"] = style_match(generated[enc], ref, self.styles, mean)
        mel_l1 = (logmels - self.reference_logmel).abs().mean(dim=(1, 2)).numpy()
        profile_l1 = (logmels.mean(-1) - self.reference_logmel.mean(-1)).abs().mean(-1).numpy()
        cond_de = None
        if f"{model}/cond" in self.data:
            cond_de = (self.data[f"{model}/cond"][self.first_crop] - self.prompts).norm(dim=-1).numpy()
        return [
            {
                "key": key,
                "style": self.styles[i],
                "model": model,
                "mode": mode,
                "covered": is_covered(self.data, model, i),  # protected in this model's training data
                **{k: float(v[i]) if v.dtype != bool else bool(v[i]) for k, v in figures.items()},
                "mel_l1": float(mel_l1[i]),
                "mel_profile_l1": float(profile_l1[i]),
                "condition_delta_e": float(cond_de[i]) if cond_de is not None else 0.0,
                "delta_e_protect": float(self.data["delta_e_protect"][i]),
            }
            for i, key in enumerate(self.keys)
        ]


def train_and_score(
    cfg: ImitationConfig,
    scorer: Scorer,
    device: torch.device,
    folder: Any,
    timings: dict[str, float],
    extra_models: tuple[str, ...] = (),
) -> tuple[list[dict], dict[str, list[float]]]:
    """The Griffin-Lim reference rows, then per model (MODELS, then `extra_models`: the partial
    coverage ones): train (or resume), sample conditional and unconditional, score. Returns the
    rows and each model's training losses."""
    rows = scorer.score("reference", "griffin_lim", scorer.reference_logmel)
    losses: dict[str, list[float]] = {}
    for name in (*MODELS, *extra_models):
        t0 = time.perf_counter()
        model, losses[name] = train_model(cfg, name, scorer.data, scorer.front, device, folder)
        timings[f"train {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generated = {
            mode: sample_mels(
                cfg, model, scorer.prompts, mode == "conditional", scorer.front, device, f"sample {name} {mode[:6]}"
            )
            for mode in MODES
        }
        timings[f"sample {name}"] = time.perf_counter() - t0
        for mode in MODES:
            rows += scorer.score(name, mode, generated[mode])
        del model
    timings.update(scorer.seconds)
    return rows, losses


def build_summary(
    cfg: ImitationConfig,
    scorer: Scorer,
    rows: list[dict],
    losses: dict[str, list[float]],
    timings: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """summary.json's content (its `markdown` added by the caller): the table, the gaps between
    models, the end of each loss curve, condition Δe, versions and timings."""
    table = summarise(rows, cfg.target, tuple(losses))
    by = {(r["model"], r["mode"]): r for r in table}
    gaps = {
        f"{a} − {b}": {
            c: by[(a, "conditional")][f"median_{c}"] - by[(b, "conditional")][f"median_{c}"] for c in SIMILARITY_COLUMNS
        }
        for a, b in (("clean", "protected"), ("clean", "noise"), ("noise", "protected"))
    }
    tail = {name: max(1, len(v) // 10) for name, v in losses.items()}
    clean_c, clean_u = by[("clean", "conditional")], by[("clean", "unconditional")]
    protecting, held_out = scorer.encoders["protecting"], scorer.encoders["held_out"]
    return {
        "first_line": RANDOM_NOTE if protecting.is_random or held_out.is_random else REAL_NOTE,
        "encoders": {"protecting": protecting.encoder_id, "held_out": held_out.encoder_id},
        "tracks": len(scorer.keys),
        "styles": len(set(scorer.styles)),
        "frames": scorer.front.frames,
        "target": cfg.target,
        "table": table,
        "coverage": coverage_table(rows, cfg.protected_shares),
        "gaps": gaps,
        "loss_end": {name: float(np.mean(v[-tail[name] :])) if v else float("nan") for name, v in losses.items()},
        "loss_curves": {name: v[:: max(1, len(v) // 200)] for name, v in losses.items()},
        "train_steps": cfg.train.steps,
        "sample_steps": cfg.sample.steps,
        "guidance_scale": cfg.sample.guidance_scale,
        "griffin_lim_iters": cfg.sample.griffin_lim_iters,
        "mel_inverse": "librosa mel_to_stft NNLS" if cfg.sample.mel_inverse == "nnls" else "pseudo-inverse",
        "condition_delta_e": {
            m: median([r["condition_delta_e"] for r in rows if r["model"] == m and r["mode"] == "conditional"])
            for m in ("protected", "noise")
        },
        "clean_learns": bool(clean_c["median_sim_protecting_centred"] > clean_u["median_sim_protecting_centred"]),
        "clean_conditional_minus_unconditional": {
            c: clean_c[f"median_{c}"] - clean_u[f"median_{c}"] for c in SIMILARITY_COLUMNS
        },
        "wall_seconds": time.perf_counter() - started,
        "timings": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "versions": _versions(),
    }


def write_outputs(folder: Any, cfg: ImitationConfig, summary: dict[str, Any], rows: list[dict]) -> None:
    """imitation.parquet (one row per track, model and mode), imitation.md, summary.json, similarity.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    folder.write_atomic("imitation.parquet", buffer.getvalue().to_pybytes())
    folder.write_atomic("imitation.md", (summary["markdown"] + "\n").encode())
    folder.write_atomic("summary.json", json.dumps(summary, indent=1, default=str).encode())
    write_png(folder, summary["table"], rows, cfg.target)


def run(
    cfg: ImitationConfig,
    out_url: str,
    *,
    make_catalog_n: int = 0,
    clean_url: str | None = None,
    protected_url: str | None = None,
    items: list[CatalogItem] | None = None,
) -> dict[str, Any]:
    """The whole imitation test; writes imitation.parquet/.md, similarity.png, summary.json under
    `out_url` and returns the summary."""
    from pipeline.encoders.load import emulated_precision_note, pick_device
    from pipeline.io.output import OutputFolder

    hub_offline(cfg)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.set_num_threads(max(1, cfg.train.threads))
    folder = OutputFolder(out_url, cfg.storage.storage_options())
    folder.ensure()
    folder.write_atomic("imitation-config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    front = MelFrontEnd(cfg.mel)
    protecting = load_encoder_for(cfg, "protecting")
    device = pick_device(cfg.encoder.device)
    slow = emulated_precision_note(device, "bf16")
    if slow and "bf16" in (cfg.train.precision, cfg.attack.precision):
        logger.warning("%s: set train.precision=fp32 and attack.precision=fp32 here.", slow)

    data = prepared_data(
        cfg,
        folder,
        front,
        protecting,
        timings,
        make_catalog_n=make_catalog_n,
        clean_url=clean_url,
        protected_url=protected_url,
        items=items,
    )
    extra = add_coverage(data, cfg.protected_shares, cfg.mel.crops_per_track, cfg.catalog.seed)
    held_out = load_encoder_for(cfg, "held_out")
    t0 = time.perf_counter()
    scorer = Scorer(cfg, front, data, {"protecting": protecting, "held_out": held_out})
    timings["reference"] = time.perf_counter() - t0
    rows, losses = train_and_score(cfg, scorer, device, folder, timings, tuple(extra))
    summary = build_summary(cfg, scorer, rows, losses, timings, started)
    summary["markdown"] = markdown(summary)
    if summary["coverage"]:
        summary["markdown"] += "\n\n" + coverage_markdown(summary["coverage"])
    write_outputs(folder, cfg, summary, rows)
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "librosa", "laion-clap", "julius", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from pipeline.evaluation import imitation

    parser = parser or argparse.ArgumentParser(prog="unlearnable imitate", description=imitation.__doc__)
    parser.add_argument("--config", help="imitation YAML (configs/imitation-cpu.yaml, configs/imitation-gpu.yaml)")
    parser.add_argument("--clean", help="clean shards: folder, s3://bucket/prefix/, glob or .tar")
    parser.add_argument("--protected", help="protected shards (matched to --clean by key)")
    parser.add_argument("--make-catalog", type=int, default=0, metavar="N", help="synthesize and protect N tracks")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=50")
    parser.add_argument(
        "--protected-share",
        metavar="PCT,PCT,...",
        help="partial coverage: also train imitators with these percentages of each style's tracks protected "
        "(e.g. 25,50,80,100; 100 is the protected model)",
    )
    parser.set_defaults(func=cmd_imitate)
    return parser


def hub_offline(cfg: ImitationConfig) -> None:
    """HF_HUB_OFFLINE=1 before anything imports huggingface_hub (diffusers does, and the hub
    library reads the variable once at import) when encoder.hub_offline is set."""
    if cfg.encoder.hub_offline:
        set_hub_offline()


def require_eval_libraries() -> None:
    """Raises EvalExtraMissing (with the install hint) unless the evaluation extra is installed."""
    for name in EVAL_LIBRARIES:
        if importlib.util.find_spec(name) is None:
            require(name, "unlearnable imitate")


def cmd_imitate(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if getattr(args, "protected_share", None):
        overrides.append(f"protected_shares={list(parse_shares(args.protected_share))}")
    cfg = load_imitation_config(args.config, overrides)
    hub_offline(cfg)
    try:
        require_eval_libraries()
    except EvalExtraMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.make_catalog and not (args.clean and args.protected):
        raise ConfigError("give --make-catalog N, or both --clean URL and --protected URL")
    print(RANDOM_NOTE if "random:" in cfg.encoder.checkpoint + cfg.encoder.held_out else REAL_NOTE, flush=True)
    summary = run(cfg, args.out, make_catalog_n=args.make_catalog, clean_url=args.clean, protected_url=args.protected)
    print(summary["markdown"])
    print(f"outputs: {args.out}  (imitation.parquet, imitation.md, similarity.png, summary.json, ckpt-*.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
