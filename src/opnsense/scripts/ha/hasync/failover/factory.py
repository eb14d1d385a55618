"""The one place that decides which failover backend this node uses.

Everything else (CLI, agent, checks) calls `get_backend(conf_dir)` and never asks which OS it is
on. The choice: `OPNSENSE_HA_FAILOVER=freebsd|keepalived|none` when set (lab, demo, tests);
otherwise FreeBSD's CARP/pfsync on FreeBSD (OPNsense) and keepalived/conntrackd elsewhere.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from hasync.config.store import ConfigStore
from hasync.config.vips import VipSpec
from hasync.core.errors import ConfigError, FailoverError
from hasync.core.fileio import atomic_write
from hasync.core.osiface import CommandRunner, SubprocessRunner
from hasync.failover.base import CarpGlobals, FailoverBackend, PfsyncConfig, PfsyncState, VipState

log = logging.getLogger(__name__)

ENV_VAR = "OPNSENSE_HA_FAILOVER"
CHOICES = ("freebsd", "keepalived", "none")
NULL_STATE_FILE = "hasync-null-failover.json"


class NullBackend(FailoverBackend):
    """For nodes without failover (the demo, a lone box): no VIPs, no state sync, no OS access.

    It still keeps CARP's counters (demotion, allow, preempt) with kernel semantics, in memory or,
    given `state_file`, in a small JSON file, so the operations layer behaves the same across
    separate CLI invocations (maintenance enter in one process, status in the next). The counter
    never resets, hence a constant boot id.
    """

    name = "none"

    def __init__(self, state_file: str | os.PathLike[str] | None = None) -> None:
        self.state_file = Path(state_file) if state_file is not None else None
        self._state: dict[str, int] = {"demotion": 0, "allow": 1, "preempt": 0}
        if self.state_file is not None:
            try:
                loaded = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                loaded = {}
            if isinstance(loaded, dict):
                self._state.update({k: int(v) for k, v in loaded.items() if k in self._state and isinstance(v, int)})

    def _save(self) -> None:
        if self.state_file is None:
            return
        atomic_write(self.state_file, json.dumps(self._state) + "\n")

    def vip_states(self) -> list[VipState]:
        return []

    def carp_globals(self) -> CarpGlobals:
        return CarpGlobals(demotion=self._state["demotion"], allow=bool(self._state["allow"]),
                           preempt=bool(self._state["preempt"]))

    def add_demotion(self, delta: int) -> None:
        self._state["demotion"] += int(delta)
        self._save()

    def set_allow(self, allow: bool) -> None:
        self._state["allow"] = int(allow)
        self._save()

    def set_preempt(self, preempt: bool) -> None:
        self._state["preempt"] = int(preempt)
        self._save()

    def pfsync_state(self) -> PfsyncState:
        return PfsyncState(enabled=False, syncdev=None, syncpeer=None, version=None, defer=None,
                           syncok=None, running=False, detail="no failover backend on this node")

    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        return False

    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        return None

    def boot_id(self) -> str:
        return "no-kernel"


def _root_provider(conf_dir: str | os.PathLike[str]) -> Callable[[], etree._Element | None]:
    """config.xml for mapping devices to interface keys; None (devices shown raw) if unreadable."""
    def provide() -> etree._Element | None:
        try:
            return ConfigStore(conf_dir).load()
        except ConfigError as exc:
            log.debug("interface names unavailable: %s", exc)
            return None

    return provide


def choose(env: str | None = None, system: str | None = None) -> str:
    """Which backend: the env override when set, else by OS."""
    value = (os.environ.get(ENV_VAR, "") if env is None else env).strip().lower()
    if value:
        if value not in CHOICES:
            raise FailoverError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
        return value
    return "freebsd" if (system or platform.system()) == "FreeBSD" else "keepalived"


def get_backend(conf_dir: str | os.PathLike[str] | Path, runner: CommandRunner | None = None) -> FailoverBackend:
    """The failover backend for the node whose config lives in `conf_dir`."""
    kind = choose()
    if kind == "none":
        return NullBackend(Path(conf_dir) / NULL_STATE_FILE if Path(conf_dir).is_dir() else None)
    runner = runner or SubprocessRunner()
    if kind == "freebsd":
        from hasync.failover.freebsd import FreeBsdBackend

        return FreeBsdBackend(runner, _root_provider(conf_dir))
    try:  # written by the Linux side; imported lazily so FreeBSD never needs it
        module = importlib.import_module(f"{__package__}.linux")
    except ImportError as exc:
        raise FailoverError(f"the keepalived backend is not available ({exc}); "
                            f"set {ENV_VAR}=none on nodes without failover") from None
    backend = module.KeepalivedBackend.from_conf_dir(conf_dir, runner)
    if not isinstance(backend, FailoverBackend):
        raise FailoverError("hasync.failover.linux.KeepalivedBackend is not a FailoverBackend")
    return backend
