"""Agents and the CLI as real processes: `opnsense-ha serve` on loopback, `opnsense-ha ...` commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from support.paths import PACKAGE_ROOT


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(PACKAGE_ROOT)
    out["OPNSENSE_HA_FAILOVER"] = "none"
    return out

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

def start_agent(conf_dir: Path, *extra: str, port: int | None = None) -> tuple[subprocess.Popen[str], str]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hasync", "--conf-dir", str(conf_dir), "serve", "--listen", f"127.0.0.1:{port}",
         "--allow-loopback", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"agent did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.strip().split("listening on ", 1)[1]

def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)

def cli(conf_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hasync", "--conf-dir", str(conf_dir), *args],
                          capture_output=True, text=True, env=env(), timeout=120)
