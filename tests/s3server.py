"""A real S3 endpoint for tests: moto's server in a subprocess on the loopback address."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on a free loopback port: a real S3 endpoint, started and stopped at will."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the moto server did not start")
                time.sleep(0.1)

    def bucket(self) -> str:
        name = f"featx-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEYS["AWS_ACCESS_KEY_ID"],
                                 secret=KEYS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
