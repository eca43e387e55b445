"""Long tracks as segment rows: split in the read stage, crossfaded back in the writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.io.audio import quantize_within
from pipeline.stages import rows as R
from pipeline.stages.segments import assemble, is_segment, segment_plan, split_rows

RATE = 8000
EPS = 0.003


def _row(samples: np.ndarray) -> dict:
    return {
        R.KEY: "long",
        R.STATUS: "ok",
        R.ERROR: "",
        R.KIND: R.KIND_SAMPLE,
        R.MEMBER_NAMES: ["long.flac", "long.json"],
        R.MEMBER_DATA: [b"original audio bytes", b'{"title": "x"}'],
        R.AUDIO_MEMBER: 0,
        R.N_SAMPLES: samples.shape[0],
        R.CHANNELS: samples.shape[1],
        R.SAMPLE_RATE: RATE,
        R.OUT_SUBTYPE: "PCM_16",
        R.SEGMENT: 0,
        R.SEGMENTS: 1,
        R.SEGMENT_START: 0,
        R.TRACK_SAMPLES: samples.shape[0],
    }


def _protect_segment(row: dict, sign: float, seed: int) -> dict:
    """Stand-in for the actor: δ = ±ε·u on the PCM_16 grid, plus per-segment figures."""
    clean = np.frombuffer(row[R.PCM], dtype=np.float32).reshape(row[R.N_SAMPLES], row[R.CHANNELS])
    rng = np.random.default_rng(seed)
    proposed = clean + sign * EPS * rng.uniform(0.5, 1.0, clean.shape).astype(np.float32)
    protected = quantize_within(clean, proposed, EPS, "PCM_16")
    windows = 1 + row[R.N_SAMPLES] // RATE
    return {
        **row,
        R.CLEAN_PCM: row[R.PCM],
        R.PCM: protected.tobytes(),
        "n_windows": windows,
        "delta_e_mean": 0.1 * (seed + 1),
        "delta_e_min": 0.05 * (seed + 1),
        "cos_mean": 0.9,
        "delta_e_musicldm": float("nan"),
        "mask_energy_above": 0.2,
        "nmr_db": -3.0,
        "capped_share": 0.0,
        "objective": 0.1 * (seed + 1),
        "steps_mean": 4.0,
        "seconds": 1.5,
        "segsnr_db": 30.0 + seed,
        "pesq_wb": float("nan"),
        "stoi": 0.99,
        R.DELTA_E_BY_ENCODER: json.dumps({"enc": 0.1 * (seed + 1)}),
        # ViSQOL: segment 0 scored two excerpts, segment 1 none, segment 2 one.
        "visqol_moslqo": {0: 4.2, 2: 3.9}.get(seed, float("nan")),
        R.VISQOL_MEASURED: seed in (0, 2),
        R.VISQOL_STARTS: json.dumps({0: [1.0, 6.0], 2: [19.0]}.get(seed, [])),
        R.VISQOL_SCORES: json.dumps({0: [4.5, 4.2], 2: [3.9]}.get(seed, [])),
    }


@pytest.fixture
def track() -> np.ndarray:
    rng = np.random.default_rng(0)
    samples = rng.uniform(-0.5, 0.5, (RATE * 25 + 123, 2))
    return np.round(samples * 32768).astype(np.float32) / 32768  # on the PCM_16 grid


def test_plan_covers_track_with_overlapping_segments(track):
    plan = segment_plan(track.shape[0], RATE, segment_seconds=10, overlap_seconds=1)
    assert len(plan.starts) == 3
    assert plan.starts[0] == 0 and plan.starts[-1] + plan.lengths[-1] == track.shape[0]
    short = segment_plan(RATE * 5, RATE, segment_seconds=10, overlap_seconds=1)
    assert short.starts == (0,)


def test_split_rows_carry_segments_and_no_audio_bytes(track):
    plan = segment_plan(track.shape[0], RATE, 10, 1)
    rows = split_rows(_row(track), track, plan)
    assert [r[R.SEGMENT] for r in rows] == [0, 1, 2] and all(r[R.SEGMENTS] == 3 for r in rows)
    assert all(is_segment(r) for r in rows) and not is_segment(_row(track))
    for r in rows:
        pcm = np.frombuffer(r[R.PCM], dtype=np.float32).reshape(r[R.N_SAMPLES], 2)
        np.testing.assert_array_equal(pcm, track[r[R.SEGMENT_START] : r[R.SEGMENT_START] + r[R.N_SAMPLES]])
        assert r[R.MEMBER_DATA][0] == b""  # the long audio's bytes never ride through the actor
    assert rows[0][R.MEMBER_DATA][1] == b'{"title": "x"}' and rows[1][R.MEMBER_DATA][1] == b""


def test_assemble_keeps_the_bound_the_grid_and_each_segments_delta(track):
    plan = segment_plan(track.shape[0], RATE, 10, 1)
    # Opposite signs in neighbouring segments: the crossfade must still stay within ε.
    segments = split_rows(_row(track), track, plan)
    protected = [_protect_segment(r, sign=(-1) ** i, seed=i) for i, r in enumerate(segments)]
    out = assemble(list(reversed(protected)), EPS)  # arrival order does not matter
    assert out[R.SEGMENTS] == 1 and out[R.N_SAMPLES] == track.shape[0] and out[R.STATUS] == "ok"
    result = np.frombuffer(out[R.PCM], dtype=np.float32).reshape(track.shape)
    clean = np.frombuffer(out[R.CLEAN_PCM], dtype=np.float32).reshape(track.shape)
    np.testing.assert_array_equal(clean, track)
    delta = result.astype(np.float64) - track
    assert np.abs(delta).max() <= EPS + 1e-7
    np.testing.assert_array_equal(np.rint(result * 32768), result * 32768)  # on the PCM_16 grid
    # Outside the crossfades each segment's protected samples are kept exactly.
    first = np.frombuffer(protected[0][R.PCM], dtype=np.float32).reshape(-1, 2)
    np.testing.assert_array_equal(result[: plan.starts[1]], first[: plan.starts[1]])
    assert (delta[: plan.starts[1]] > 0).all() and (delta[plan.starts[1] + RATE : plan.starts[2]] < 0).all()
    # Figures: sums, minima and weighted means of the segments' figures; L∞ measured again.
    assert out["n_windows"] == sum(p["n_windows"] for p in protected)
    assert out["delta_e_min"] == pytest.approx(0.05)
    assert out["seconds"] == pytest.approx(4.5)
    weights = np.array([p["n_windows"] for p in protected], dtype=float)
    assert out["delta_e_mean"] == pytest.approx(float(np.dot(weights, [0.1, 0.2, 0.3]) / weights.sum()))
    assert json.loads(out[R.DELTA_E_BY_ENCODER])["enc"] == pytest.approx(out["delta_e_mean"])
    assert np.isnan(out["pesq_wb"]) and out["stoi"] == pytest.approx(0.99)
    # ViSQOL: the worst scored excerpt over the segments, measured if any was, excerpts in track order.
    assert out["visqol_moslqo"] == pytest.approx(3.9) and out[R.VISQOL_MEASURED]
    assert R.visqol_lists(out) == ([1.0, 6.0, 19.0], [4.5, 4.2, 3.9])
    assert out["linf"] == pytest.approx(float(np.abs(delta).max()))


def test_visqol_merge_of_unmeasured_segments_is_nan_and_unmeasured():
    from pipeline.stages.segments import combine_visqol

    unmeasured = {"visqol_moslqo": float("nan"), R.VISQOL_MEASURED: False, R.VISQOL_STARTS: "[]", R.VISQOL_SCORES: "[]"}
    out = combine_visqol([unmeasured, dict(unmeasured), {}])  # {}: a row from before the quality stage
    assert np.isnan(out["visqol_moslqo"]) and not out[R.VISQOL_MEASURED] and R.visqol_lists(out) == ([], [])


def test_a_failed_segment_fails_the_track_with_its_message(track):
    plan = segment_plan(track.shape[0], RATE, 10, 1)
    protected = [_protect_segment(r, 1.0, i) for i, r in enumerate(split_rows(_row(track), track, plan))]
    protected[1] = {**protected[1], R.STATUS: "error", R.ERROR: "pgd: RuntimeError: boom"}
    out = assemble(protected, EPS)
    assert out[R.STATUS] == "error"
    assert out[R.ERROR] == "pgd: RuntimeError: boom (segment 2/3)"
    assert out[R.PCM] == b""


def _long_shard(folder, skipped: bool = False):
    from tests.factories import audio_bytes, write_shard

    extra = [("skipped.wav", audio_bytes(1.5, 16000, 1, "WAV", "PCM_16", seed=7))] if skipped else []
    return write_shard(
        folder / "long.tar",
        [
            ("long.flac", audio_bytes(13.0, 16000, 2, "FLAC", "PCM_16", seed=5)),
            ("long.json", b'{"title": "long"}'),
            ("short.wav", audio_bytes(1.0, 16000, 1, "WAV", "PCM_16", seed=6)),
            *extra,
        ],
    )


def test_read_stage_splits_and_writer_passes_a_failed_long_track_through(tmp_path):
    """Every segment of the long track fails (as if its actor died): the writer fetches the
    original bytes from the input shard again, so passthrough writes them unchanged."""
    from pipeline.stages.read import ReadSettings, read_shard
    from pipeline.stages.write import ShardWriter, WriteSettings, encode_batch
    from tests.factories import read_members

    shard = _long_shard(tmp_path / "in")
    settings = ReadSettings(("flac", "wav"), 1 << 30, {}, segment_seconds=5.0, overlap_seconds=0.5)
    rows = list(read_shard({R.SHARD_ID: "long", R.SHARD_URL: str(shard)}, settings))
    long_rows = [r for r in rows if r[R.KEY] == "long"]
    assert [r[R.SEGMENT] for r in long_rows] == [0, 1, 2] and all(r[R.SHARD_ITEMS] == 4 for r in rows)
    assert {r[R.INDEX] for r in long_rows} == {0}
    for r in rows:
        r.update({R.CLEAN_PCM: r[R.PCM], R.STATUS: "error", R.ERROR: "pgd: RuntimeError: actor lost"})
        r.update({name: float("nan") for name in R.STATS} | {R.DELTA_E_BY_ENCODER: "{}", R.ENCODER_ID: "x"})
    batch = encode_batch(R.rows_to_batch(rows, list(rows[0])))
    writer = ShardWriter(WriteSettings(str(tmp_path / "out"), {}, "passthrough", "abc", 0.5, eps=EPS))
    summary = writer(batch)
    assert summary["failed"] == [""] and summary["items"] == [2] and summary["error"] == [2]
    original, written = read_members(shard), read_members(tmp_path / "out" / "long.tar")
    assert written == original
    import pyarrow.parquet as pq

    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "long.parquet").to_pylist()}
    assert manifest["long"]["error"] == "pgd: RuntimeError: actor lost (segment 1/3)"


@pytest.mark.slow
def test_pipeline_protects_a_long_track_as_segments(tmp_path, ray_session):
    import pyarrow.parquet as pq

    from pipeline.config import config_from_dict
    from pipeline.core.quality import visqol_selected
    from pipeline.io.audio import decode
    from pipeline.stages.pipeline import run
    from tests.factories import read_members

    shard = _long_shard(tmp_path / "in", skipped=True)
    # ViSQOL on a hash sample of half the items: "long" and "short" are in it, "skipped" is not.
    assert [visqol_selected(k, "sample", 0.5) for k in ("long", "short", "skipped")] == [True, True, False]
    visqol = {"visqol": "sample", "visqol_share": 0.5, "visqol_excerpt_seconds": 3.0, "visqol_excerpts": 3}
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
            "attack": {"eps": EPS, "steps": 1, "precision": "fp32"},
            "audio": {"window_seconds": 2.0, "overlap_seconds": 0.5, "segment_seconds": 5.0},
            "quality": {"pesq": False, "stoi": False, **visqol},
            "runtime": {"tracks_per_call": 2, "batch_windows": 4, "progress": False, "torch_threads": 2},
        }
    )
    summary = run(cfg)
    assert (summary.this_run.items, summary.this_run.ok, summary.this_run.error) == (3, 3, 0)
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "long.parquet").to_pylist()}
    # 13 s in segments of 5 s (starts 0, 4.5, 8 s), each 3 windows of 2 s.
    assert manifest["long"]["n_windows"] == 9 and manifest["short"]["n_windows"] == 1
    assert manifest["long"]["eps_bound_holds"] and manifest["long"]["linf_written"] <= EPS + 2**-15
    assert manifest["long"]["delta_e_mean"] > 0 and manifest["long"]["duration_s"] == pytest.approx(13.0)
    original, written = read_members(shard), read_members(tmp_path / "out" / "long.tar")
    assert set(written) == set(original) and written["long.json"] == original["long.json"]
    clean, protected = decode(original["long.flac"]), decode(written["long.flac"])
    assert protected.samples.shape == clean.samples.shape
    delta = protected.samples.astype(np.float64) - clean.samples
    assert 0 < np.abs(delta).max() <= EPS + 1e-7
    assert np.abs(delta[8 * 16000 :]).max() > 0  # the last segment was protected too

    # ViSQOL: three 3 s excerpts spread over the 13 s track, each measured by the segment holding
    # it (segments start at 0, 4.5 and 8 s); the track's figure is the worst of them.
    long, short, skipped = manifest["long"], manifest["short"], manifest["skipped"]
    assert long["visqol_measured"] and long["visqol_excerpt_starts_s"] == pytest.approx([10 / 6, 5.0, 50 / 6], abs=1e-4)
    assert len(long["visqol_excerpt_moslqo"]) == 3 and long["visqol_moslqo"] == min(long["visqol_excerpt_moslqo"])
    assert 1.0 <= long["visqol_moslqo"] <= 4.74
    assert short["visqol_measured"] and short["visqol_excerpt_starts_s"] == [0.0]  # 1 s: the whole item
    assert 1.0 <= short["visqol_moslqo"] <= 4.74
    assert not skipped["visqol_measured"] and np.isnan(skipped["visqol_moslqo"])
    assert skipped["visqol_excerpt_starts_s"] == [] and np.isfinite(skipped["segsnr_db"])
