"""The `service` bench section: selectable with --parts (opt-in, not in the default run), and its
table carries the levels and the ratio."""

from __future__ import annotations

import pytest

from pipeline.bench.runner import build_parser, settings_from_args
from pipeline.bench.service import LevelResult, ServiceBench


def test_service_part_is_opt_in():
    settings = settings_from_args(build_parser().parse_args(["--parts", "service"]))
    assert settings.parts == ["service"]
    assert "service" not in settings_from_args(build_parser().parse_args([])).parts
    with pytest.raises(ValueError, match="servce"):
        settings_from_args(build_parser().parse_args(["--parts", "servce"]))


def test_table_has_every_level_and_the_ratio():
    bench = ServiceBench(config={}, clip_seconds=2.0, direct_items_per_s=0.5, ratio_high_to_1=1.6)
    bench.levels = [LevelResult(1, 16, 40.0, 0.4, 2.4, 2.9, 0), LevelResult(8, 16, 25.0, 0.64, 11.0, 13.5, 0)]
    table = bench.markdown()
    assert "| 1 | 16 | 40.0 | 0.400 | 2.40 | 2.90 | 0 | 0.80 |" in table
    assert "| 8 | 16 | 25.0 | 0.640 | 11.00 | 13.50 | 0 | 1.28 |" in table
    assert "1.60×" in table
