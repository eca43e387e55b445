"""Encoder specs (`random:…`, `AMODEL@URL`, `hf:URL`) and fetching checkpoint files: any fsspec URL
or hf://, cached once, sha256 pin enforced."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.encoders.base import CheckpointError


@dataclass(frozen=True)
class CheckpointSpec:
    """A parsed encoder spec: which backend, which weights.

    Forms (laion = laion-clap HTSAT checkpoints, hf = transformers `ClapModel`/`ClapAudioModelWithProjection`):

        random:HTSAT-tiny:0            random laion-clap weights (also random:laion:HTSAT-base:0)
        random:hf:tiny:0               random transformers CLAP audio tower (presets tiny, base)
        /models/clap.pt, s3://..., https://..., hf://org/repo/file.pt, laion:<any of these>
                                       a laion-clap checkpoint file (architecture from encoder.amodel)
        hf:org/repo, hf:/local/folder, hf:s3://bucket/folder
                                       a transformers CLAP folder (save_pretrained layout)

    Example::

        CheckpointSpec.parse("random:HTSAT-tiny:0").backend   # "laion"
        CheckpointSpec.parse("hf:/models/musicldm/text_encoder").backend   # "hf"
    """

    backend: str  # laion | hf
    amodel: str  # laion architecture (HTSAT-tiny, HTSAT-base) or hf preset (tiny, base)
    url: str | None = None  # None for random weights
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.url is None

    @classmethod
    def parse(cls, spec: str, amodel: str = "HTSAT-base") -> CheckpointSpec:
        if not spec:
            raise CheckpointError("encoder.checkpoint is empty")
        if spec.startswith("random:"):
            parts = spec.split(":")[1:]
            if len(parts) == 2:
                parts = ["laion", *parts]
            if len(parts) != 3 or parts[0] not in ("laion", "hf") or not parts[2].lstrip("-").isdigit():
                raise CheckpointError(
                    f"random encoder spec must be random:AMODEL:SEED or random:laion|hf:AMODEL:SEED, got {spec!r}"
                )
            return cls(backend=parts[0], amodel=parts[1], url=None, seed=int(parts[2]))
        if spec.startswith("hf:") and not spec.startswith("hf://"):
            return cls(backend="hf", amodel="hf", url=spec[len("hf:") :])
        return cls(backend="laion", amodel=amodel, url=spec.removeprefix("laion:"))

    def __str__(self) -> str:
        if self.is_random:
            return (
                f"random:{self.backend}:{self.amodel}:{self.seed}"
                if self.backend == "hf"
                else (f"random:{self.amodel}:{self.seed}")
            )
        return f"hf:{self.url}" if self.backend == "hf" else f"{self.amodel}@{self.url}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(
    url: str,
    cache_dir: str,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Return a local path for `url` (local path, s3://, https://, hf://org/repo/file, any fsspec
    URL), downloading remote files once into `cache_dir`. Enforces the sha256 pin when given."""
    import fsspec

    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://")).expanduser()
        if not local.is_file():
            raise CheckpointError(f"checkpoint file not found: {local}")
    else:
        if url.startswith("hf://") and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointError(f"{url}: hf:// needs the hub, but HF_HUB_OFFLINE=1 (set encoder.hub_offline=false)")
        cache = Path(cache_dir).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        name = url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint.pt"
        local = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
        if not local.is_file() or (sha256 and file_sha256(local) != sha256.lower()):
            options = dict(storage_options or {}) if url.startswith("s3://") else {}
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".partial-")
            try:
                with os.fdopen(fd, "wb") as out, fsspec.open(url, "rb", **options) as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
                os.replace(tmp, local)
            except Exception as exc:
                Path(tmp).unlink(missing_ok=True)
                raise CheckpointError(f"cannot fetch checkpoint {url}: {type(exc).__name__}: {exc}") from exc
    if sha256:
        actual = file_sha256(local)
        if actual != sha256.lower():
            raise CheckpointError(f"checkpoint {url} has sha256 {actual}, but the pin is {sha256}")
    return local
