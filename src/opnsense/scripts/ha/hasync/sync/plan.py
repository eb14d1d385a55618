"""The primary's plan for one sync: which items differ (digests first), and how to send them.

`ConfigView` is this node's config.xml for one sync, parsed only when something must be sent;
`SyncPlan` probes the backup once, compares digests (ours from `ConfigView`, the backup's from
the probe, the snapshot for a stock backup), and sends the items that differ on the fast path
(`wire.sections`) or as the compatible `opnsense.restore_config_section` payload. It runs with
`--no-fast-path` too: only the transfer changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lxml import etree

from hasync import __version__
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.core import xmlsafe
from hasync.core.errors import HaError, RemoteFault
from hasync.core.fileio import RACY_WINDOW, atomic_write, file_key
from hasync.payload import digest as digestmod
from hasync.payload.build import check_sections, payload_for_items
from hasync.sync import snapshot
from hasync.wire import xmlrpc
from hasync.wire.discovery import PeerProbe, compact_probe, probe, remember_peer
from hasync.wire.protocol import AS_SENT_FEATURE, DIGEST_METHOD, PERNODE_FEATURE, RESTORE_METHOD
from hasync.wire.sections import SectionsBlob, build_blob, describe, filter_configure_vouching, send_blob

log = logging.getLogger("hasync.fastpath")


VIEW_CACHE = "sync-digests.json"

VIEW_FORMAT = 1

class ConfigView:
    """The primary's config.xml for one sync, parsed only when something must be sent.

    A no-op sync needs the sync settings and this node's per-item digests, both functions of the
    file's content. Both are kept in `<conf-dir>/ha-state/sync-digests.json` for one version of
    the file, named by its SHA-256 and its identity (device, inode, size, mtime, ctime): when the
    identity is unchanged and the entry was verified after the racy window, the file is not
    even read; otherwise it is hashed (~30 ms for 50 MB) and compared. No secret is stored: the
    `hasync` section, which holds the sync password, is re-read from its recorded byte range of
    that very version. Parsing 50 MB takes ~600 ms and digesting it seconds.
    """

    def __init__(self, store: ConfigStore, state: Path, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.path = state / VIEW_CACHE
        self.clock = clock
        self.key = file_key(store.config_path)
        self._data: bytes | None = None
        self._root: etree._Element | None = None
        self.parsed = False
        self._cache = self._read_cache()
        if not self._cache.get("trusted"):
            self._cache = self._verified(self._cache)

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self.store.read_bytes()
        return self._data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def _read_cache(self) -> dict[str, Any]:
        try:
            cached = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(cached, dict) or cached.get("format") != VIEW_FORMAT:
            return {}
        key, verified = cached.get("file_key"), cached.get("verified_at")
        cached["trusted"] = (self.key is not None and isinstance(key, list) and tuple(key) == self.key
                             and isinstance(verified, (int, float)) and verified - self.key[3] / 1e9 > RACY_WINDOW)
        return cached

    def _verified(self, cached: dict[str, Any]) -> dict[str, Any]:
        """The entry if it describes the file's current bytes (checked by hash), else nothing."""
        if not cached or cached.get("sha256") != self.sha256:
            return {}
        if self.key is not None and self.clock() - self.key[3] / 1e9 > RACY_WINDOW:
            cached["file_key"], cached["verified_at"] = list(self.key), self.clock()
            self._write(cached)  # the next run can trust the file's identity
        return cached

    @property
    def root(self) -> etree._Element:
        if self._root is None:
            self._root = parse_config_bytes(self.data, str(self.store.config_path))
            self.parsed = True
        return self._root

    def _span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of config.xml, read under its shared lock."""
        if self._data is not None:
            return self._data[start:end]
        return self.store.read_span(start, end)

    def light_root(self) -> etree._Element:
        """A tree that answers `read_hasync` and the web GUI protocol/port like the real one."""
        span = self._cache.get("hasync_span")
        webgui = self._cache.get("webgui")
        if isinstance(span, list) and len(span) == 2 and isinstance(webgui, list) and len(webgui) == 2:
            try:
                hasync = xmlsafe.parse_bytes(self._span(int(span[0]), int(span[1])), remove_blank_text=True)
            except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError):
                hasync = None
            if hasync is not None and hasync.tag == "hasync":
                light = etree.Element("opnsense")
                gui = etree.SubElement(etree.SubElement(light, "system"), "webgui")
                for tag, text in zip(("protocol", "port"), webgui, strict=True):
                    if text is not None:
                        etree.SubElement(gui, tag).text = text
                light.append(hasync)
                return light
        return self.root

    def _locate_hasync(self) -> list[int] | None:
        """The byte range of the first top-level <hasync>, verified against the parsed tree."""
        node = self.root.find("hasync")
        if node is None:
            return None
        expected = etree.tostring(node, with_tail=False)
        start = self.data.find(b"<hasync")
        while start >= 0:
            end = self.data.find(b"</hasync>", start)
            if end < 0:
                return None
            end += len(b"</hasync>")
            try:
                fragment = xmlsafe.parse_bytes(self.data[start:end], remove_blank_text=True)
            except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError):
                fragment = None
            if fragment is not None and etree.tostring(fragment) == expected:
                return [start, end]
            start = self.data.find(b"<hasync", start + 1)
        return None

    def digests(self, registry: SyncItemRegistry, item_ids: Sequence[str]) -> tuple[dict[str, str], bool]:
        """This node's digest of what it would send, per item; and whether they came from the cache."""
        signature = hashlib.sha256(json.dumps(
            [__version__, digestmod.CANONICAL_FORM, [(i, registry.get(i).sections) for i in item_ids]],
        ).encode()).hexdigest()
        cached = self._cache.get("digests", {}).get(signature)
        if isinstance(cached, dict) and set(cached) == set(item_ids):
            return {str(k): str(v) for k, v in cached.items()}, True
        values = digestmod.primary_item_values(self.root, registry, item_ids)
        digests = digestmod.item_digests(values, registry)
        self._store(signature, digests)
        return digests, False

    def _store(self, signature: str, digests: dict[str, str]) -> None:
        root = self.root
        entry: dict[str, Any] = dict(self._cache) if self._cache else {"format": VIEW_FORMAT, "sha256": self.sha256}
        entry.setdefault("digests", {})
        entry["digests"] = {**entry["digests"], signature: digests}
        entry["webgui"] = [root.findtext("system/webgui/protocol"), root.findtext("system/webgui/port")]
        span = self._locate_hasync()
        if span is not None:
            entry["hasync_span"] = span
        # the identity is recorded only for the bytes just read and hashed, and only once the
        # file is older than the racy window (a same-size rewrite in the same tick looks alike)
        if self.key is not None and file_key(self.store.config_path) == self.key:
            entry["file_key"], entry["verified_at"] = list(self.key), self.clock()
        self._cache = entry
        self._write(entry)

    def _write(self, entry: dict[str, Any]) -> None:
        entry = {k: v for k, v in entry.items() if k != "trusted"}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, json.dumps(entry), mode=0o600)
        except OSError as exc:  # a cache: never fail a sync over it
            log.info("could not store %s: %s", self.path, exc)

class SyncPlan:
    """One sync's decisions: which items differ (digests first), and how to send them.

    * `prepare` (the "build payload" step): this node's per-item digests, from `ConfigView`'s
      cache when config.xml is unchanged; nothing with ``--full``.
    * `probe` (the "firmware_version" step): one request for the backup's firmware version,
      capabilities and digests; then `send_ids` are the items whose digests differ. An item also
      counts as unchanged when neither side changed since our last push, which the snapshot
      tells (the backup may keep node-local keys inside merged containers, so its digest of such
      an item never equals ours even right after a sync).
    * `send` (the "restore_config_section" step): the fast path when the backup offers it, else
      the compatible call, with only the sections of `send_ids`.
    """

    def __init__(self, view: ConfigView, registry: SyncItemRegistry, item_ids: Sequence[str], *,
                 full: bool = False, fast: bool = True) -> None:
        self.view = view
        self.registry = registry
        self.item_ids = list(item_ids)
        self.full = full
        self.fast = fast
        self.ours: dict[str, str] | None = None
        self.peer_probe: PeerProbe | None = None
        self.send_ids: list[str] = list(item_ids)
        self.unchanged: list[str] = []
        self.transfer = ""  # "fast path" or "XML-RPC" once sent
        self.note = ""
        self.theirs: dict[str, str] = {}
        self.stale: list[str] = []
        self._payload: dict[str, Any] | None = None
        self._record_payload: dict[str, Any] | None = None
        self.record_digests: dict[str, str] | None = None
        self.prepared: Any = None  # snapshot.PreparedRecord
        self.blob: SectionsBlob | None = None
        self.digests_asked = False  # the fast path's merge request asked for the backup's digests too
        self.backup_digests: Any = None  # its reply (None when that call failed)
        # the items it named "as sent", with our digests of them: the agent keeps these
        # (`reload_filter`) instead of computing them (`protocol.AS_SENT_FEATURE`)
        self.vouched: dict[str, str] = {}
        self.vouch_token = ""
        self._early_blob: tuple[list[str], SectionsBlob] | None = None
        self._early_error: Exception | None = None

    def prepare(self) -> str:
        if self.full:
            return f"{len(self.item_ids)} items, all sent (--full)"
        self.ours, cached = self.view.digests(self.registry, self.item_ids)
        return f"{len(self.item_ids)} items, digests {'unchanged since the last run' if cached else 'computed'}"

    def _build_early(self) -> None:
        """With ``--full`` what goes out is known before the probe: the fast-path blob is built
        while the backup answers it (a bcrypt login on a fresh agent). Runs inside the probe's
        request (`PeerClient.call`'s `while_waiting`), so an error is kept for `send` to raise:
        the probe's reply still gets read, and the failure is reported where it belongs."""
        try:
            self._early_blob = self.sections, build_blob(self.view.root, self.sections,
                                                         declarations=self.registry.declarations())
        except Exception as exc:  # re-raised by `_blob`
            self._early_error = exc

    def _blob(self) -> SectionsBlob:
        if self._early_error is not None:
            raise self._early_error
        if self._early_blob is not None and self._early_blob[0] == self.sections:
            return self._early_blob[1]
        return build_blob(self.view.root, self.sections, declarations=self.registry.declarations())

    def probe(self, peer: Any) -> Any:
        """The backup's firmware_version reply; decides `send_ids` on the way."""
        digest_first = self.ours is not None
        found = compact_probe(peer, self.item_ids, self.view.store.conf_dir) if digest_first else None
        early = self._build_early if self.full and self.fast else None
        self.peer_probe = found or probe(peer, self.item_ids if digest_first else None, capabilities=not digest_first,
                                         while_waiting=early)
        if digest_first and found is None:
            remember_peer(self.view.store.conf_dir, peer.url, stock=not self.peer_probe.extensions)
        self._decide(peer)
        return self.peer_probe.firmware

    def _learn_capabilities(self, peer: Any) -> None:
        """Digest-first left them out of the probe; ask now that something is to be sent."""
        found = self.peer_probe
        if found is None or found.capabilities is not None or not found.extensions or not self.fast:
            return
        try:
            caps = peer.call("hasync.capabilities")
        except RemoteFault:
            return
        found.capabilities = caps if isinstance(caps, dict) else None

    def _decide(self, peer: Any) -> None:
        assert self.peer_probe is not None
        if self.ours is None:
            return
        if self.peer_probe.digests is None:
            self.note = "the backup offers no hasync.digest: every item is sent"
            return
        try:
            theirs, _unknown = digestmod.parse_digest_reply(self.peer_probe.digests)
        except HaError as exc:
            self.note = f"every item is sent: {exc}"
            return
        try:
            last = snapshot.load(self.view.store.conf_dir)
        except HaError:
            last = None
        pushed = last.items if last is not None and last.target == peer.url else {}
        send, same = [], []
        self.theirs = theirs
        for item_id in self.item_ids:
            ours, current = self.ours.get(item_id), theirs.get(item_id)
            record = pushed.get(item_id)
            if ours is not None and (current == ours or (
                    record is not None and record.digest == ours and record.backup_digest
                    and record.backup_digest == current)):
                same.append(item_id)
            else:
                send.append(item_id)
        self.send_ids, self.unchanged = send, same
        # unchanged items the snapshot does not describe yet (first sync, another target, older
        # opnsense-ha): recorded along with this sync so diff/check have a basis for them too
        self.stale = [i for i in same if i not in pushed or pushed[i].digest != self.ours.get(i)]

    def probe_note(self) -> str:
        parts = []
        if self.peer_probe is not None and self.peer_probe.capabilities is not None:
            parts.append("fast path offered" if self.peer_probe.fast_path else "no fast path (compatible XML-RPC)")
        elif self.peer_probe is not None and not self.peer_probe.extensions:
            parts.append("stock backup (no hasync.* methods): compatible XML-RPC")
        if self.ours is not None and self.peer_probe is not None and self.peer_probe.digests is not None:
            parts.append(f"{len(self.send_ids)} of {len(self.item_ids)} items differ")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)

    @property
    def sections(self) -> list[str]:
        return self.registry.sections_for(self.send_ids)

    @property
    def uses_fast_path(self) -> bool:
        if not (self.fast and self.peer_probe is not None and self.peer_probe.fast_path):
            return False
        # an agent that cannot apply our self_address/swap rules gets the compatible payload instead
        return self.peer_probe.offers(PERNODE_FEATURE) or not self.registry.declarations().rewriting(self.sections)

    def payload(self) -> dict[str, Any]:
        """The compatible payload of `send_ids` (sent on the compatible path; kept in the snapshot)."""
        if self._payload is None:
            self._payload = payload_for_items(self.view.root, self.registry, self.send_ids)
        return self._payload

    @property
    def record_ids(self) -> list[str]:
        """The items the snapshot records after this sync: those sent and the stale unchanged ones."""
        return [i for i in self.item_ids if i in self.send_ids or i in self.stale]

    def record_payload(self) -> dict[str, Any]:
        if not self.stale:
            return self.payload()
        if self._record_payload is None:
            self._record_payload = payload_for_items(self.view.root, self.registry, self.record_ids)
        return self._record_payload

    def record_unchanged(self, peer: Any, warnings: list[str]) -> None:
        """Nothing was sent: still describe stale items in the snapshot (no request needed)."""

        if not self.stale:
            return
        try:
            snapshot.record(self.view.store.conf_dir, self.registry, self.stale, self.record_payload(), peer.url,
                            {i: self.theirs[i] for i in self.stale if i in self.theirs}, digests=self.ours)
        except (HaError, OSError) as exc:
            warnings.append(f"the snapshot of this sync was not recorded ({exc})")

    def top_keys(self) -> list[str]:
        if self._payload is not None:
            return list(self._payload)
        return list(dict.fromkeys(section.split(".")[0] for section in check_sections(self.sections)))

    def dry_run(self, peer: Any) -> str:
        self._learn_capabilities(peer)
        if self.uses_fast_path:
            blob = self._blob()  # with --full, the one built during the probe
            return (f"would send {len(self.send_ids)} items by the fast path, {blob.compressed} bytes "
                    f"({blob.size} inflated); nothing sent")
        size = len(xmlrpc.dumps_request(RESTORE_METHOD, [self.payload()]))
        return f"would send {size} bytes; nothing sent"

    def _prepare_record(self, target: str) -> None:
        """What the snapshot records: payload form, digests and the compressed values, all
        computed while the backup merges (inside the merge request's `while_waiting`); written
        once the merge is confirmed. Never raises: the merge's reply must still be read."""
        try:
            payload = self.record_payload()
            ours = self.ours
            known = {i: ours[i] for i in self.record_ids} if ours and all(i in ours for i in self.record_ids) else None
            # the snapshot computes the digests we lack (while its gzip runs beside)
            self.prepared = snapshot.prepare(self.view.store.conf_dir, self.registry, self.record_ids, payload,
                                             target, digests=known)
            self.record_digests = {i: record.digest for i, record in self.prepared.records.items()
                                   if i in self.record_ids}
        except Exception as exc:  # recorded the plain way afterwards, which reports it
            log.info("snapshot not prepared during the merge: %s", exc)

    def send(self, peer: Any) -> str:
        self._learn_capabilities(peer)

        def prepare() -> None:  # the snapshot's share of the work, done while the backup merges
            self._prepare_record(peer.url)

        if self.uses_fast_path:
            blob = self.blob = self._blob()
            self.transfer = "fast path"
            # (only an agent of ours offers the fast path, so its hasync.digest can come along)
            self.digests_asked = True
            as_sent = self.peer_probe is not None and self.peer_probe.offers(AS_SENT_FEATURE)
            reply, self.backup_digests = send_blob(peer, blob, self.record_ids, while_waiting=prepare,
                                                   as_sent=as_sent)
            if as_sent and reply is True:
                self._resolve_as_sent(peer, str(blob.param["sha256"]))
        else:
            payload = self.payload()
            self.transfer = "XML-RPC"
            reply = peer.call(RESTORE_METHOD, [payload], while_waiting=prepare)
        detail = describe(self.blob) if self.blob is not None else "merged"
        if reply is not True:
            raise HaError(f"backup did not confirm the merge (answered {str(reply)[:100]!r})")
        return detail

    def _resolve_as_sent(self, peer: Any, token: str) -> None:
        """The backup's digest reply with the items it named "as sent" given our own digests of
        what we sent (`digest.resolve_as_sent`), kept to vouch for them; an item it names by other
        sections than ours (another version's registry) is asked for plainly."""
        claimed = self.backup_digests.get("as_sent") if isinstance(self.backup_digests, dict) else None
        if not isinstance(claimed, dict) or not claimed:
            return

        def own(item_id: str) -> str:
            known = (self.record_digests or self.ours or {}).get(item_id)
            return known or digestmod.item_digest(digestmod.value_item_value(
                self.record_payload(), self.registry.get(item_id).sections, copy_values=False), self.registry)

        try:
            resolved = digestmod.resolve_as_sent(self.backup_digests, self.registry, own)
            items = resolved.get("items") if isinstance(resolved, dict) else None
            if not isinstance(items, dict):
                return
            self.vouched = {i: str(items[i]) for i in claimed if i in items}
            self.vouch_token = token
            rest = [i for i in claimed if i not in items]
            if rest:
                more, _ = digestmod.parse_digest_reply(peer.call(DIGEST_METHOD, [rest]))
                items.update(more)
            self.backup_digests = resolved
        except HaError as exc:  # the snapshot then records what the reply had
            log.info("the backup's digests named as sent were not resolved: %s", exc)

    def reload_filter(self, peer: Any, while_waiting: Callable[[], None] | None = None) -> Any:
        """`opnsense.filter_configure` after the merge; with the digests we vouch for in the same
        request (`filter_configure_vouching`) when the backup named items as sent."""
        if self.vouched:
            return filter_configure_vouching(peer, self.vouch_token, self.vouched, while_waiting=while_waiting)
        return peer.call("opnsense.filter_configure", while_waiting=while_waiting)

    def nothing(self) -> str:
        return (f"all {len(self.item_ids)} items match the backup's digests: nothing sent, the backup's config "
                "is not touched")
