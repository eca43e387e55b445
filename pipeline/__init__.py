"""Music Unlearnable: protect music catalogs from CLAP-conditioned diffusion models.

Public entry points: `unlearnable` (pipeline.cli), `load_config` (pipeline.config), the PGD core
`pgd` (pipeline.core.engine) and `TrackProtector` (pipeline.core.protect). See docs/architecture.md.
"""

__version__ = "0.1.0"
