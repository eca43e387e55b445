"""Frozen CLAP audio encoders: laion-clap HTSAT (laion.py) and transformers ClapModel (hf.py), what
they share (base.py), checkpoint specs and fetching (checkpoints.py), and building one from a config
(load.py, the only module importing both backends)."""
