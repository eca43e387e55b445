"""The imitation test's training catalogs: a synthetic one of distinct styles protected in memory
(`--make-catalog N`), or clean and protected shards matched by key; the noise control."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.api import build_protector
from pipeline.core.protect import Track
from pipeline.evaluation.imitation.config import ImitationConfig
from pipeline.evaluation.imitation.styles import STYLES, synthesize_style

logger = logging.getLogger(__name__)
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "oga", "aiff", "aif")

# -------------------------------------------------------------------------------- synthetic music


# ------------------------------------------------------------------------------------- catalogs


@dataclass
class CatalogItem:
    """One training track in three versions, mono at `rate`, float32 [samples]."""

    key: str
    style: str
    rate: int
    clean: np.ndarray
    protected: np.ndarray
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    delta_e_protect: float = float("nan")  # the protector's own Δe of the written audio


def load_encoder_for(cfg: ImitationConfig, which: str):
    from pipeline.encoders.load import load_encoder

    e = cfg.encoder
    spec, amodel, sha = (
        (e.checkpoint, e.amodel, e.sha256)
        if which == "protecting"
        else (e.held_out, e.held_out_amodel, e.held_out_sha256)
    )
    return load_encoder(
        spec,
        amodel,
        sha256=sha,
        cache_dir=e.cache_dir,
        hub_offline=e.hub_offline,
        device=e.device,
        storage_options=cfg.storage.storage_options(),
    )


def make_catalog(cfg: ImitationConfig, n_tracks: int, encoder) -> list[CatalogItem]:
    """`n_tracks` synthetic tracks over `catalog.styles` styles, protected with the TrackProtector
    that pipeline.api.build_protector builds from the attack section (with `encoder`)."""
    c = cfg.catalog
    tracks, styles = [], []
    for i in range(n_tracks):
        style = STYLES[i % c.styles]
        samples = synthesize_style(style, c.seconds, c.sample_rate, seed=c.seed * 100_003 + i)
        tracks.append(Track(f"track-{i:04d}", samples, c.sample_rate, "FLOAT"))
        styles.append(style.name)
    protector = build_protector(cfg.attack.protect_config(cfg.encoder), [encoder])
    started = time.perf_counter()
    results = protector.protect(tracks)
    logger.info("protected %d tracks in %.1f s", len(tracks), time.perf_counter() - started)
    items = []
    for track, style, result in zip(tracks, styles, results):
        if result.error or result.samples is None:
            raise RuntimeError(f"protection failed for {track.key}: {result.error}")
        items.append(
            CatalogItem(
                track.key,
                style,
                c.sample_rate,
                track.samples[:, 0],
                result.samples[:, 0],
                delta_e_protect=result.delta_e_mean,
            )
        )
    return items


def _audio_members(url: str, storage_options: dict) -> dict[str, tuple[bytes, dict]]:
    """key -> (audio bytes, json metadata) of every shard at `url` (folder, glob or .tar)."""
    from pipeline.io.shards import list_shards, read_samples

    out: dict[str, tuple[bytes, dict]] = {}
    for ref in list_shards(url, storage_options):
        samples, error = read_samples(ref.url, storage_options)
        if error:
            logger.warning("%s: %s", ref.url, error)
        for sample in samples:
            if sample.error:
                continue
            audio, meta = None, {}
            for name, data in zip(sample.names, sample.data):
                ext = name.rsplit(".", 1)[-1].lower()
                if ext in AUDIO_EXTENSIONS and audio is None:
                    audio = data
                elif ext == "json":
                    try:
                        meta = json.loads(data)
                    except ValueError:
                        meta = {}
            if audio is not None:
                out[sample.key] = (audio, meta if isinstance(meta, dict) else {})
    return out


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1).astype(np.float32)


def load_catalog(clean_url: str, protected_url: str, storage_options: dict) -> list[CatalogItem]:
    """Clean and protected WebDataset shards matched by key; the style is the clean item's json
    `style` (else `genre`, else empty)."""
    from pipeline.io.audio import decode

    clean = _audio_members(clean_url, storage_options)
    protected = _audio_members(protected_url, storage_options)
    items = []
    for key in sorted(set(clean) & set(protected)):
        a, b = decode(clean[key][0]), decode(protected[key][0])
        if a.sample_rate != b.sample_rate:
            logger.warning("%s: clean %d Hz vs protected %d Hz; skipped", key, a.sample_rate, b.sample_rate)
            continue
        n = min(a.samples.shape[0], b.samples.shape[0])
        meta = clean[key][1]
        style = str(meta.get("style", meta.get("genre", "")))
        items.append(CatalogItem(key, style, a.sample_rate, _mono(a.samples[:n]), _mono(b.samples[:n])))
    if not items:
        raise FileNotFoundError(f"no keys in common between {clean_url} ({len(clean)}) and {protected_url}")
    return items


def add_noise_control(items: list[CatalogItem], eps: float, seed: int) -> None:
    """noise = clean + U(−ε, ε), per track seeded by key (same L∞ as the protection)."""
    for item in items:
        digest = hashlib.sha256(f"{seed}\x00{item.key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        item.noise = np.clip(item.clean + rng.uniform(-eps, eps, item.clean.shape), -1, 1).astype(np.float32)
