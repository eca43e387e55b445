"""The method: optimisation maths (PGD, spectral attack), the masking model, CLAP windows, imitator
views, whole-track protection and quality figures. Plain torch/numpy: no Ray, no storage, no config
parsing."""
