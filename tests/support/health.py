"""Shared builders for the diff/check/rollback/extension tests: a synced pair with real agents.

The backup agent is built exactly as `serve` builds it (`build_server`), on a real TLS socket,
with a FreeBSD failover backend over the fake kernel of `fakekernel`, so `hasync.carp_status`
reports real parsed `ifconfig`/`sysctl` output. The primary's own CARP state comes from a second
fake kernel through the same backend class.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hasync import cli
from hasync.agent.serve import ServeOptions, build_server
from hasync.agent.server import AgentServer
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore
from hasync.failover.freebsd import FreeBsdBackend
from hasync.sync.run import SyncOptions, SyncResult, SyncRun, peer_from_settings
from hasync.wire.client import ClientOptions, PeerClient
from support.fakekernel import FakeKernel
from support.nodes import Pair, make_pair

# Every secret the fixture pair holds (and the ones tests add): no output may ever contain one.
FIXTURE_SECRETS = (
    "$2y$10$FduWWzvi0a2Ya.56iCIG9ezblMqSEf22.ZXgAkSfWxiJb01zuF5Eq",  # root's bcrypt hash
    "$2y$10$T.Gzijl3UeYWix3oPMsZIuIhW83TsNncIU.ilN0WhyVXCIsVmkqga",  # hasync's bcrypt hash
    "carp-lan-secret",
    "carp-wan-secret",
    "demo-sync-password",
)


def node_kernel(*, wan: str, lan: str, sync: str, peer: str, state: str, advskew: int) -> FakeKernel:
    """A fixture node's kernel: both CARP vhids up in `state`, pfsync in sync, preempt on."""
    kernel = FakeKernel()
    kernel.add_interface("eth0", address=f"{wan}/24", descr="wan")
    kernel.add_interface("eth1", address=f"{lan}/24", descr="lan")
    kernel.add_interface("eth2", address=f"{sync}/30", descr="SYNC (opt1)")
    kernel.add_vip("eth1", 1, "10.77.1.1/24", advskew=advskew, state=state, key="carp-lan-secret")
    kernel.add_vip("eth0", 2, "198.51.100.1/24", advskew=advskew, state=state, key="carp-wan-secret")
    kernel.run(["ifconfig", "pfsync0", "syncdev", "eth2", "syncpeer", peer, "version", "1400", "-defer", "up"])
    kernel.complete_bulk()
    kernel.preempt = 1
    kernel.commands.clear()
    return kernel


def primary_kernel() -> FakeKernel:
    return node_kernel(wan="198.51.100.2", lan="10.77.1.2", sync="10.77.3.1", peer="10.77.3.2", state="MASTER",
                       advskew=0)


def backup_kernel() -> FakeKernel:
    return node_kernel(wan="198.51.100.3", lan="10.77.1.3", sync="10.77.3.2", peer="10.77.3.1", state="BACKUP",
                       advskew=100)


def backend(conf_dir: Path, kernel: FakeKernel) -> FreeBsdBackend:
    return FreeBsdBackend(kernel, ConfigStore(conf_dir).load)


def set_state(kernel: FakeKernel, vhid: int, state: str) -> None:
    for iface in kernel.interfaces.values():
        if vhid in iface.carp:
            iface.carp[vhid].state = state


@contextmanager
def agent(pair: Pair, failover: Any = None, **overrides: Any) -> Iterator[AgentServer]:
    """A real TLS agent for the backup (as `serve` builds it), the primary pointed at it."""
    options = ServeOptions(conf_dir=pair.backup, listen="127.0.0.1:0", tls_cert=pair.cert_file,
                           tls_key=pair.key_file, allow_loopback=True, services_dir=pair.services_dir,
                           state_dir=pair.state_dir)
    for key, value in overrides.items():
        setattr(options, key, value)
    server = build_server(options, failover)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def sync(pair: Pair, **options: Any) -> SyncResult:
    result = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(**options)).run()
    assert result.status == "ok", result.message
    return result


def peer(pair: Pair) -> PeerClient:
    root = ConfigStore(pair.primary).load()
    return peer_from_settings(pair.primary, root, read_hasync(root), ClientOptions(retries=0, total_timeout=20))


def run_cli(capsys: Any, conf_dir: Path, *argv: str) -> tuple[int, str, str]:
    """`opnsense-ha --conf-dir DIR argv...` in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["--conf-dir", str(conf_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def edit(conf_dir: Path, description: str = "test edit") -> Any:
    """`with edit(dir) as root:` a store transaction (history kept, like a GUI save)."""
    return ConfigStore(conf_dir).transaction(description, username="root@test")


def fresh_pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


def assert_no_secret(text: str, extra: tuple[str, ...] = ()) -> None:
    for secret in (*FIXTURE_SECRETS, *extra):
        assert secret not in text, f"secret {secret[:6]}... leaked into the output"
