"""Fixtures of the service tests: one UploadProtector on the session's random HTSAT-tiny, few steps."""

from __future__ import annotations

import pytest

from pipeline.api import build_protector
from pipeline.config import PipelineConfig, config_from_dict

SERVICE_CONFIG = {
    "encoder": {"checkpoint": "random:HTSAT-tiny:0", "device": "cpu"},
    "attack": {"steps": 0, "seed": 3},  # δ₀ only: the tests check the plumbing, not the attack
    "quality": {"masking": False},
}


@pytest.fixture(scope="session")
def service_cfg() -> PipelineConfig:
    return config_from_dict(SERVICE_CONFIG)


@pytest.fixture(scope="session")
def upload_protector(tiny_encoder, service_cfg):
    from pipeline.service.uploads import UploadProtector

    return UploadProtector(service_cfg, build_protector(service_cfg, [tiny_encoder]))
