"""Entrypoints a cluster runs (RayJob `entrypoint:`); thin wrappers over `pipeline.cli`."""
