"""`opnsense-ha agent show|set`: the backup agent's settings, kept in config.xml.

They live in a small section of our own, `<OPNsense><opnsense_ha>` (enabled, listen, port,
certref), so they are part of every config backup, restore and history revision like any other
OPNsense setting, and are never synced: no sync item covers the section, and they describe the
node itself. configd renders `/etc/rc.conf.d/opnsense_ha` from them (template
`OPNsense/HaSync`), which the rc.d service `opnsense_ha` reads; `configctl ha agent_apply`
renders and restarts in one step.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from lxml import etree

from hasync.agent.serve import DEFAULT_PORT
from hasync.config.items import PLUGIN_SECTION
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError

SECTION = tuple(PLUGIN_SECTION.split("/"))


@dataclass
class AgentSettings:
    enabled: bool = False
    listen: str = ""  # address; empty = every address
    port: int = DEFAULT_PORT
    certref: str = ""  # a <cert> refid; empty = the web GUI's certificate

    @classmethod
    def read(cls, root: etree._Element) -> AgentSettings:
        section = root.find("/".join(SECTION))
        if section is None:
            return cls()
        port_text = (section.findtext("port") or "").strip()
        return cls(
            enabled=(section.findtext("enabled") or "").strip() == "1",
            listen=(section.findtext("listen") or "").strip(),
            port=int(port_text) if port_text.isdigit() else DEFAULT_PORT,
            certref=(section.findtext("certref") or "").strip(),
        )

    def write(self, root: etree._Element) -> None:
        parent = root
        for tag in SECTION:
            found = parent.find(tag)
            parent = found if found is not None else etree.SubElement(parent, tag)
        values = {"enabled": "1" if self.enabled else "0", "listen": self.listen, "port": str(self.port),
                  "certref": self.certref}
        for tag, text in values.items():
            element = parent.find(tag)
            if element is None:
                element = etree.SubElement(parent, tag)
            element.text = text


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("agent", help="show or change the backup agent's settings (config.xml)")
    sub = parser.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    sub.add_parser("show", help="the settings as JSON").set_defaults(func=_show)
    change = sub.add_parser("set", help="change settings; then `configctl ha agent_apply` (re)starts the agent")
    switch = change.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    switch.add_argument("--disable", dest="enabled", action="store_const", const=False)
    change.add_argument("--listen", metavar="ADDR", help="address to listen on ('' = all addresses)")
    change.add_argument("--port", type=int, metavar="PORT", help=f"TCP port (default {DEFAULT_PORT})")
    change.add_argument("--cert-ref", metavar="REFID",
                        help="refid of a certificate in config.xml ('' = the web GUI's certificate)")
    change.set_defaults(func=_set)


def _print(settings: AgentSettings) -> None:
    json.dump(asdict(settings), sys.stdout)
    sys.stdout.write("\n")


def _show(args: argparse.Namespace) -> int:
    _print(AgentSettings.read(ConfigStore(args.conf_dir).load()))
    return 0


def validate(settings: AgentSettings, root: etree._Element) -> None:
    if settings.listen:
        try:
            ipaddress.ip_address(settings.listen)
        except ValueError:
            raise HaError(f"--listen {settings.listen!r} is not an IP address") from None
    if not 1 <= settings.port <= 65535:
        raise HaError(f"--port {settings.port} is out of range (1-65535)")
    if settings.certref:
        refids = {(cert.findtext("refid") or "").strip() for cert in root.iterfind("cert")
                  if (cert.findtext("prv") or "").strip()}
        if settings.certref not in refids:
            raise HaError(f"--cert-ref {settings.certref!r}: no certificate with a private key has this refid "
                          "(System > Trust > Certificates)")


def _set(args: argparse.Namespace) -> int:
    store = ConfigStore(args.conf_dir)
    with store.transaction("opnsense-ha: backup agent settings changed") as root:
        settings = AgentSettings.read(root)
        if args.enabled is not None:
            settings.enabled = args.enabled
        if args.listen is not None:
            settings.listen = args.listen.strip()
        if args.port is not None:
            settings.port = args.port
        if args.cert_ref is not None:
            settings.certref = args.cert_ref.strip()
        validate(settings, root)  # raising here leaves config.xml untouched
        settings.write(root)
        target = (root.findtext("hasync/synchronizetoip") or "").strip()
    if settings.enabled and target:
        print(f"opnsense-ha: note: this node syncs to {target}, so it is a primary; the agent belongs on the backup",
              file=sys.stderr)
    _print(settings)
    return 0
