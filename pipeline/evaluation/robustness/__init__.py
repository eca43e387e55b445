"""`unlearnable robustness`: the attack suite (attacks.py), neural purifiers from local
checkpoints (neural.py), the runner (runner.py) and its table and plot (render.py);
docs/robustness.md."""

from __future__ import annotations

from pipeline.evaluation.robustness.attacks import MUSICLDM_VIEW, QUICK, SUITE, AttackError, AttackSpec, resolve
from pipeline.evaluation.robustness.neural import NEURAL, NeuralAttacks
from pipeline.evaluation.robustness.render import plot_png, summary_table
from pipeline.evaluation.robustness.runner import (
    RobustnessRow,
    build_parser,
    cmd_robustness,
    evaluate,
    main,
    step_seconds,
)

__all__ = [
    "MUSICLDM_VIEW",
    "NEURAL",
    "QUICK",
    "SUITE",
    "AttackError",
    "AttackSpec",
    "NeuralAttacks",
    "RobustnessRow",
    "build_parser",
    "cmd_robustness",
    "evaluate",
    "main",
    "plot_png",
    "resolve",
    "step_seconds",
    "summary_table",
]
