"""What the private servers that tests start and control (RabbitMQ, etcd) share:
a temporary directory, clean-up at close() or at exit, use as a context manager."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self


class PrivateServer:
    """A server process that start() starts and kill() kills, with its files in base_dir."""

    def __init__(self, label: str, error: type[RuntimeError]) -> None:
        self.label = label
        self._error_type = error
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"fluxkv-{label}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Kill the server if it runs and delete its files; safe to call again."""
        atexit.unregister(self.close)
        try:
            if self._proc is not None:
                self.kill()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _running_process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise self._error_type(f"{self.label} is not running")
        return self._proc
