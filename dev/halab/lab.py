"""A firewall pair in network namespaces: real keepalived, conntrackd, nftables and real packets.

Topology (every address lives inside a namespace this module creates; nothing leaves them)::

    ha-lan (client 10.77.1.100, gw = LAN VIP 10.77.1.1)        ha-wan (server 10.77.2.100)
         |                                                         |
    [br-lan] ------------------ ha-sw ----------------------- [br-wan]
      |      \\                                               /      |
    lan0 (10.77.1.2)   lan0 (10.77.1.3)      wan0 (10.77.2.2)    wan0 (10.77.2.3)
    ha-fw1 (primary, advskew 0) ---- sync0 10.77.3.1/.2 ---- ha-fw2 (backup, advskew 100)

Each firewall forwards LAN -> WAN with a pf-like nftables ruleset: only a SYN creates TCP state,
``ct state invalid drop``, and ``nf_conntrack_tcp_loose=0`` in its namespace, so a mid-stream
packet of a connection whose state was not synced is really dropped. Outbound traffic is
SNATed to the WAN VIP 10.77.2.1. Each firewall runs keepalived, conntrackd (own sockets and lock
files) and, when available, the backup agent, all from its own conf dir under the lab directory
(default /run/opnsense-ha-lab), whose config.xml declares the VIPs and hasync. fw2 gets its VIPs
by a real `opnsense-ha sync` from fw1 over the sync link when the agent and client are available
(`LabOptions.real_sync`), else its config is written directly with the synced skew (+100).

`Lab.down` (and `Lab.up`, first) removes everything a lab made: processes inside the
namespaces, the namespaces (with their interfaces) and the lab directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halab import pythonpath
from halab.topology import (
    AGENT_PORT,
    CARP_PASSWORD_LEN,
    CLIENT_IP,
    ECHO_PORT,
    FIREWALLS,
    FW1,
    FW2,
    HOOK_SCRIPT,
    LAB_DIR,
    LAN_VIP,
    NAMESPACES,
    NS_LAN,
    NS_SW,
    NS_WAN,
    REQUIRED_BINARIES,
    SERVER_IP,
    WAN_VIP,
    FirewallSpec,
    LabError,
    LabOptions,
    NetnsRunner,
    render_node_config,
    render_ruleset,
)
from hasync.core.errors import HaError
from hasync.core.fileio import atomic_write
from hasync.core.osiface import Clock, CommandResult, CommandRunner, SubprocessRunner, SystemClock
from hasync.failover.linux import KeepalivedBackend
from hasync.failover.linux_render import LinuxOptions, LinuxPaths

log = logging.getLogger(__name__)


# --- the lab --------------------------------------------------------------------------------------


def _python() -> str:
    return sys.executable


def have_command(name: str) -> bool:
    return importlib.util.find_spec(f"hasync.cli.commands.{name}") is not None


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in REQUIRED_BINARIES if shutil.which(name, path=path) is None]


def namespace_support() -> str | None:
    """None if this process can create network namespaces, else why not (containers without
    CAP_SYS_ADMIN, a read-only /run, ...). Creates and removes one throw-away namespace."""
    try:
        from pyroute2 import netns
    except ImportError:
        return "pyroute2 is not installed (the `lab` extra: pip install -e '.[lab]'; `make setup` does)"

    name = f"ha-probe-{os.getpid()}"
    try:
        netns.create(name)
    except Exception as exc:  # pyroute2 raises OSError subclasses, or its own errors from the helper
        return f"cannot create a network namespace ({exc})"
    try:
        netns.remove(name)
    except Exception as exc:
        return f"cannot remove the probe network namespace {name} ({exc})"
    return None


class Lab:
    """Build, drive and tear down the namespace lab."""

    def __init__(self, options: LabOptions | None = None, *, runner: CommandRunner | None = None,
                 clock: Clock | None = None) -> None:
        self.options = options or LabOptions()
        self.runner = runner or SubprocessRunner()
        self.clock: Clock = clock or SystemClock()

    # --- paths ---

    @property
    def state_dir(self) -> Path:
        return self.options.state_dir

    @property
    def state_file(self) -> Path:
        return self.state_dir / "lab.json"

    def node_dir(self, fw: FirewallSpec) -> Path:
        return self.state_dir / fw.name

    def conf_dir(self, fw: FirewallSpec) -> Path:
        return self.node_dir(fw) / "conf"

    def hook_log(self, fw: FirewallSpec) -> Path:
        return self.node_dir(fw) / "carp-hooks.log"

    def agent_url(self, fw: FirewallSpec) -> str:
        return f"https://{fw.sync_ip}:{AGENT_PORT}/"

    # --- plumbing ---

    def _run(self, argv: Sequence[str], *, namespace: str | None = None, input_text: str | None = None,
             check: bool = True, timeout: float = 30.0) -> CommandResult:
        full = ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)
        result = self.runner.run(full, input_text=input_text, timeout=timeout)
        if check and not result.ok:
            detail = (result.stderr or result.stdout).strip()[-1500:]
            raise LabError(f"`{' '.join(full)}` failed (exit {result.returncode}): {detail}")
        return result

    def sysctl(self, namespace: str, values: dict[str, int]) -> None:
        """Per-namespace sysctls, written to /proc/sys from inside the namespace (no procps needed)."""
        script = "; ".join(f"echo {int(value)} > /proc/sys/{key.replace('.', '/')}" for key, value in values.items())
        self._run(["sh", "-ec", script], namespace=namespace)

    def backend(self, fw: FirewallSpec) -> KeepalivedBackend:
        return KeepalivedBackend(self.conf_dir(fw), NetnsRunner(fw.namespace, self.runner), clock=self.clock)

    def existing_namespaces(self) -> list[str]:
        from pyroute2 import netns

        present = set(netns.listnetns())
        return [name for name in NAMESPACES if name in present]

    # --- teardown ---

    def down(self) -> list[str]:
        """Remove everything a lab made; safe on a half-built or already removed lab."""
        notes: list[str] = []
        present = self.existing_namespaces()
        for fw in FIREWALLS:  # graceful first: keepalived sends priority 0, conntrackd removes its socket
            if fw.namespace in present and self.conf_dir(fw).is_dir():
                try:
                    self.backend(fw).stop()
                except HaError as exc:
                    notes.append(f"{fw.name}: {exc}")
        for name in present:
            self._kill_namespace_processes(name, notes)
        from pyroute2 import netns

        for name in present:
            try:
                netns.remove(name)
            except OSError as exc:
                notes.append(f"removing namespace {name}: {exc}")
        if self.state_dir.exists():
            if not (self.state_file.exists() or self.state_dir == LAB_DIR):
                notes.append(f"{self.state_dir} does not look like a lab directory; left in place")
            else:
                shutil.rmtree(self.state_dir, ignore_errors=True)
        return notes

    def _kill_namespace_processes(self, name: str, notes: list[str]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._namespace_pids(name)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = self.clock.monotonic() + 3.0
            while self._namespace_pids(name) and self.clock.monotonic() < deadline:
                self.clock.sleep(0.05)
        left = self._namespace_pids(name)
        if left:
            notes.append(f"processes {left} in {name} survived SIGKILL")

    def _namespace_pids(self, name: str) -> list[int]:
        result = self._run(["ip", "netns", "pids", name], check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit() and int(word) != os.getpid()]

    # --- build ---

    def preflight_root(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, nftables, keepalived)")

    def preflight(self) -> None:
        self.preflight_root()
        missing = missing_binaries()
        if missing:
            raise LabError(f"missing programs: {', '.join(missing)} "
                           "(Debian: apt-get install keepalived conntrackd nftables conntrack iproute2)")
        problem = namespace_support()
        if problem:
            raise LabError(f"{problem}; the lab needs network namespaces (a privileged container or a VM)")

    def up(self) -> dict[str, Any]:
        """Tear down leftovers, build the topology, start the daemons, wait for fw1 MASTER."""
        self.preflight()
        self.down()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        try:
            self._build_network()
            self._configure_firewalls()
            self._start_firewalls()
            self.wait_states({FW1: "MASTER", FW2: "BACKUP"}, timeout=10 + 4 * self.options.advbase)
        except BaseException:
            log.error("lab up failed; logs are in %s until the next `lab down`", self.state_dir)
            raise
        return self.status()

    def _build_network(self) -> None:
        from pyroute2 import IPRoute, netns

        for name in NAMESPACES:
            netns.create(name)
            self.sysctl(name, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        with IPRoute(netns=NS_SW) as sw:
            for bridge in ("br-lan", "br-wan"):
                sw.link("add", ifname=bridge, kind="bridge", br_mcast_snooping=0, br_forward_delay=0)
                sw.link("set", index=sw.link_lookup(ifname=bridge)[0], state="up")
            ports = [(f"{fw.name}-lan", "lan0", fw.namespace, "br-lan") for fw in FIREWALLS]
            ports += [(f"{fw.name}-wan", "wan0", fw.namespace, "br-wan") for fw in FIREWALLS]
            ports += [("cl-lan", "eth0", NS_LAN, "br-lan"), ("srv-wan", "eth0", NS_WAN, "br-wan")]
            for port, inner, namespace, bridge in ports:
                sw.link("add", ifname=port, kind="veth", peer={"ifname": inner, "net_ns_fd": namespace})
                master = sw.link_lookup(ifname=bridge)[0]
                sw.link("set", index=sw.link_lookup(ifname=port)[0], master=master, state="up")
        with IPRoute(netns=FW1.namespace) as fw1:
            fw1.link("add", ifname="sync0", kind="veth", peer={"ifname": "sync0", "net_ns_fd": FW2.namespace})
        addresses = {
            FW1.namespace: [("lan0", FW1.lan_ip), ("wan0", FW1.wan_ip), ("sync0", FW1.sync_ip)],
            FW2.namespace: [("lan0", FW2.lan_ip), ("wan0", FW2.wan_ip), ("sync0", FW2.sync_ip)],
            NS_LAN: [("eth0", CLIENT_IP)],
            NS_WAN: [("eth0", SERVER_IP)],
        }
        for namespace, entries in addresses.items():
            with IPRoute(netns=namespace) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for device, address in entries:
                    index = ipr.link_lookup(ifname=device)[0]
                    ipr.addr("add", index=index, address=address, prefixlen=24)
                    ipr.link("set", index=index, state="up")
                if namespace == NS_LAN:
                    ipr.route("add", dst="default", gateway=LAN_VIP)
        with IPRoute(netns=NS_SW) as sw:
            sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")

    def _configure_firewalls(self) -> None:
        carp_password = secrets.token_urlsafe(CARP_PASSWORD_LEN)
        sync_password = secrets.token_urlsafe(24)
        sync_hash = ""
        use_agent = self.options.agent and have_command("serve")
        real_sync = use_agent and self.options.real_sync and have_command("sync")
        if use_agent:
            import bcrypt

            sync_hash = bcrypt.hashpw(sync_password.encode(), bcrypt.gensalt(rounds=8)).decode()
            sync_hash = "$2y$" + sync_hash[4:]  # PHP's password_hash prefix
        for fw in FIREWALLS:
            node = self.node_dir(fw)
            conf = self.conf_dir(fw)
            conf.mkdir(parents=True, exist_ok=True)
            hooks = node / "hooks"
            hooks.mkdir(exist_ok=True)
            os.chmod(node, 0o755)
            hook = hooks / "10-lab-record"
            hook.write_text(HOOK_SCRIPT.format(log=self.hook_log(fw)))
            os.chmod(hook, 0o755)
            (node / "services").mkdir(exist_ok=True)
            with_vips = fw.primary or not real_sync
            data = render_node_config(
                fw, with_vips=with_vips, options=self.options, carp_password=carp_password,
                sync_password=sync_password if fw.primary else "",
                sync_password_hash="" if fw.primary else sync_hash,
                agent_url=self.agent_url(FW2) if fw.primary else "",
            )
            (conf / "config.xml").write_bytes(data)
            os.chmod(conf / "config.xml", 0o640)
            self.sysctl(fw.namespace, {"net.ipv4.ip_forward": 1, "net.netfilter.nf_conntrack_tcp_loose": 0,
                                       "net.netfilter.nf_conntrack_tcp_be_liberal": 0})
            ruleset = render_ruleset(fw, strict=self.options.strict)
            self._run(["nft", "-f", "-"], namespace=fw.namespace, input_text=ruleset)
            paths = LinuxPaths.for_conf_dir(conf)
            paths.run_dir.mkdir(parents=True, exist_ok=True)
            LinuxOptions(foreground_logs=True, gate=self.options.gate, hook_dir=str(hooks), router_id=fw.name,
                         python=_python()).save(paths.options_json)
        self._write_state({"real_sync": real_sync, "agent": use_agent})

    def _start_firewalls(self) -> None:
        state = self._read_state()
        for fw in FIREWALLS:
            self.backend(fw).start()
        if state.get("agent"):
            for fw in FIREWALLS:
                self._start_agent(fw)
        if state.get("real_sync"):
            self.sync_primary()

    def _start_agent(self, fw: FirewallSpec) -> None:
        node = self.node_dir(fw)
        log_path = node / "agent.log"
        argv = ["ip", "netns", "exec", fw.namespace, _python(), "-m", "hasync", "--conf-dir", str(self.conf_dir(fw)),
                "serve", "--listen", f"{fw.sync_ip}:{AGENT_PORT}", "--services-dir", str(node / "services"),
                "--state-dir", str(node / "agent")]
        env = {**os.environ, "PYTHONPATH": pythonpath()}
        with open(log_path, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             start_new_session=True)
        deadline = self.clock.monotonic() + 15.0
        while b"listening on" not in log_path.read_bytes():
            if self.clock.monotonic() >= deadline:
                raise LabError(f"the agent on {fw.name} did not start: {log_path.read_text()[-800:]}")
            self.clock.sleep(0.05)

    def sync_primary(self) -> dict[str, Any]:
        """`opnsense-ha sync` on fw1 (its VIPs to fw2 through the sync link), as OPNsense would."""
        result = self.opnsense_ha(FW1, ["sync", "--items", "virtualip", "--json"], timeout=120)
        try:
            summary = json.loads(result.stdout or "{}")
        except ValueError:
            summary = {}
        if not result.ok:
            raise LabError(f"opnsense-ha sync on fw1 failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
        return summary if isinstance(summary, dict) else {}

    def opnsense_ha(self, fw: FirewallSpec, args: Sequence[str], *, timeout: float = 60.0,
                    check: bool = False) -> CommandResult:
        """Run an `opnsense-ha` command inside the firewall's namespace with its conf dir."""
        argv = ["env", f"PYTHONPATH={pythonpath()}", _python(), "-m", "hasync", "--conf-dir",
                str(self.conf_dir(fw)), *args]
        return self._run(argv, namespace=fw.namespace, check=check, timeout=timeout)

    # --- state file ---

    def _write_state(self, extra: dict[str, Any]) -> None:
        data = {"options": self.options.to_json(), "created": time.time(), **extra}
        atomic_write(self.state_file, json.dumps(data, indent=2))

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @classmethod
    def attach(cls, state_dir: Path = LAB_DIR, **kwargs: Any) -> Lab:
        """The lab that is running in `state_dir` (its options as recorded by `up`)."""
        try:
            data = json.loads((state_dir / "lab.json").read_text())
        except (OSError, ValueError):
            raise LabError(f"no lab in {state_dir} (run `python -m halab up`)") from None
        return cls(LabOptions.from_json(data.get("options", {})), **kwargs)

    # --- status ---

    def carp_states(self, fw: FirewallSpec) -> dict[int, str]:
        """{vhid: MASTER|BACKUP|INIT|DISABLED} of one firewall."""
        return {row.vhid: row.status for row in self.backend(fw).vip_states()}

    def status(self) -> dict[str, Any]:
        present = set(self.existing_namespaces())
        state = self._read_state()
        nodes: list[dict[str, Any]] = []
        for fw in FIREWALLS:
            entry: dict[str, Any] = {
                "name": fw.name, "namespace": fw.namespace, "role": "primary" if fw.primary else "backup",
                "conf_dir": str(self.conf_dir(fw)),
                "agent_url": self.agent_url(fw) if state.get("agent") else None,
                "addresses": {"lan": fw.lan_ip, "wan": fw.wan_ip, "sync": fw.sync_ip},
                "up": fw.namespace in present,
            }
            if entry["up"] and self.conf_dir(fw).is_dir():
                backend = self.backend(fw)
                glob = backend.carp_globals()
                pfsync = backend.pfsync_state()
                entry["carp"] = [{"vhid": row.vhid, "interface": row.interface, "device": row.device,
                                  "subnet": row.subnet, "advskew": row.advskew, "status": row.status}
                                 for row in backend.vip_states()]
                entry["demotion"] = glob.demotion
                entry["preempt"] = glob.preempt
                entry["keepalived_pid"] = backend.keepalived_pid()
                entry["state_sync"] = {"enabled": pfsync.enabled, "running": pfsync.running,
                                       "syncok": pfsync.syncok, "detail": pfsync.detail}
            nodes.append(entry)
        for name, namespace, address, role in (("lan", NS_LAN, CLIENT_IP, "client"),
                                               ("wan", NS_WAN, SERVER_IP, "server")):
            nodes.append({"name": name, "namespace": namespace, "role": role, "address": address,
                          "up": namespace in present})
        return {
            "up": set(NAMESPACES) <= present,
            "state_dir": str(self.state_dir),
            "options": self.options.to_json(),
            "vips": {"lan": f"{LAN_VIP}/24", "wan": f"{WAN_VIP}/24"},
            "real_sync": bool(state.get("real_sync")),
            "nodes": nodes,
        }

    # --- driving ---

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
        """Wait until `predicate()`; returns the seconds waited, LabError after `timeout`."""
        start = self.clock.monotonic()
        while not predicate():
            if self.clock.monotonic() - start >= timeout:
                raise LabError(f"timed out after {timeout:g}s waiting for {what}")
            self.clock.sleep(poll)
        return self.clock.monotonic() - start

    def all_in(self, fw: FirewallSpec, state: str) -> bool:
        states = self.carp_states(fw)
        return bool(states) and all(value == state for value in states.values())

    def wait_states(self, wanted: dict[FirewallSpec, str], timeout: float) -> float:
        text = ", ".join(f"{fw.name} {state}" for fw, state in wanted.items())
        return self.wait_for(lambda: all(self.all_in(fw, state) for fw, state in wanted.items()), timeout, text)

    def set_links(self, fw: FirewallSpec, up: bool, which: Sequence[str] = ("lan", "wan")) -> None:
        """Plug or unplug a firewall's cables at the switch (its side sees the carrier go)."""
        from pyroute2 import IPRoute

        with IPRoute(netns=NS_SW) as sw:
            for side in which:
                sw.link("set", index=sw.link_lookup(ifname=f"{fw.name}-{side}")[0], state="up" if up else "down")

    def partition(self, on: bool) -> None:
        """Split brain: the firewalls' switch ports are isolated from each other (bridge port
        isolation), so neither hears the other's VRRP while clients still reach both and every
        carrier stays up. Each side believes it is alone."""
        from pyroute2 import IPRoute

        with IPRoute(netns=NS_SW) as sw:
            for fw in FIREWALLS:
                for side in ("lan", "wan"):
                    sw.brport("set", index=sw.link_lookup(ifname=f"{fw.name}-{side}")[0], isolated=1 if on else 0)

    def set_sync_link(self, up: bool) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=FW1.namespace) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="sync0")[0], state="up" if up else "down")

    def daemon_pids(self, fw: FirewallSpec, comm: str) -> list[int]:
        """Pids of the processes named `comm` running in the firewall's namespace."""
        pids: list[int] = []
        for pid in self._namespace_pids(fw.namespace):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    pids.append(pid)
        return pids

    def mac(self, namespace: str, device: str) -> str:
        from pyroute2 import IPRoute

        with IPRoute(netns=namespace) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=device)[0])[0]
            return str(link.get_attr("IFLA_ADDRESS"))

    def neighbour_mac(self, namespace: str, address: str) -> str | None:
        from pyroute2 import IPRoute

        with IPRoute(netns=namespace) as ipr:
            for entry in ipr.get_neighbours(dst=address):
                mac = entry.get_attr("NDA_LLADDR")
                if mac:
                    return str(mac)
        return None

    def spawn(self, namespace: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """A helper process (python -m halab.labecho ...) inside a namespace."""
        argv = ["ip", "netns", "exec", namespace, _python(), *args]
        env = {**os.environ, "PYTHONPATH": pythonpath()}
        return subprocess.Popen(argv, env=env, text=True, **kwargs)

    def start_echo_server(self) -> subprocess.Popen[str]:
        proc = self.spawn(NS_WAN, ["-m", "halab.labecho", "server", "--bind", SERVER_IP, "--port", str(ECHO_PORT)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "echo server" not in line:
            proc.kill()
            raise LabError(f"echo server did not start: {line.strip()}")
        return proc


@dataclass
class StreamRun:
    """A running lab TCP stream (labecho client) and its status file."""

    proc: subprocess.Popen[str]
    status_path: Path
    summary: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        try:
            data = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        self.summary = json.loads(lines[-1]) if lines else {"error": "client printed no summary", "sent": -1,
                                                            "echoed": 0}
        return self.summary


def start_stream(lab: Lab, *, interval: float = 0.02, drain: float = 10.0, connections: int = 1,
                 name: str = "stream") -> StreamRun:
    """Long-lived TCP streams lan -> wan through the firewall pair, already flowing when returned."""
    status_path = lab.state_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.json"
    proc = lab.spawn(NS_LAN, ["-m", "halab.labecho", "client", "--connect", f"{SERVER_IP}:{ECHO_PORT}",
                              "--interval", str(interval), "--drain", str(drain), "--status", str(status_path),
                              "--connections", str(connections)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run = StreamRun(proc, status_path)
    try:
        lab.wait_for(lambda: run.status().get("echoed", 0) >= 10 * connections or proc.poll() is not None, 10.0,
                     "the TCP stream to start flowing")
    except LabError:
        run.stop(timeout=5)
        raise
    if proc.poll() is not None:
        run.stop()
        raise LabError(f"the TCP stream failed to start: {run.summary}")
    return run


def probe_vip(lab: Lab, address: str = LAN_VIP, timeout: float = 10.0) -> dict[str, Any]:
    """ICMP echo from the client to `address` until the first reply (monotonic time of it)."""
    proc = lab.spawn(NS_LAN, ["-m", "halab.labecho", "probe", "--target", address, "--timeout", str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout + 10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"ok": False, "error": out.strip()}
