"""A child process whose output goes to a log file: what the demo and the fleet benchmark run their robots and
clouds as. Said in one place: how a child that died is reported (its last log lines), how a parent waits for a
line it prints, and how it is stopped (SIGINT for a clean shutdown, then SIGKILL)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cdcca.errors import CdccaError


class LoggedChild:
    """``python -m MODULE ARGS...`` in its own process, stdout and stderr in ``log_path``.

    Args:
        name: how errors name it (``"cloud"``, ``"worker-w0"``).
        module: the module run with ``python -m``.
        args: its arguments.
        log_path: where its output goes.
        error: the exception class :meth:`check` and :meth:`wait_for` raise.
        env: its environment (``None``: this process's).
        may_exit: an exit with code 0 before :meth:`stop` is its work done, not a failure.
    """

    def __init__(self, name: str, module: str, args: Sequence[str], log_path: Path,
                 error: type[Exception] = CdccaError, env: Mapping[str, str] | None = None,
                 may_exit: bool = False) -> None:  # fmt: skip
        self.name, self.log_path, self.error, self.may_exit = name, log_path, error, may_exit
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], stdout=self._log,
                                        stderr=subprocess.STDOUT, env=None if env is None else dict(env))  # fmt: skip
        self.stopping = False

    def tail(self, lines: int = 15) -> str:
        """Its last ``lines`` lines of output."""
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check(self) -> None:
        """Raise ``error`` with its last lines if it exited (and was not stopped, nor is allowed to)."""
        code = self.process.poll()
        if code is not None and not self.stopping and not (self.may_exit and code == 0):
            raise self.error(f"the {self.name} process exited with code {code}; last lines of {self.log_path}:\n"
                             + self.tail())  # fmt: skip

    def wait_for(self, text: str, timeout: float) -> None:
        """Wait until its output holds ``text``; ``error`` if it exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            self.check()
            if time.monotonic() > deadline:
                raise self.error(f"the {self.name} process did not report {text!r} within {timeout:.0f} s:\n"
                                 + self.tail())  # fmt: skip
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT (clean shutdown), then SIGKILL if it does not exit within ``timeout``; its exit code."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        self.stopping = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._log.close()
