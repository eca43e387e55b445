"""Ray Data stages: the only package that imports ray. Each stage is a thin adapter over the core."""
