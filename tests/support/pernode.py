"""Per-node fixtures: the node pair of `nodes.py` with the overlays of fixtures/pernode added."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.pernode import Declarations
from hasync.config.store import ConfigStore
from support.paths import FIXTURES

PERNODE = FIXTURES / "pernode"
SYNC_ITEMS = "users,aliases,rules,nat,virtualip,kea,cron"


def overlay_tree(root: etree._Element, extra: etree._Element) -> None:
    """Add `extra`'s sections to `root`: interface settings into the interface, VIPs and
    `OPNsense` children into the existing section, anything else appended."""
    for section in extra:
        if not isinstance(section.tag, str):
            continue
        target = root.find(section.tag)
        if target is None:
            root.append(section)
        elif section.tag == "interfaces":
            for interface in section:
                node = target.find(interface.tag)
                assert node is not None, interface.tag
                node.extend(list(interface))
        else:
            target.extend(list(section))


def overlay(conf_dir: Path, name: str, syncitems: str | None = None) -> None:
    """Apply fixtures/pernode/<name>-extra.xml to the node in `conf_dir` (through the store)."""
    extra = etree.parse(str(PERNODE / f"{name}-extra.xml"), etree.XMLParser(remove_blank_text=True)).getroot()
    with ConfigStore(conf_dir).transaction(f"test: per-node overlay {name}") as root:
        overlay_tree(root, extra)
        if syncitems is not None:
            node = root.find("hasync/syncitems")
            assert node is not None
            node.text = syncitems


def without_declarations(registry: SyncItemRegistry) -> SyncItemRegistry:
    """The same items with every per-node declaration removed: the control for each feature test."""
    return SyncItemRegistry(item._replace(declarations=Declarations()) for item in registry)


def text(conf_dir: Path, xpath: str) -> list[str]:
    root = ConfigStore(conf_dir).load()
    return [(node.text or "") for node in root.xpath(xpath)]
