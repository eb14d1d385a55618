"""`make demo`: a real primary -> backup sync between two nodes on this machine.

Seeds two node directories from the project's fixtures under ``./demo-nodes`` of the directory it
is started from (or ``--dir``), never inside the source tree or an installed package, starts the
backup agent on loopback with TLS (a self-signed certificate it generates, pinned by the primary on
first use), runs `opnsense-ha sync --restart-services` from the primary, and shows what happened on
the backup.
Everything runs as separate processes through the real CLI, exactly as an admin would run it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from halab import pythonpath
from hasync.config.store import ConfigStore
from hasync.core.osiface import SubprocessRunner
from hasync.failover.model import carp_vips
from hasync.services.backends import ServicesDirBackend

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR_NAME = "demo-nodes"
DEMO_MARKER = ".opnsense-ha-demo"  # marks a directory this demo made, so a rerun may empty it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(conf_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hasync", "--conf-dir", str(conf_dir), *args]
    print(f"\n$ opnsense-ha --conf-dir {conf_dir} {' '.join(args)}", flush=True)
    proc = subprocess.run(command, text=True, stdout=subprocess.PIPE, env=_env(), timeout=300)
    if proc.stdout:
        print(proc.stdout.rstrip(), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(args)}` failed with exit code {proc.returncode}")
    return proc


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OPNSENSE_HA_FAILOVER"] = "none"  # no CARP on a demo machine; the lab shows failover
    env["PYTHONPATH"] = pythonpath() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def prepare_dir(workdir: Path) -> None:
    """An empty `workdir` for the nodes: a fresh or empty directory, or one an earlier demo made.

    Anything else is refused rather than emptied: ``--dir ~`` must never delete a home directory.
    """
    if workdir.exists() and not workdir.is_dir():
        raise SystemExit(f"demo: {workdir} exists and is not a directory; choose another --dir")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            raise SystemExit(f"demo: {workdir} is not empty and was not made by this demo; "
                             "choose another --dir (or remove it)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by opnsense-ha's demo (python -m halab.demo); safe to delete\n")


def seed(workdir: Path, fixtures: Path) -> tuple[Path, Path]:
    if not (fixtures / "primary.xml").is_file():
        raise SystemExit(f"demo: no demo fixtures in {fixtures} (they ship with the source tree, "
                         "fixtures/nodes); pass --fixtures")
    prepare_dir(workdir)
    primary, backup = workdir / "primary", workdir / "backup"
    for node in (primary, backup):
        node.mkdir(parents=True)
    shutil.copy(fixtures / "primary.xml", primary / "config.xml")
    shutil.copy(fixtures / "backup.xml", backup / "config.xml")
    shutil.copytree(fixtures / "services.d", backup / "services.d")
    return primary, backup


def wait_for_agent(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return line.strip().split("listening on ", 1)[1]
    raise SystemExit("demo: the backup agent did not start (see its messages above)")


def summarize_backup(backup: Path) -> None:
    root = ConfigStore(backup).load()
    print("\nBackup after the sync:")
    print(f"  revision: {root.findtext('revision/description')} "
          f"(by {root.findtext('revision/username')} at {root.findtext('revision/time')})")
    rules = [rule.findtext("descr") or "" for rule in root.iterfind("filter/rule")]
    print(f"  filter rules, in order: {rules}")
    for vip in carp_vips(root):
        print(f"  CARP VIP vhid {vip.vhid} on {vip.interface}: {vip.subnet}/{vip.subnet_bits} advskew {vip.advskew}")
    local_vips = [v.findtext("subnet") for v in root.iterfind("virtualip/vip") if not v.findtext("vhid")]
    print(f"  backup's own non-CARP VIPs kept: {local_vips}")
    aliases = [a.findtext("name") for a in root.iterfind("OPNsense/Firewall/Alias/aliases/alias")]
    print(f"  aliases: {aliases} (fw_b_monitoring is nosync on the backup and stays)")
    print(f"  hasync.synchronizetoip on the backup: {root.findtext('hasync/synchronizetoip')!r} (never overwritten)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halab.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", "--workdir", dest="workdir", type=Path, default=Path(DEFAULT_DIR_NAME),
                        help=f"where the two nodes go (default: ./{DEFAULT_DIR_NAME} of the current directory); "
                             "must be new, empty or an earlier demo's")
    parser.add_argument("--fixtures", type=Path, default=REPO / "fixtures" / "nodes",
                        help="the node configs to start from (default: the source tree's fixtures/nodes)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    primary, backup = seed(workdir, args.fixtures)
    print(f"seeded primary node in {primary} and backup node in {backup}")
    services = ServicesDirBackend(backup / "services.d", SubprocessRunner())
    for service in services.list_services():
        if not service.get("nocheck"):
            services.start(str(service["name"]), str(service.get("id", "")))
    port = free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "hasync", "--conf-dir", str(backup), "serve", "--listen", f"127.0.0.1:{port}",
         "--allow-loopback", "--services-dir", str(backup / "services.d"), "--state-dir", str(backup / "state")],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        url = wait_for_agent(agent)
        print(f"backup agent (pid {agent.pid}) listening on {url} with a self-signed TLS certificate")
        with ConfigStore(primary).transaction("demo: point hasync at the local backup agent") as root:
            target = root.find("hasync/synchronizetoip")
            assert target is not None
            target.text = f"https://127.0.0.1:{port}/"
        cli(primary, "sync", "--restart-services")
        cli(primary, "status")
        summarize_backup(backup)
        cli(primary, "trust")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
        for service in services.list_services():
            if service.get("status") and not service.get("nocheck"):
                services.stop(str(service["name"]), str(service.get("id", "")))
    print(f"\nFiles (all under {workdir}):")
    for name, node in (("primary", primary), ("backup", backup)):
        print(f"  {name}: {node / 'config.xml'} (history in {node / 'backup'})")
    print(f"  backup agent certificate: {backup / 'state'}; primary's pin: {primary / 'ha-state' / 'trust.json'}")
    print("demo finished: agent stopped, demo services stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
