"""Protect whole tracks: window them, run PGD on batches of windows (windows of several tracks
share a batch), blend δ back, quantise to the output grid within ε, and measure the written audio.

No Ray and no storage: the Ray actor in stages/protect.py and the benchmark both call
:class:`TrackProtector`.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.engine import PGDParams, SpectralParams, pgd, spectral_attack
from pipeline.core.perceptual import (
    LEGACY_MASKING,
    MaskingConfig,
    allowed_amplitude,
    audibility,
    masking_threshold,
    project_below_threshold,
)
from pipeline.core.views import get_view
from pipeline.core.windows import WindowPlan, blend, plan_windows
from pipeline.encoders.base import ClapView
from pipeline.encoders.load import LoadedEncoder
from pipeline.io.audio import quantize_within


@dataclass
class Track:
    """A decoded track to protect. samples: float32 [samples, channels], full scale 1.0."""

    key: str
    samples: np.ndarray
    sample_rate: int  # Hz
    out_subtype: str  # libsndfile subtype it will be written in (its sample grid bounds δ)


@dataclass
class ProtectedTrack:
    """Result for one track; `samples` is None and `error` set when it failed."""

    key: str
    samples: np.ndarray | None = None  # [samples, channels], already on the output grid
    error: str = ""
    n_windows: int = 0
    delta_e_mean: float = float("nan")  # fp32 Δe of the written audio, per-window mean
    delta_e_min: float = float("nan")
    cos_mean: float = float("nan")
    delta_e_musicldm: float = float("nan")  # fp32 Δe through the deterministic MusicLDM view, mean
    linf: float = float("nan")  # max |x' - x|
    l2: float = float("nan")  # ||x' - x||₂ over all samples and channels
    snr_db: float = float("nan")  # dB
    mask_energy_above: float = float("nan")  # share of δ's energy above the masking threshold
    nmr_db: float = float("nan")  # noise-to-mask ratio, dB (mean over windows)
    capped_share: float = float("nan")  # spectral mode: share of δ's energy the L∞ cap removed (mean)
    delta_e_by_encoder: dict[str, float] = field(default_factory=dict)  # encoder id -> mean Δe
    objective: float = float("nan")  # the ensemble objective (mean or min of per-encoder Δe)
    steps_mean: float = float("nan")
    seconds: float = 0.0  # accelerator seconds attributed to this track


@dataclass(frozen=True)
class _Window:
    track: int  # index into the tracks of the call
    index: int  # window number within its track
    start: int  # samples
    length: int  # real samples (≤ window)


def difference_figures(clean: np.ndarray, protected: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float, float]:
    """(L∞, L2, SNR dB) of protected − clean, [samples, channels], accumulated in chunks.
    SNR is +inf for no change and -inf for a perturbed digital silence."""
    linf = noise = signal = 0.0
    for begin in range(0, clean.shape[0], chunk):
        x = clean[begin : begin + chunk].astype(np.float64)
        d = protected[begin : begin + chunk].astype(np.float64) - x
        linf = max(linf, float(np.abs(d).max(initial=0.0)))
        noise += float((d * d).sum())
        signal += float((x * x).sum())
    if noise == 0:
        snr = float("inf")
    elif signal == 0:
        snr = float("-inf")
    else:
        snr = float(10 * np.log10(signal / noise))
    return linf, noise**0.5, snr


PERCEPTUAL_MODES = ("spectral", "linf", "masking")
"""spectral: δ in the STFT domain under the music's masking threshold (engine.spectral_attack);
linf: plain PGD in an L∞ ball; masking: legacy PGD with alternating projections onto the legacy
masking threshold (kept to compare against, see docs/quality.md)."""


def window_seed(seed: int, key: str, index: int) -> int:
    """A per-window RNG seed that does not depend on batching or actor placement."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrackProtector:
    """Holds a frozen encoder and the attack settings; protects lists of tracks.

    Defaults are the config's (`perceptual` spectral, `margin_db` −3 dB = attack.strength 3,
    `passband_hz` 14 kHz); `pipeline.api.build_protector(cfg)` builds one from a config.

    Example::

        protector = TrackProtector(load_encoder("random:HTSAT-tiny:0"), PGDParams(0.003, 0.0006, 10, 0.00075))
        [result] = protector.protect([Track("k", samples, 44100, "PCM_16")])
    """

    def __init__(
        self,
        encoder: LoadedEncoder | list[LoadedEncoder],
        params: PGDParams,
        *,
        window_seconds: float = 10.0,
        overlap_seconds: float = 1.0,
        batch_windows: int = 8,
        seed: int = 0,
        perceptual: str = "spectral",
        eot_views: tuple[str, ...] = ("clean48k",),
        measure_musicldm: bool = True,
        measure_masking: bool = True,
        ensemble: str = "mean",
        passband_hz: float | None = 14000.0,
        margin_db: float = -3.0,
        lr: float = 0.1,
    ):
        if perceptual not in PERCEPTUAL_MODES:
            raise ValueError(f"perceptual must be one of {'|'.join(PERCEPTUAL_MODES)}, got {perceptual!r}")
        self.perceptual = perceptual
        self.margin_db = margin_db
        self.lr = lr
        self.eot_views = tuple(eot_views) or ("clean48k",)
        for name in self.eot_views:
            get_view(name)  # unknown names fail here, not mid-run
        self.measure_musicldm = measure_musicldm
        self.measure_masking = measure_masking
        self.masking = MaskingConfig()
        self._eot_generator = torch.Generator().manual_seed(seed)
        self.encoders = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
        self.encoder = self.encoders[0]  # the primary: its Δe fills delta_e_mean/min; its device hosts the batch
        if ensemble not in ("mean", "min"):
            raise ValueError(f"ensemble must be mean or min, got {ensemble!r}")
        self.ensemble = ensemble
        self.passband_hz = passband_hz
        self.params = params
        self.window_seconds = window_seconds
        self.overlap_seconds = overlap_seconds
        self.batch_windows = batch_windows
        self.seed = seed
        self._views: dict[int, ClapView] = {}

    def plan(self, n_samples: int, sample_rate: int) -> WindowPlan:
        window = max(1, round(self.window_seconds * sample_rate))
        overlap = round(self.overlap_seconds * sample_rate)
        return plan_windows(n_samples, window, overlap)

    def view(self, sample_rate: int) -> ClapView:
        if sample_rate not in self._views:
            self._views[sample_rate] = ClapView(sample_rate).to(self.encoder.device)
        return self._views[sample_rate]

    def _batches(self, tracks: list[Track], plans: list[WindowPlan]) -> Iterator[list[_Window]]:
        """Windows grouped by (rate, channels) — the shape a batch must share — in chunks."""
        groups: dict[tuple[int, int], list[_Window]] = defaultdict(list)
        for t, (track, plan) in enumerate(zip(tracks, plans)):
            for i, (start, length) in enumerate(zip(plan.starts, plan.lengths)):
                groups[(track.sample_rate, track.samples.shape[1])].append(_Window(t, i, start, length))
        for windows in groups.values():
            for begin in range(0, len(windows), self.batch_windows):
                yield windows[begin : begin + self.batch_windows]

    def _stack(self, tracks: list[Track], plans: list[WindowPlan], chunk: list[_Window], source: list[np.ndarray]):
        """[B, channels, window] float32 tensor of the chunk's windows (zero beyond each length)."""
        first = tracks[chunk[0].track]
        window = plans[chunk[0].track].window
        batch = np.zeros((len(chunk), first.samples.shape[1], window), dtype=np.float32)
        for b, w in enumerate(chunk):
            batch[b, :, : w.length] = source[w.track][w.start : w.start + w.length].T
        lengths = torch.tensor([w.length for w in chunk])
        device = self.encoder.device
        return torch.from_numpy(batch).to(device), lengths.to(device), first.sample_rate

    def embed_fn(
        self,
        sample_rate: int,
        lengths: torch.Tensor,
        views: tuple[str, ...],
        random: bool,
        encoders: list[LoadedEncoder] | None = None,
    ):
        """embed(x_rows, rows) for the engine: CLAP view of the track windows, then each named view
        (random parameters drawn on gradient steps when `random`), embeddings concatenated and
        divided by sqrt(#views), so the distance is the root-mean-square of the per-view Δe.
        With several encoders the result is stacked: [b, encoders, D]."""
        clap_view = self.view(sample_rate)
        models = [e.model for e in (encoders or self.encoders)]
        view_fns = [get_view(name) for name in views]
        generator = self._eot_generator if random else None

        def embed(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # Random view parameters only on gradient steps; the clean reference e(x) and the
            # final scoring see the deterministic views, so Δe compares like with like.
            draw = generator if x.requires_grad else None
            with torch.autocast(device_type=x.device.type, enabled=False):
                clap_input = clap_view(x.float(), lengths[rows])
                if views != ("clean48k",):
                    clap_input = torch.cat([fn(clap_input, draw) for fn in view_fns])
            per_encoder = []
            for model in models:
                embeddings = model(clap_input).float()  # [views * b, D]
                parts = embeddings.chunk(len(view_fns))
                per_encoder.append(torch.cat(parts, dim=-1) / len(view_fns) ** 0.5)
            return per_encoder[0] if len(per_encoder) == 1 else torch.stack(per_encoder, dim=1)

        return embed

    def distance(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The PGD objective per window: Δe, or its mean / min over an ensemble's encoders."""
        per_encoder = (adv - clean).norm(dim=-1)  # [b] or [b, encoders]
        if per_encoder.ndim == 1:
            return per_encoder
        return per_encoder.mean(dim=1) if self.ensemble == "mean" else per_encoder.min(dim=1).values

    def _constrain_fn(self, x: torch.Tensor, sample_rate: int):
        """The engine's extra projection (None when there is none): δ low-passed to the passband an
        imitator's loader keeps (δ above it never reaches its CLAP), then δ's STFT bins above the
        clean window's masking threshold scaled down to it, per channel."""
        steps = []
        if self.passband_hz is not None and self.passband_hz < sample_rate / 2:
            import julius

            cutoff = self.passband_hz / sample_rate
            steps.append(lambda delta, rows: julius.lowpass_filter(delta, cutoff))
        if self.perceptual == "masking":
            batch, channels, samples = x.shape
            threshold = masking_threshold(x.reshape(batch * channels, samples), sample_rate, LEGACY_MASKING)
            threshold = threshold.reshape(batch, channels, *threshold.shape[1:])

            def under_mask(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                flat = delta.reshape(-1, samples)
                th = threshold[rows].reshape(-1, *threshold.shape[2:])
                return project_below_threshold(flat, th, sample_rate, LEGACY_MASKING).reshape(delta.shape)

            steps.append(under_mask)
        if not steps:
            return None

        def constrain(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            for step in steps:
                delta = step(delta, rows)
            return delta

        return constrain

    def budget(self, x: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Spectral mode's per-bin budget of the windows x [B, C, samples]: [B, C, bins, frames]."""
        batch, channels, samples = x.shape
        threshold = masking_threshold(x.reshape(batch * channels, samples), sample_rate, self.masking)
        passband = self.passband_hz if self.passband_hz is not None and self.passband_hz < sample_rate / 2 else None
        amplitude = allowed_amplitude(
            threshold, sample_rate, self.masking, margin_db=self.margin_db, passband_hz=passband
        )
        return amplitude.reshape(batch, channels, *amplitude.shape[1:])

    def _attack(self, chunk: list[_Window], tracks: list[Track], x: torch.Tensor, lengths: torch.Tensor, rate: int):
        """Run the configured method on one batch of windows."""
        mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None])[:, None, :]
        embed = self.embed_fn(rate, lengths, self.eot_views, random=True)
        generators = [
            torch.Generator().manual_seed(window_seed(self.seed, tracks[w.track].key, w.index)) for w in chunk
        ]
        if self.perceptual == "spectral":
            budget = self.budget(x, rate)
            noise = torch.stack([torch.randn((*budget.shape[1:], 2), generator=g) for g in generators])
            params = SpectralParams(
                eps=self.params.eps,
                steps=self.params.steps,
                lr=self.lr,
                n_fft=self.masking.n_fft,
                hop=self.masking.hop,
                target_delta_e=self.params.target_delta_e,
                precision=self.params.precision,
                fixed_shape=self.params.fixed_shape,
            )
            return spectral_attack(embed, x, budget, params, noise=noise, mask=mask, distance=self.distance)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        constrain = self._constrain_fn(x, rate)
        return pgd(embed, x, self.params, noise=noise, mask=mask, constrain=constrain, distance=self.distance)

    def protect(self, tracks: list[Track]) -> list[ProtectedTrack]:
        """Protect every track; a failure is confined to the tracks of the failing batch."""
        plans = [self.plan(t.samples.shape[0], t.sample_rate) for t in tracks]
        deltas: list[list[np.ndarray | None]] = [[None] * len(p.starts) for p in plans]
        steps = [np.zeros(len(p.starts)) for p in plans]
        capped = [np.full(len(p.starts), np.nan) for p in plans]
        seconds = [0.0] * len(tracks)
        errors = [""] * len(tracks)
        clean_embeddings: dict[tuple[int, int], torch.Tensor] = {}
        clean_sources = [t.samples for t in tracks]

        for chunk in self._batches(tracks, plans):
            try:
                x, lengths, rate = self._stack(tracks, plans, chunk, clean_sources)
                started = time.perf_counter()
                result = self._attack(chunk, tracks, x, lengths, rate)
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                elapsed = time.perf_counter() - started
            except Exception as exc:  # one bad batch never sinks the others
                for w in chunk:
                    errors[w.track] = errors[w.track] or f"pgd: {type(exc).__name__}: {exc}"
                continue
            delta = result.delta.cpu().numpy()
            for b, w in enumerate(chunk):
                deltas[w.track][w.index] = delta[b]
                steps[w.track][w.index] = int(result.steps[b])
                if result.capped_share is not None:
                    capped[w.track][w.index] = float(result.capped_share[b])
                seconds[w.track] += elapsed / len(chunk)
                if self.params.precision == "fp32" and self.eot_views == ("clean48k",) and len(self.encoders) == 1:
                    clean_embeddings[(w.track, w.index)] = result.clean_embedding[b]

        outputs: list[ProtectedTrack] = []
        protected_sources: list[np.ndarray] = []
        for t, track in enumerate(tracks):
            out = ProtectedTrack(key=track.key, error=errors[t], n_windows=len(plans[t].starts))
            if not errors[t]:
                delta = blend(plans[t], [d for d in deltas[t] if d is not None])  # [channels, samples]
                out.samples = self._write_grid(track, delta)
                out.steps_mean = float(steps[t].mean())
                out.capped_share = float(np.mean(capped[t])) if self.perceptual == "spectral" else float("nan")
                out.seconds = seconds[t]
                out.linf, out.l2, out.snr_db = difference_figures(track.samples, out.samples)
            outputs.append(out)
            protected_sources.append(out.samples if out.samples is not None else track.samples)

        self._measure(tracks, plans, protected_sources, outputs, clean_embeddings, seconds)
        return outputs

    def _write_grid(self, track: Track, delta: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """x + δ on the output subtype's grid within ε, built in chunks of `chunk` samples so the
        float64 temporaries of quantisation never cover the whole track."""
        out = np.empty_like(track.samples, dtype=np.float32)
        for begin in range(0, track.samples.shape[0], chunk):
            clean = track.samples[begin : begin + chunk]
            proposed = clean + delta[:, begin : begin + chunk].T
            out[begin : begin + chunk] = quantize_within(clean, proposed, self.params.eps, track.out_subtype)
        return out

    @torch.no_grad()
    def _measure(self, tracks, plans, protected_sources, outputs, clean_embeddings, seconds) -> None:
        """Δe and cosine of the audio as written (blended, quantised), in fp32, per window; Δe
        through the deterministic MusicLDM view; masking audibility of δ."""
        per_track: list[dict[str, list[float]]] = [defaultdict(list) for _ in tracks]
        clean_sources = [t.samples for t in tracks]
        for chunk in self._batches(tracks, plans):
            if all(outputs[w.track].error for w in chunk):
                continue
            started = time.perf_counter()
            try:
                adv, lengths, rate = self._stack(tracks, plans, chunk, protected_sources)
                clean, _, _ = self._stack(tracks, plans, chunk, clean_sources)
                rows = torch.arange(len(chunk), device=adv.device)
                figures = self._window_figures(chunk, adv, clean, lengths, rate, rows, clean_embeddings)
            except Exception as exc:
                for w in chunk:
                    outputs[w.track].error = outputs[w.track].error or f"measure: {type(exc).__name__}: {exc}"
                continue
            elapsed = time.perf_counter() - started
            for name, values in figures.items():
                for b, w in enumerate(chunk):
                    per_track[w.track][name].append(float(values[b]))
            for w in chunk:
                outputs[w.track].seconds += elapsed / len(chunk)
        for t, out in enumerate(outputs):
            if out.error:
                out.samples = None
                continue
            figures = per_track[t]
            out.delta_e_mean = float(np.mean(figures["delta_e"]))
            out.delta_e_min = float(np.min(figures["delta_e"]))
            out.cos_mean = float(np.mean(figures["cos"]))
            out.delta_e_by_encoder = {self.encoder.encoder_id: out.delta_e_mean}
            for name, values in figures.items():
                if name.startswith("delta_e:"):
                    out.delta_e_by_encoder[name.split(":", 1)[1]] = float(np.mean(values))
            per_encoder = np.array(list(out.delta_e_by_encoder.values()))
            out.objective = float(per_encoder.mean() if self.ensemble == "mean" else per_encoder.min())
            if figures.get("delta_e_musicldm"):
                out.delta_e_musicldm = float(np.mean(figures["delta_e_musicldm"]))
            if figures.get("excess"):
                out.mask_energy_above = float(np.sum(figures["excess"]) / max(np.sum(figures["power"]), 1e-20))
                out.nmr_db = float(np.mean(figures["nmr_db"]))

    def _window_figures(self, chunk, adv, clean, lengths, rate, rows, clean_embeddings) -> dict[str, torch.Tensor]:
        """Per-window measurements of one batch: [B] tensors by name."""
        embed = self.embed_fn(rate, lengths, ("clean48k",), random=False, encoders=self.encoders[:1])
        adv_e = embed(adv, rows)
        if all((w.track, w.index) in clean_embeddings for w in chunk):
            clean_e = torch.stack([clean_embeddings[(w.track, w.index)] for w in chunk])
        else:
            clean_e = embed(clean, rows)
        figures = {
            "delta_e": (adv_e - clean_e).norm(dim=-1).cpu(),
            "cos": torch.nn.functional.cosine_similarity(adv_e, clean_e, dim=-1).cpu(),
        }
        for encoder in self.encoders[1:]:  # the primary's Δe is "delta_e"; the others by their id
            other = self.embed_fn(rate, lengths, ("clean48k",), random=False, encoders=[encoder])
            figures[f"delta_e:{encoder.encoder_id}"] = (other(adv, rows) - other(clean, rows)).norm(dim=-1).cpu()
        if self.measure_musicldm:
            view = self.embed_fn(rate, lengths, ("musicldm",), random=False, encoders=self.encoders[:1])
            figures["delta_e_musicldm"] = (view(adv, rows) - view(clean, rows)).norm(dim=-1).cpu()
        if self.measure_masking:
            batch, channels, samples = clean.shape
            mask = (torch.arange(samples, device=clean.device)[None, :] < lengths[:, None])[:, None, :]
            delta = ((adv - clean) * mask).reshape(batch * channels, samples)
            result = audibility(clean.reshape(batch * channels, samples), delta, rate, self.masking)
            power = delta.pow(2).sum(dim=-1).reshape(batch, channels).sum(dim=1).cpu()
            share = result.energy_above_share.reshape(batch, channels).cpu()
            channel_power = delta.pow(2).sum(dim=-1).reshape(batch, channels).cpu()
            figures["excess"] = (share * channel_power).sum(dim=1)
            figures["power"] = power
            figures["nmr_db"] = result.nmr_db.reshape(batch, channels).mean(dim=1).cpu()
        return figures
