"""`unlearnable frontier` end to end on a tiny generated catalog (random HTSAT-tiny, 1 PGD step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.demo import synthesize
from pipeline.evaluation.frontier import Case, default_cases, resolve_cases

CASES = """
cases:
  - label: linf-3e-3
    overrides: [attack.perceptual=linf, attack.eps=0.003]
  - label: masking-3e-3
    mode: masking
    overrides: [attack.perceptual=masking, attack.eps=0.003]
  - label: broken
    overrides: [attack.perceptual=bogus]
"""


def write_catalog(folder: Path) -> Path:
    """Two short music-like tracks (44.1 kHz and 48 kHz stereo) and a catalog.json for one of them."""
    folder.mkdir()
    sf.write(folder / "a.flac", synthesize(4.0, 44_100, 2, tempo_bpm=110, root_hz=196.0, seed=1), 44_100, "PCM_24")
    sf.write(folder / "b.flac", synthesize(4.0, 48_000, 2, tempo_bpm=130, root_hz=262.0, seed=2), 48_000, "PCM_24")
    listing = {"tracks": [{"file": "a.flac", "genre": "test", "bandwidth_hz": 9000.0, "full_band": False}]}
    (folder / "catalog.json").write_text(json.dumps(listing))
    return folder


def test_frontier_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("visqol", reason="ViSQOL (PyPI visqol-python) is not installed")
    catalog = write_catalog(tmp_path / "catalog")
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES)
    out = tmp_path / "out"
    argv = ["frontier", "--catalog", str(catalog), "--out", str(out), "--cases", str(cases), "--skip-invalid",
            "--set", "encoder.checkpoint=random:HTSAT-tiny:0", "--set", "encoder.device=cpu", "--steps", "1",
            "--excerpt-seconds", "2", "--positions", "0.5", "--workers", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "skipping invalid case 'broken'" in err and "visqol 4/4" in err

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    assert len(rows) == 4  # 2 valid cases × 2 tracks × 1 position
    assert {r["case"] for r in rows} == {"linf-3e-3", "masking-3e-3"}
    for row in rows:
        assert row["error"] == ""
        for column in ("delta_e", "delta_e_musicldm", "visqol_moslqo", "snr_db", "linf", "nmr_db"):
            assert math.isfinite(row[column]), (column, row)
        assert 1.0 <= row["visqol_moslqo"] <= 4.75
        assert row["linf"] <= 0.003 + 2**-23
        assert row["excerpt_seconds"] == pytest.approx(2.0)
    labelled = next(r for r in rows if r["track"] == "a.flac")
    assert labelled["genre"] == "test" and labelled["bandwidth_hz"] == 9000.0 and labelled["full_band"] is False

    page = (out / "frontier.md").read_text()
    assert "RANDOM ENCODER WEIGHTS" in page
    assert "| linf-3e-3 | linf | 0.003 | 2 |" in page and "| masking-3e-3 | masking |" in page
    assert "## Per track" in page and "## Band-limited vs full-band" in page
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_case_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = write_catalog(tmp_path / "catalog")
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES)
    out = tmp_path / "out"
    assert cli.main(["frontier", "--catalog", str(catalog), "--out", str(out), "--cases", str(cases)]) == 2
    err = capsys.readouterr().err
    assert "case 'broken' (attack.perceptual=bogus)" in err and "attack.perceptual must be" in err
    assert "frontier:" not in err  # no excerpt was cut, no encoder loaded
    assert not out.exists()


def test_cases_file_errors_and_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("- label: x\n  overrides: [attack.eps=0.001]\n  colour: red\n")
    assert cli.main(["frontier", "--catalog", str(tmp_path), "--out", str(tmp_path / "o"), "--cases", str(cases)]) == 2
    assert "case 'x': unknown key(s) ['colour']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unique"):
        resolve_cases([Case("x", ()), Case("x", ())], None, [], None)


def test_default_cases_are_valid() -> None:
    """The built-in sweep resolves against the current config: legacy modes full band over ε, the
    spectral mode over every strength level."""
    cases = default_cases()
    resolved = resolve_cases(cases, None, [], 5)
    assert [r.case.label for r in resolved] == [c.label for c in cases]
    eps_cases = [r for r in resolved if r.mode in ("linf", "masking")]
    assert all(r.cfg.attack.alpha == pytest.approx(r.eps / 5) for r in eps_cases)
    assert all(r.cfg.attack.passband_hz is None for r in eps_cases)
    spectral = [r for r in resolved if r.mode == "spectral"]
    assert sorted(r.cfg.attack.strength for r in spectral) == [1, 2, 3, 4, 5]
    assert all(r.cfg.attack.steps == 5 for r in resolved)
