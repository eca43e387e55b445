"""Evaluation commands, outside the protect path: quality frontier, robustness to an attacker's
preprocessing, transfer across encoders, the imitation test and the HTML report. Their heavy
libraries (diffusers, librosa, matplotlib) come with the `[eval]` extra."""
