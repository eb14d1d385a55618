"""The one place that decides which failover backend this node uses.

Everything else (CLI, agent, checks) calls `get_backend(conf_dir)` and never asks which OS it is
on. The choice: `OPNSENSE_HA_FAILOVER=freebsd|keepalived|none` when set (lab, demo, tests);
otherwise FreeBSD's CARP/pfsync on FreeBSD (OPNsense) and keepalived/conntrackd elsewhere.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from ..errors import ConfigError, FailoverError
from ..osiface import CommandRunner, SubprocessRunner
from .base import CarpGlobals, FailoverBackend, PfsyncConfig, PfsyncState, VipSpec, VipState

log = logging.getLogger(__name__)

ENV_VAR = "OPNSENSE_HA_FAILOVER"
CHOICES = ("freebsd", "keepalived", "none")


class NullBackend(FailoverBackend):
    """For nodes without failover (the demo, a lone box): reports nothing, changes nothing.

    The demotion counter is kept in memory only so one process sees its own writes consistently;
    there is no kernel behind it.
    """

    name = "none"

    def __init__(self) -> None:
        self._demotion = 0
        self._allow = True
        self._preempt = False

    def vip_states(self) -> list[VipState]:
        return []

    def carp_globals(self) -> CarpGlobals:
        return CarpGlobals(demotion=self._demotion, allow=self._allow, preempt=self._preempt)

    def add_demotion(self, delta: int) -> None:
        self._demotion += delta

    def set_allow(self, allow: bool) -> None:
        self._allow = allow

    def set_preempt(self, preempt: bool) -> None:
        self._preempt = preempt

    def pfsync_state(self) -> PfsyncState:
        return PfsyncState(enabled=False, syncdev=None, syncpeer=None, version=None, defer=None,
                           syncok=None, running=False, detail="no failover backend on this node")

    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        return False

    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        return None

    def boot_id(self) -> str:
        return ""


def _root_provider(conf_dir: str | os.PathLike[str]) -> Callable[[], etree._Element | None]:
    """config.xml for mapping devices to interface keys; None (devices shown raw) if unreadable."""
    from ..store import ConfigStore

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
        return NullBackend()
    runner = runner or SubprocessRunner()
    if kind == "freebsd":
        from .freebsd import FreeBsdBackend

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
