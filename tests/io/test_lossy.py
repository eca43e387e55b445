"""Lossy inputs and outputs, with the real ffmpeg (no mocks): `audio.lossy_output: flac | same`,
the L∞ measured on the written bytes decoded again, Δe after the re-encode, and the codec EOT view
(real encoder in the forward pass, identity gradient)."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.core.views import CLAP_RATE, get_view
from pipeline.demo import synthesize
from pipeline.io.audio import (
    AudioEncodeError,
    OutputFormat,
    check_written,
    codec_lag,
    decode,
    encode,
    ffmpeg_encode,
    output_format_for,
    probe_bitrate_kbps,
    quantize_within,
)
from pipeline.stages import rows as R
from pipeline.stages.read import ReadSettings, read_shard
from tests.factories import audio_bytes, read_members, write_shard

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="no ffmpeg")

EPS = 0.003
RATE = 44_100
KBPS = 96
EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")


def mp3_input(seconds: float, kbps: int = KBPS, seed: int = 1) -> bytes:
    """An MP3 member made by the ffmpeg command line itself (not the code under test), CBR `kbps`."""
    samples = synthesize(seconds, RATE, 2, tempo_bpm=120, root_hz=220.0, seed=seed)
    args = ["-v", "error", "-f", "f32le", "-ar", str(RATE), "-ac", "2", "-i", "pipe:0", "-c:a", "libmp3lame"]
    done = subprocess.run(
        ["ffmpeg", *args, "-b:a", f"{kbps}k", "-f", "mp3", "pipe:1"],
        input=samples.astype("<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    return done.stdout


def ffprobe_kbps(data: bytes) -> float:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=bit_rate", "-of", "csv=p=0", "-i", "pipe:0"],
        input=data,
        capture_output=True,
        check=True,
    )
    return float(done.stdout.decode().strip().splitlines()[0]) / 1000


# ----------------------------------------------------------------------------- format decision


def test_output_format_under_each_policy() -> None:
    assert output_format_for("MP3", "MPEG_LAYER_III", "mp3") == OutputFormat("FLAC", "PCM_16", "flac")
    same = output_format_for("MP3", "MPEG_LAYER_III", "mp3", "same", 128)
    assert same == OutputFormat("MP3", "MPEG_LAYER_III", "mp3", 128)
    assert same.lossy and same.codec.encoder == "libmp3lame" and same.label == "MP3/MPEG_LAYER_III@128kbps"
    assert output_format_for("OGG", "OPUS", "opus", "same", 64).codec.name == "opus"
    assert output_format_for("MP3", "MPEG_LAYER_III", "mp3", "same", 999).bitrate_kbps == 320  # LAME's ceiling
    # Unknown bitrate, or a lossy subtype with no encoder: FLAC whatever the policy.
    assert output_format_for("MP3", "MPEG_LAYER_III", "mp3", "same", 0).format == "FLAC"
    assert output_format_for("MP3", "MPEG_LAYER_I", "mp1", "same", 128).format == "FLAC"
    # Lossless inputs are untouched by the policy.
    assert output_format_for("WAV", "PCM_24", "wav", "same", 0) == OutputFormat("WAV", "PCM_24", "wav")
    assert not output_format_for("FLAC", "PCM_16", "flac", "same").lossy


def test_read_stage_learns_codec_and_bitrate(tmp_path: Path) -> None:
    mp3 = mp3_input(1.0)
    assert probe_bitrate_kbps(mp3, 1.0) == KBPS
    path = write_shard(tmp_path / "s.tar", [("song.mp3", mp3), ("song.json", b"{}")])
    shard = {R.SHARD_ID: "s", R.SHARD_URL: str(path)}
    for policy, expected in [("flac", ("FLAC", "PCM_16", "flac", 0)), ("same", ("MP3", "MPEG_LAYER_III", "mp3", 96))]:
        [row] = read_shard(shard, ReadSettings(EXTENSIONS, 1 << 20, {}, lossy_output=policy))
        assert row[R.STATUS] == "ok", row[R.ERROR]
        assert (row[R.OUT_FORMAT], row[R.OUT_SUBTYPE], row[R.OUT_EXT], row[R.OUT_BITRATE]) == expected


# ------------------------------------------------------------------------ encode + measurement


def test_written_check_lossless_holds_the_bound_and_lossy_reports_its_noise() -> None:
    clean = decode(mp3_input(1.5)).samples
    delta = np.random.default_rng(0).uniform(-EPS, EPS, clean.shape).astype(np.float32)
    flac = OutputFormat("FLAC", "PCM_16", "flac")
    protected = quantize_within(clean, np.clip(clean + delta, -1, 1), EPS, "PCM_16")
    check = check_written(encode(protected, RATE, flac), clean, protected, RATE, flac, EPS)
    assert check.exact and check.bound_holds and check.lag == 0
    assert check.linf <= EPS + 2**-15

    mp3 = OutputFormat("MP3", "MPEG_LAYER_III", "mp3", KBPS)
    protected = np.clip(clean + delta, -1, 1)
    data = encode(protected, RATE, mp3)
    assert data[:3] == b"ID3" or data[:2] == b"\xff\xfb"
    check = check_written(data, clean, protected, RATE, mp3, EPS)
    assert not check.exact and not check.bound_holds
    assert check.lag == 0  # the LAME header carries delay and padding: the decoder trims them
    assert math.isfinite(check.linf) and check.linf > EPS  # MP3's own noise is far above ε
    assert len(decode(data).samples) == len(clean)  # gapless: same length


def test_codec_lag_finds_a_decoder_delay_either_way() -> None:
    x = synthesize(2.0, RATE, 2, tempo_bpm=120, root_hz=220.0, seed=3)
    late = np.concatenate([np.zeros((1105, 2), np.float32), x])  # an MP3 decoded without its LAME tag
    assert codec_lag(x, late) == 1105 and codec_lag(late, x) == -1105
    assert codec_lag(x, x) == 0 and codec_lag(np.zeros_like(x), x) == 0


def test_ffmpeg_failures_are_clear_encode_errors() -> None:
    x = synthesize(0.5, RATE, 2, tempo_bpm=120, root_hz=220.0, seed=4)
    with pytest.raises(AudioEncodeError, match="timed out"):
        ffmpeg_encode(x, RATE, "mp3", 128, timeout=1e-3)
    with pytest.raises(AudioEncodeError, match=r"ffmpeg exit 1: .*encoder setup failed") as info:
        ffmpeg_encode(x, RATE, "vorbis", 9000)
    assert " 0x" not in str(info.value)  # stable messages: no object addresses
    with pytest.raises(AudioEncodeError, match="unknown lossy codec"):
        ffmpeg_encode(x, RATE, "wma", 128)


# ------------------------------------------------------------------------------- the codec view


def test_codec_view_is_the_real_codec_forward_and_identity_backward() -> None:
    view = get_view("mp3_128")
    assert get_view("opus_48") is get_view("opus_48")  # any <codec>_<kbps>, made once
    with pytest.raises(KeyError):
        get_view("mp3_999")
    clean = np.stack([synthesize(1.0, CLAP_RATE, 1, tempo_bpm=120, root_hz=r, seed=5)[:, 0] for r in (220.0, 330.0)])
    x = torch.from_numpy(clean).requires_grad_(True)
    y = view(x, None)
    assert y.shape == x.shape and y.dtype == x.dtype
    difference = (y - x).detach().abs()
    assert difference.max() > 1e-3  # the codec really ran
    assert codec_lag(clean[0][:, None], y[0].detach().numpy()[:, None]) == 0  # and is aligned
    weights = torch.randn_like(x)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)  # straight-through: ∂view/∂x = I


# --------------------------------------------------------------------------- through the pipeline


def _run(tmp_path: Path, policy: str, **attack) -> tuple[dict, dict[str, bytes]]:
    from pipeline.stages.pipeline import run

    out = tmp_path / f"out-{policy}"
    cfg = config_from_dict(
        {
            "io": {"input": str(tmp_path / "in" / "lossy.tar"), "output": str(out)},
            "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
            "attack": {"eps": EPS, "steps": 1, "precision": "fp32", **attack},
            "audio": {"window_seconds": 1.0, "overlap_seconds": 0.25, "lossy_output": policy},
            "quality": {"masking": False, "musicldm_view": False},
            "runtime": {"progress": False, "tracks_per_call": 2, "batch_windows": 4, "torch_threads": 2},
        }
    )
    summary = run(cfg)
    assert summary.processed_shards == 1 and summary.this_run.ok == 2, summary
    rows = {r["key"]: r for r in pq.read_table(out / "lossy.parquet").to_pylist()}
    return rows, read_members(out / "lossy.tar")


@pytest.mark.slow
def test_mp3_member_round_trips_under_both_policies(tmp_path: Path, ray_session) -> None:
    from pipeline.evaluation.common import Embedder

    mp3 = mp3_input(1.5)
    wav = audio_bytes(1.0, RATE, 2, seed=2)  # batches with the MP3 (same rate × channels)
    write_shard(tmp_path / "in" / "lossy.tar", [("song.mp3", mp3), ("song.json", b"{}"), ("plain.wav", wav)])
    clean = decode(mp3)

    # flac (default): the member becomes FLAC, the mapping is in the manifest, the ε bound holds.
    rows, members = _run(tmp_path, "flac")
    song = rows["song"]
    assert (song["input_member"], song["output_member"]) == ("song.mp3", "song.flac")
    assert song["output_format"] == "FLAC/PCM_16" and song["lossy_output"] is False
    assert song["eps_bound_holds"] is True and song["linf_written"] <= EPS + 2**-15
    assert song["linf"] <= EPS + 2**-15  # the pre-encoding figure is kept
    assert song["delta_e_written"] == song["delta_e_mean"]  # decoded back to exactly what was measured
    assert set(members) == {"song.flac", "song.json", "plain.wav"}
    assert decode(members["song.flac"]).format == "FLAC"
    assert rows["plain"]["eps_bound_holds"] is True and rows["plain"]["output_member"] == "plain.wav"

    # same: re-encoded as MP3 at the input's bitrate, optimised through the codec (EOT view); the
    # L∞ after encoding is reported and the ε bound is not claimed.
    rows, members = _run(tmp_path, "same", eot_views=["clean48k", "mp3_128"])
    song = rows["song"]
    assert (song["input_member"], song["output_member"]) == ("song.mp3", "song.mp3")
    assert song["output_format"] == f"MP3/MPEG_LAYER_III@{KBPS}kbps" and song["lossy_output"] is True
    assert song["eps_bound_holds"] is False
    assert math.isfinite(song["linf_written"]) and song["linf_written"] > EPS
    assert song["linf"] <= EPS + 1e-6
    assert math.isnan(song["delta_e_written"])  # no encoder in the encode stage: measured below
    assert set(members) == {"song.mp3", "song.json", "plain.wav"}
    written = decode(members["song.mp3"])
    assert written.format == "MP3" and written.sample_rate == RATE and written.channels == 2
    assert written.samples.shape[0] == clean.samples.shape[0]
    assert abs(ffprobe_kbps(members["song.mp3"]) - KBPS) <= 0.1 * KBPS
    assert rows["plain"]["lossy_output"] is False and rows["plain"]["eps_bound_holds"] is True

    # Δe after the re-encode, measured as docs/architecture.md says (the robustness Embedder: the
    # encoder on the decoded written audio against the decoded clean input).
    cfg = config_from_dict({"encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"}})
    embed = Embedder(cfg)
    e_clean = embed(clean.samples, RATE)
    delta_e_after = float((embed(written.samples, RATE) - e_clean).norm())
    assert math.isfinite(delta_e_after) and delta_e_after > 0
    print(f"Δe before encoding {song['delta_e_mean']:.4f}, after the MP3 re-encode {delta_e_after:.4f}")
