"""Transfer matrix: Δe of a protected run measured with the encoder that optimised δ and another."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.evaluation.transfer import main


def test_transfer_measures_with_every_listed_encoder(protected_run, tmp_path: Path, capsys) -> None:
    clean, protected = protected_run
    out = tmp_path / "transfer"
    argv = ["--protected", str(protected), "--clean", str(clean), "--count", "1", "--out", str(out)]
    argv += ["--encoders", "random:HTSAT-tiny:0,random:HTSAT-tiny:1", "--set", "encoder.device=cpu"]
    assert main(argv) == 0
    rows = pq.read_table(out / "transfer.parquet").to_pylist()
    assert {r["measured_on"] for r in rows} == {"random:HTSAT-tiny:0", "random:HTSAT-tiny:1"}
    assert len(rows) == 2 and all(r["delta_e"] > 0 for r in rows)
    text = (out / "transfer.md").read_text()
    assert text.startswith("RANDOM CLAP WEIGHTS") and "| median Δe |" in text
    assert text in capsys.readouterr().out + "\n"
