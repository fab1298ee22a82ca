"""A driver script in its own process, for tests that stop clusters (or the driver) mid-map.

Every wait is bounded, so a driver that hangs fails its test with what it printed instead of
running into pytest-timeout (whose thread method exits pytest without running any fixture's
teardown, which would leave the test's Ray heads running). stdout is read by a thread, line by
line; stderr goes to a file, so a chatty driver can never block on a full pipe.

Example:
    >>> driver = DriverProcess("print('READY', flush=True); print(6 * 7)", env=None)
    >>> driver.next_line(timeout=60)
    'READY'
    >>> driver.finish(timeout=60)
    '42'
"""

from __future__ import annotations

import queue
import subprocess
import sys
import tempfile
import textwrap
import threading


class DriverProcess:
    """``python -c script *args`` with ``env`` (None: this process's); see the module docstring."""

    def __init__(self, script: str, env: dict[str, str] | None, *args: str) -> None:
        self._stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args], env=env,
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._printed: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def output(self) -> str:
        """What the driver printed so far, stdout then stderr."""
        self._stderr.seek(0)
        return "\n".join(self._printed) + "\n--- stderr ---\n" + self._stderr.read()

    def next_line(self, timeout: float) -> str:
        """The driver's next line on stdout; fails the test if none comes within ``timeout``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"the driver printed no line in {timeout}s:\n{self.output()}")
        if line is None:
            self.process.wait(timeout=30)
            raise AssertionError(f"the driver exited ({self.process.returncode}) before printing "
                                 f"a line:\n{self.output()}")
        self._printed.append(line)
        return line

    def finish(self, timeout: float) -> str:
        """Wait for the driver to exit with 0 and return its last stdout line."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the driver did not end in {timeout}s:\n{self.output()}")
        while (line := self._lines.get(timeout=30)) is not None:
            self._printed.append(line)
        assert self.process.returncode == 0, self.output()
        assert self._printed, f"the driver printed nothing:\n{self.output()}"
        return self._printed[-1]

    def kill(self) -> None:
        """SIGKILL the driver (no clean-up of any kind in it) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
