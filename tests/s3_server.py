"""An S3 API on loopback for the tests: moto's server in a process of its own, reached as users
reach S3, through a plain ``s3://bucket/prefix`` URI and the standard AWS environment.

The server process keeps its objects in memory while its HTTP server is stopped and started
again (`S3Server.stop`, `S3Server.start`): storage that goes down and comes back. As a script
(what the fixture runs) it reads ``stop`` / ``start`` lines on stdin and answers each on stdout.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "rhmapper-tests"
_ANSWER_SECONDS = 60.0


class S3Server:
    """moto's server on 127.0.0.1 in a subprocess, stopped and started on demand, ended by its
    handle."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.endpoint = f"http://127.0.0.1:{self._answer()}"

    def stop(self) -> None:
        """Stop serving (requests fail to connect); the objects stay."""
        self._tell("stop")

    def start(self) -> None:
        """Serve again, on the same port, the same objects."""
        self._tell("start")

    def end(self) -> None:
        """End the server process."""
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def _tell(self, command: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        answer = self._answer()
        assert answer == command, f"the S3 server answered {answer!r} to {command!r}"

    def _answer(self) -> str:
        """The server's next line, waited for at most `_ANSWER_SECONDS`."""
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], _ANSWER_SECONDS)
        if not ready:
            raise TimeoutError(f"the S3 server said nothing in {_ANSWER_SECONDS} s")
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 server exited with {self._process.wait(timeout=10)}")
        return line.strip()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's S3 server, with the AWS environment pointing at it and bucket `BUCKET`
    created; the environment is restored and the server ended after the session."""
    server = S3Server()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_ENDPOINT_URL", server.endpoint)
            patch.setenv("AWS_ACCESS_KEY_ID", "testing")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            import pyarrow.fs

            filesystem, _ = pyarrow.fs.FileSystem.from_uri(
                f"s3://{BUCKET}?allow_bucket_creation=true")
            filesystem.create_dir(BUCKET)
            yield server
    finally:
        server.end()


@pytest.fixture
def s3_uri(s3_server: S3Server) -> Iterator[str]:
    """A fresh ``s3://`` prefix for one test; after it, the server is serving again and the
    prefix is deleted."""
    import pyarrow.fs

    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    yield uri
    s3_server.start()
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.delete_dir_contents(path, missing_dir_ok=True)


def _serve() -> None:
    """The server process: serve on a free port, stop and start as told on stdin."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    serving = True
    print(port, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stop" and serving:
            server.stop()
            serving = False
        elif command == "start" and not serving:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            serving = True
        print(command, flush=True)


if __name__ == "__main__":
    _serve()
