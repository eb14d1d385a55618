"""The small interfaces through which every layer touches the operating system.

Logic modules take a `CommandRunner` and a `Clock` instead of calling `subprocess` or `time`
directly, so tests swap in recorded outputs (FreeBSD `ifconfig`, `sysctl`, `pluginctl`) or a fake
kernel without patching globals, and no module needs to ask which OS it runs on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol


class CommandResult(NamedTuple):
    """What a command left: exit code and output, so callers never touch `subprocess` themselves."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandRunner(Protocol):
    def run(
        self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0
    ) -> CommandResult: ...


class SubprocessRunner:
    """Runs real commands. Secrets must travel via `input_text`, never in `argv`."""

    def run(
        self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0
    ) -> CommandResult:
        import subprocess  # here: a no-op sync runs no command, and the import costs ~1.5 ms of its start
        try:
            proc = subprocess.run(
                list(argv),
                input=input_text,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            return CommandResult(tuple(argv), 127, "", f"{argv[0]}: command not found ({exc})")
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(argv), 124, "", f"{argv[0]}: timed out after {timeout:g}s")
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
