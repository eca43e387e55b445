"""Without the evaluation extra, the commands that need it say how to install it."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from pipeline.evaluation.extra import INSTALL_HINT, EvalExtraMissing, require


def test_require_names_the_extra() -> None:
    with pytest.raises(EvalExtraMissing, match=r"unlearnable report needs the evaluation extra: pip install"):
        require("no_such_library_for_the_test", "unlearnable report")
    assert "music-unlearnable[eval]" in INSTALL_HINT


def test_report_figure_without_matplotlib(monkeypatch) -> None:
    from pipeline.evaluation.report.figures import delta_e_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(EvalExtraMissing, match=r"matplotlib is not installed"):
        delta_e_figure(np.array([0.6]), np.array([0.5]), 0.5)


def test_imitate_without_diffusers(monkeypatch, capsys, tmp_path) -> None:
    run = importlib.import_module("pipeline.evaluation.imitation.run")  # the module (the package exports run())
    real = run.importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert run.main(["--make-catalog", "1", "--out", str(tmp_path / "x")]) == 1
    assert INSTALL_HINT in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
