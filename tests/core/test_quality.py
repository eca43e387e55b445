"""ViSQOL v3 (audio mode) in the manifest: the real measure (visqol-python, no mocks) on short
synthetic music, the hash sample of items, excerpts over a track and its segments, the quality
stage on real read-stage rows, and the manifest columns through Parquet and back."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.quality import (
    VISQOL_MIN_SECONDS,
    visqol_excerpts,
    visqol_figure,
    visqol_moslqo,
    visqol_owned_excerpts,
    visqol_selected,
)
from pipeline.demo import synthesize
from pipeline.records import MANIFEST_SCHEMA, ManifestRow, SampleStatus, manifest_table
from pipeline.stages import rows as R
from pipeline.stages.segments import segment_plan

RATE = 44_100
CEILING = 4.732  # ViSQOL v3 audio mode scores an identical copy 4.73


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """3 s of the demo's synthetic stereo music at 44.1 kHz, float32 [samples, 2]."""
    return synthesize(3.0, RATE, 2, tempo_bpm=120, root_hz=220.0, seed=3)


def _noised(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    noise *= np.sqrt(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2)) * 10 ** (-snr_db / 20)
    return (x + noise).astype(np.float32)


def test_visqol_scores_an_identical_copy_at_the_ceiling_and_noise_lower(clip):
    assert visqol_moslqo(clip, clip.copy(), RATE) == pytest.approx(CEILING, abs=0.01)
    light, heavy = visqol_moslqo(clip, _noised(clip, 50, 1), RATE), visqol_moslqo(clip, _noised(clip, 20, 2), RATE)
    assert 1.0 <= heavy < 3.0 and heavy < light < CEILING - 0.5


def test_visqol_is_nan_where_it_cannot_score(clip):
    short = clip[: int(0.9 * RATE)]
    assert VISQOL_MIN_SECONDS == 1.0 and np.isnan(visqol_moslqo(short, short, RATE))
    silence = np.zeros_like(clip)
    assert np.isnan(visqol_moslqo(silence, clip, RATE))
    assert np.isnan(visqol_moslqo(clip, clip[:-1], RATE))  # shapes differ


def test_sample_is_a_hash_of_the_key_deterministic_and_about_the_share():
    keys = [f"k{i}" for i in range(40)]
    # Pinned: the choice is SHA-256 of the key, the same in every process, run and Python version.
    assert [k for k in keys if visqol_selected(k, "sample", 0.25)] == ["k2", "k5", "k9", "k10", "k13", "k38", "k39"]
    many = [f"shard-{i // 200:04d}/track-{i:06d}" for i in range(20_000)]
    for share in (0.02, 0.1, 0.5):
        chosen = sum(visqol_selected(k, "sample", share) for k in many)
        assert abs(chosen / len(many) - share) < 4 * np.sqrt(share * (1 - share) / len(many)), share
    # A larger share keeps every item a smaller one chose (a threshold on one hash value).
    assert all(visqol_selected(k, "sample", 0.5) for k in many if visqol_selected(k, "sample", 0.1))
    assert all(visqol_selected(k, "all", 0.1) for k in keys) and not any(visqol_selected(k, "off", 1.0) for k in keys)


def test_excerpts_are_spread_evenly_or_the_whole_item():
    rate = 1000
    assert visqol_excerpts(30 * rate, rate, 10, 1) == [(10 * rate, 10 * rate)]  # the middle
    assert visqol_excerpts(40 * rate, rate, 10, 3) == [(s * rate, 10 * rate) for s in (5, 15, 25)]
    assert visqol_excerpts(4 * rate, rate, 10, 3) == [(0, 4 * rate)]  # shorter than one excerpt
    assert visqol_excerpts(10 * rate + 1, rate, 10, 3) == [(0, 10 * rate), (1, 10 * rate)]  # coinciding kept once


@pytest.mark.parametrize("count", [1, 2, 5, 9])
def test_each_excerpt_of_a_long_track_is_measured_by_exactly_one_segment(count):
    rate, seconds = 1000, 200
    n = seconds * rate
    plan = segment_plan(n, rate, segment_seconds=60, overlap_seconds=1)
    track = visqol_excerpts(n, rate, 10, count)
    owned = {s: visqol_owned_excerpts(n, s, plan.window, plan.starts, rate, 10, count) for s in plan.starts}
    assert sum(len(v) for v in owned.values()) == len(track)
    for segment_start, excerpts in owned.items():
        for start, length in excerpts:
            assert length == 10 * rate and segment_start <= start and start + length <= segment_start + plan.window
    # Where a segment holds an excerpt whole, the excerpt is not moved.
    moved = sorted(e for v in owned.values() for e in v)
    assert sum(a != b for a, b in zip(moved, track)) <= len(plan.starts) - 1
    # One segment (a short track): its excerpts unchanged.
    assert visqol_owned_excerpts(n, 0, n, (0,), rate, 10, count) == track


def test_visqol_figure_is_the_worst_excerpt(clip):
    y = clip.copy()
    y[RATE * 2 :] = _noised(clip[RATE * 2 :], 20, 3)  # only the last second is damaged
    figure = visqol_figure(clip, y, RATE, [(0, RATE), (2 * RATE, RATE)], offset=0)
    assert figure.measured and figure.starts_s == (0.0, 2.0)
    assert figure.scores[0] == pytest.approx(CEILING, abs=0.01) and figure.scores[1] < 3.0
    assert figure.moslqo == min(figure.scores)
    # Offsets: the arrays start 10 s into the track; an excerpt ViSQOL cannot score is left out.
    shifted = visqol_figure(clip, y, RATE, [(10 * RATE, RATE), (12 * RATE + RATE // 2, RATE // 2)], offset=10 * RATE)
    assert shifted.starts_s == (10.0,) and shifted.moslqo == pytest.approx(CEILING, abs=0.01)
    assert not visqol_figure(clip, y, RATE, [], 0).measured and np.isnan(visqol_figure(clip, y, RATE, [], 0).moslqo)


def _quality_rows(tmp_path):
    """Real read-stage rows, 'protected' by a stand-in (+ small noise), as the quality stage gets them."""
    from pipeline.stages.read import ReadSettings, read_shard
    from tests.factories import audio_bytes, write_shard

    shard = write_shard(
        tmp_path / "s.tar",
        [
            ("long.wav", audio_bytes(2.5, 16_000, 1, seed=1)),  # selected at share 0.5
            ("skipped.wav", audio_bytes(1.5, 16_000, 1, seed=2)),  # not selected at share 0.5
            ("bad.wav", b"not audio"),
        ],
    )
    settings = ReadSettings(("wav",), 1 << 30, {})
    rows = list(read_shard({R.SHARD_ID: "s", R.SHARD_URL: str(shard)}, settings))
    for row in rows:
        for name in R.STATS:
            row[name] = float("nan")
        if row[R.STATUS] == "ok":
            clean = np.frombuffer(row[R.PCM], dtype=np.float32)
            row[R.CLEAN_PCM] = row[R.PCM]
            delta = np.float32(1e-4) * np.sign(np.sin(np.arange(clean.size)))
            row[R.PCM] = (clean + delta).astype(np.float32).tobytes()
    return rows


def test_quality_stage_fills_visqol_for_the_sample_only(tmp_path):
    from pipeline.stages.quality import QualitySettings, quality_batch

    assert visqol_selected("long", "sample", 0.5) and not visqol_selected("skipped", "sample", 0.5)
    rows = _quality_rows(tmp_path)
    settings = QualitySettings(segsnr=True, pesq=False, stoi=False, visqol="sample", visqol_share=0.5,
                               visqol_excerpt_seconds=1.0, visqol_excerpts=2)  # fmt: skip
    out = {r[R.KEY]: r for r in R.batch_to_rows(quality_batch(R.rows_to_batch(rows, list(rows[0])), settings))}
    long, skipped, bad = out["long"], out["skipped"], out["bad"]
    starts, scores = R.visqol_lists(long)
    assert long[R.VISQOL_MEASURED] and starts == [0.375, 1.125]  # 2 × 1 s spread over 2.5 s
    assert len(scores) == 2 and long["visqol_moslqo"] == min(scores) and 1.0 <= min(scores) <= CEILING
    for row in (skipped, bad):
        assert np.isnan(row["visqol_moslqo"]) and not row[R.VISQOL_MEASURED] and R.visqol_lists(row) == ([], [])
    assert np.isfinite(skipped["segsnr_db"])  # the cheap figures still cover every item
    # Off: nobody, whatever the share.
    off = QualitySettings(segsnr=False, pesq=False, stoi=False, visqol="off", visqol_share=1.0)
    again = R.batch_to_rows(quality_batch(R.rows_to_batch(rows, list(rows[0])), off))
    assert not any(r[R.VISQOL_MEASURED] for r in again)


def test_manifest_round_trip_keeps_the_visqol_columns(tmp_path):
    rows = [
        ManifestRow(
            key="m",
            status=SampleStatus.OK,
            visqol_moslqo=4.41,
            visqol_measured=True,
            visqol_excerpt_starts_s=[12.5, 70.0],
            visqol_excerpt_moslqo=[4.41, 4.6],
        ),
        ManifestRow(key="n", status=SampleStatus.OK),
    ]
    table = manifest_table(rows)
    assert table.schema == MANIFEST_SCHEMA
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    back = [ManifestRow.from_dict(d) for d in pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist()]
    assert back[0].visqol_measured and back[0].visqol_excerpt_starts_s == [12.5, 70.0]
    assert back[0].visqol_excerpt_moslqo == [4.41, 4.6] and back[0].visqol_moslqo == pytest.approx(4.41)
    assert not back[1].visqol_measured and np.isnan(back[1].visqol_moslqo) and back[1].visqol_excerpt_starts_s == []
    assert json.loads(json.dumps(back[0].to_dict()))["visqol_excerpt_moslqo"] == [4.41, 4.6]
