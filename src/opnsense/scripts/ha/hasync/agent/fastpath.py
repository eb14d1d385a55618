"""The backup side of the fast path and the agent's read cache of config.xml.

`FastPathAgent` answers `hasync.restore_sections_xml` (the wire form is `wire.sections`): it
decodes the request into the very payload the compatible call would carry and hands it to the
handler of `opnsense.restore_config_section`, so the merge, lock, revision, history write and
reconfiguration are the same. `ConfigCache` keeps the parsed config.xml and per-item digests
between writes, so logins, `hasync.digest`, `hasync.capabilities` and `hasync.sync_probe` do not
re-parse a config that has not changed.

After a fast-path merge the primary asks for the digests of what it sent. Where the merge wrote
a section byte for byte as the primary declared it (`MergeReport.as_sent_points`), the digest is
the primary's own: the agent answers "as sent" for those items instead of computing them
(`protocol.AS_SENT_FEATURE`). The primary vouches for them with its filter reload
(`protocol.VOUCH_METHOD`, `ConfigCache.vouch`); what it does not vouch for the agent computes
once the reply is out and no other request is in flight (`ConfigCache.fill_claims`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from hasync.agent.hasync_methods import item_ids_argument
from hasync.agent.lockout import accounts_copy
from hasync.agent.server import CallContext, Dispatcher
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.config.tree import GraftedPayload
from hasync.core.errors import ConfigError, MethodFault
from hasync.core.fileio import RACY_WINDOW, file_key
from hasync.core.memory import gc_paused
from hasync.payload import digest as digestmod
from hasync.payload.merge import MergeReport
from hasync.payload.parts import PayloadParts
from hasync.wire import xmlrpc
from hasync.wire.discovery import PROBE_METHOD
from hasync.wire.protocol import AS_SENT_FEATURE, FAST_PATH_FEATURE, PERNODE_FEATURE, RESTORE_METHOD, VOUCH_METHOD
from hasync.wire.sections import MAX_INFLATED, METHOD, Decoded
from hasync.wire.streamed import decode_streamed

log = logging.getLogger("hasync.fastpath")

_HEX64 = re.compile(r"[0-9a-f]{64}")

@dataclass
class FastPathAgent:
    """The backup side of the fast path: decode, rebuild the payload, hand it to the merge."""

    dispatcher: Dispatcher
    max_inflated: int = MAX_INFLATED
    features: set[str] = field(default_factory=lambda: {FAST_PATH_FEATURE})
    # called once a merge went through (its reply not sent yet): `register` passes the cache's
    # digest warm-up here; what it returns runs once the reply is out (`CallContext.after_reply`)
    after_merge: Callable[[Decoded], Callable[[Callable[[], None]], None] | None] | None = None
    # this agent's declared-local rules (their text): the primary's sections count as sent only
    # when it prunes the same paths from its digests (None: never)
    local_rules: frozenset[str] | None = None

    def register(self) -> None:
        self.dispatcher.register(METHOD, self.restore_sections_xml)

    def restore_sections_xml(self, argument: Any, context: CallContext) -> Any:
        decoded = decode_streamed(argument, self.max_inflated)
        merge = self.dispatcher.methods.get(RESTORE_METHOD)
        if merge is None:
            raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: this agent has no {RESTORE_METHOD}")
        log.debug("fast path: %d sections, %d bytes inflated, from %s@%s", len(decoded.sections), decoded.size,
                  context.username, context.remote_addr)
        context.kept_until_sent.append(decoded)
        payload = decoded.payload
        if self.local_rules is None or decoded.local_rules != self.local_rules:
            # its digests would prune other paths than ours: nothing is as sent
            if isinstance(payload, GraftedPayload):
                payload.sent = None
            elif isinstance(payload, PayloadParts):
                payload.as_sent = False
        result = merge(payload, context)
        if self.after_merge is not None:
            try:
                later = self.after_merge(decoded)
                if later is not None:
                    context.after_reply.append(later)
            except Exception as exc:  # the merge is done and written: never answer it with a fault
                # the type only: a message could quote a config value, and logs carry no secrets
                log.warning("digests after the fast-path merge failed (%s); they are computed on request",
                            type(exc).__name__)
        return result

class ConfigCache:
    """The agent's parsed config.xml and per-item digests, between writes.

    Why: every request authenticates against config.xml, and `hasync.digest`/`capabilities`
    read it too. Parsing a 50 MB config costs ~0.6 s and digesting it seconds, which would make
    every no-op sync as slow as a full one. An entry is valid while the file's identity (device,
    inode, size, mtime, ctime) is unchanged; an entry taken while the file was younger than
    `RACY_WINDOW` is also checked by content hash until the file is older (two writes in one
    timestamp tick with the same size would look unchanged otherwise; git's "racily clean").

    A writer (a merge, a rollback) takes the cached tree under config.xml's exclusive lock
    (`take`, through `ConfigStore.take_parsed`) and changes it instead of parsing the file again
    (at 20 MB a parse and freeing the old tree cost ~0.2 s); what it writes comes back through
    `adopt`. So the full tree is read only under this cache's lock (`digests`, `capabilities`,
    or holding `lock`), and logins, which run beside a merge, read `accounts`, a copy of their own.

    A merge usually changes a few items: the digests of the others carry over to the tree it
    writes (`note_merged`), so the primary's request for them right after the merge costs only
    the items that changed.
    """

    def __init__(self, store: ConfigStore, registry: SyncItemRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.lock = threading.RLock()
        self._key: tuple[int, ...] | None = None
        self._content: str | None = None  # sha256 of the bytes, while the entry is racy
        self._root: etree._Element | None = None
        self._accounts: etree._Element | None = None
        self._digests: dict[str, str] = {}
        self._capabilities: dict[str, Any] | None = None
        self.loads = 0  # how often config.xml was parsed (tests use it)
        # A writer's notes between `take` and `adopt` (writers come one at a time, under
        # config.xml's exclusive lock, and only they touch these): the digests of the tree `take`
        # handed out, and the tree a merge is about to write with the section paths it left as
        # they were (`note_merged`).
        self._taken_digests: dict[str, str] = {}
        self._merged: tuple[etree._Element, MergeReport] | None = None
        # Items whose digests the primary has (`MergeReport.as_sent_points`) and this entry does
        # not have yet: item id -> its sections, and the request they were sent in.
        self._claims: dict[str, tuple[str, ...]] = {}
        self._claims_token = ""
        self._published_accounts: tuple[tuple[int, ...], etree._Element] | None = None  # (`accounts`)
        self._reading: etree._Element | None = None  # the tree `fill_claims` reads unlocked
        store.written = self.adopt
        store.take_parsed = self.take

    def _valid(self) -> bool:
        key = file_key(self.store.config_path)
        if key is None or key != self._key:
            return False
        if self._content is not None:
            if self.store.content_sha256() != self._content:
                return False
            if self.clock() - key[3] / 1e9 > RACY_WINDOW:
                self._content = None  # any later write gets a later mtime
        return True

    def _refresh(self) -> None:
        """Parse the current file into a new entry (the file is read once, under its lock)."""
        self._clear()
        before = file_key(self.store.config_path)
        data = self.store.read_bytes()
        try:
            root = parse_config_bytes(data, str(self.store.config_path))
        except ConfigError:
            # broken: the store's own load restores from history; nothing is cached then
            self._root = self.store.load()
            self.loads += 1
            return
        self.loads += 1
        after = file_key(self.store.config_path)
        self._root = root
        if before is not None and before == after:
            self._key = before
            young = self.clock() - before[3] / 1e9 <= RACY_WINDOW
            self._content = hashlib.sha256(data).hexdigest() if young else None

    def recover(self) -> None:
        """`ConfigStore.recover` for the agent's start (temp files swept, a broken file restored
        from history, under the exclusive lock), keeping the tree it parsed as the entry where the
        file is still what was parsed: the start then parses config.xml once, not twice (each
        parse of a 20 MB config leaves heap behind that the process never gives back)."""
        with self.lock:
            self._clear()
            root, key, content = self.store.recover_entry()
            self.loads += 1
            if key is not None:
                self._root, self._key = root, key
                self._content = content if self.clock() - key[3] / 1e9 <= RACY_WINDOW else None

    def _clear(self) -> None:
        self._key, self._content, self._root, self._accounts = None, None, None, None
        self._digests, self._capabilities = {}, None
        self._claims, self._claims_token = {}, ""

    def adopt(self, root: etree._Element, content: str) -> None:
        """The store just wrote `root` into a file whose sha256 is `content` (its lock is held):
        keep that tree, no re-parse.

        Never waits for the cache: a reader holding it may be waiting for the file lock the
        writer holds, and both would wait forever. A busy cache simply stays stale (its key no
        longer matches) and re-reads later.
        """
        merged, taken = self._merged, self._taken_digests
        self._merged, self._taken_digests = None, {}
        if not self.lock.acquire(blocking=False):
            return
        try:
            self._clear()
            key = file_key(self.store.config_path)
            if key is None:
                return
            self._root, self._key = root, key
            young = self.clock() - key[3] / 1e9 <= RACY_WINDOW
            self._content = content if young and not self.store.stamped_past(key[3], file_key) else None
            if merged is not None and merged[0] is root:  # the tree `take` gave, merged as noted
                unchanged = set(merged[1].unchanged_points)
                self._digests = {item_id: value for item_id, value in taken.items()
                                 if set(self.registry.get(item_id).sections) <= unchanged}
            if merged is not None and merged[0] is root and merged[1].as_sent_token:
                sent = set(merged[1].as_sent_points)
                self._claims = {item.id: tuple(item.sections) for item in self.registry.resolve(self.registry.ids())
                                if item.id not in self._digests and set(item.sections) <= sent}
                self._claims_token = merged[1].as_sent_token if self._claims else ""
        finally:
            self.lock.release()

    def note_merged(self, root: etree._Element, report: MergeReport) -> None:
        """For a writer holding config.xml's exclusive lock, about to write the merged `root`: the
        items whose sections are all among `report.unchanged_points` keep the digest they had
        when `take` handed the tree out (if it did: a tree the writer parsed itself has none); the
        items whose sections are all among `report.as_sent_points` are the primary's to digest
        (`claims`), for any tree."""
        self._merged = (root, report)

    def take(self, locked_sha256: Callable[[], str]) -> etree._Element | None:
        """For a writer holding config.xml's exclusive lock: the cached tree if it is the file as
        it is now (`locked_sha256` hashes the file through the writer's handle, for a young
        entry's content check), else None. The entry is emptied either way: the tree is the writer's to
        change, and a writer that fails leaves the next reader a fresh parse of the untouched file.

        Never waits for the cache (as `adopt`): a reader holding it may be waiting for the file
        lock the writer holds. The writer then parses the file itself and the reader keeps its tree;
        so too while `fill_claims` reads the tree without the lock (the entry stays then).
        """
        self._taken_digests, self._merged = {}, None
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if self._reading is not None and self._reading is self._root:
                return None  # `fill_claims` reads it: the writer parses the file, the entry stays
            root, key, content, digests = self._root, self._key, self._content, self._digests
            self._clear()
            if root is None or key is None or file_key(self.store.config_path) != key:
                return None
            if content is not None and locked_sha256() != content:
                return None
            self._taken_digests = digests
            return root
        finally:
            self.lock.release()

    def root(self) -> etree._Element:
        """The config tree as of now, for reading only and only while holding `lock` (a writer
        may take it and change it as soon as the lock is free)."""
        with self.lock:
            if self._root is None or not self._valid():
                self._refresh()
            assert self._root is not None
            return self._root

    def accounts(self) -> etree._Element:
        """The users and groups of config.xml as of now (`lockout.accounts_copy`), all a login
        reads (`auth.verify_credentials`): a copy made once per version of the file, which no
        writer ever changes, so logins need not wait for a merge.

        Nor for the cache's lock, once the copy is published with the file's identity: a login
        then costs a stat, even while the lock is held for seconds of digests (a probe's, or
        those computed after a merge's reply, `fill_claims`). Only an entry past the racy window
        is published: any later write gives the file another identity."""
        published = self._published_accounts  # one tuple, replaced whole: safe to read unlocked
        if published is not None and published[0] == file_key(self.store.config_path):
            return published[1]
        with self.lock:
            root = self.root()
            if self._accounts is None:
                self._accounts = accounts_copy(root)
            if self._key is not None and self._content is None:
                self._published_accounts = (self._key, self._accounts)
            return self._accounts

    def digests(self, item_ids: Sequence[str],
                known: Mapping[etree._Element, dict[str, Any]] | None = None) -> tuple[dict[str, str], list[str]]:
        """Per-item canonical digests (`digest.digest` of `digest.backup_item_values`) and unknown ids.

        `known`: conversions of elements of the cached tree at hand already (`tree.Grafts.moved`).
        """

        with self.lock:
            root = self.root()
            wanted = [i for i in item_ids if i in self.registry and i not in self._digests]
            if wanted:
                fresh, _ = digestmod.backup_item_digests(root, self.registry, wanted, known)
                if self._key is not None:
                    self._digests.update(fresh)
            else:
                fresh = {}
            unknown = list(dict.fromkeys(i for i in item_ids if i not in self.registry))
            answer = {i: self._digests.get(i) or fresh[i] for i in dict.fromkeys(item_ids) if i in self.registry}
            return answer, unknown

    def claims(self, token: str, item_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Of `item_ids`, those the merge of request `token` wrote as the primary sent them and
        whose digests this entry lacks, with their sections: the primary's digests are theirs.
        Call it holding `lock` together with `digests` for the rest, so both describe one tree."""
        with self.lock:
            self.root()  # validates the entry: a file changed since drops the claims with it
            if not token or token != self._claims_token:
                return {}
            return {i: self._claims[i] for i in item_ids if i in self._claims and i not in self._digests}

    def vouch(self, token: str, digests: Mapping[str, str]) -> list[str]:
        """Keep the primary's digests of items its merge `token` wrote as sent (`claims`): the
        bytes are proven the primary's, the digest of them is its computation (a primary that
        lied would mislead itself only, and only until config.xml changes). Any other item, or
        another request's, is refused. The ids kept."""
        with self.lock:
            self.root()
            if not token or token != self._claims_token:
                return []
            kept = [i for i, value in digests.items() if i in self._claims and i not in self._digests
                    and isinstance(value, str) and _HEX64.fullmatch(value)]
            for item_id in kept:
                self._digests[item_id] = digests[item_id]
                del self._claims[item_id]
            if not self._claims:
                self._claims_token = ""
            return kept

    def fill_claims(self, known: Mapping[etree._Element, dict[str, Any]] | None = None,
                    pause: Callable[[], None] | None = None) -> None:
        """Compute the digests `claims` stood in for (the agent does it once the merge's reply is
        out), so the next probe finds them. `known`: the merge's moved records (`tree.Grafts.moved`),
        valid for the tree the claims belong to, which the claims being there proves: any writer
        that takes the tree, or a change of the file, empties them.

        Computed without holding `lock` (a login or probe may need it meanwhile): `take` leaves
        the tree being read alone, and the digests are kept only if it is still the entry's.
        `pause` is called before each item (the agent waits there while other requests run)."""
        with self.lock:
            self.root()
            root, token = self._root, self._claims_token
            pending = [item_id for item_id in self._claims if item_id not in self._digests]
            if not pending or root is None:
                self._claims, self._claims_token = {}, ""
                return
            self._reading = root
        fresh: dict[str, str] = {}
        try:
            for item_id in pending:
                if pause is not None:
                    pause()
                fresh.update(digestmod.backup_item_digests(root, self.registry, [item_id], known)[0])
        finally:
            with self.lock:
                self._reading = None
                if self._root is root and self._claims_token == token and self._key is not None:
                    self._digests.update(fresh)
                    self._claims, self._claims_token = {}, ""

    def capabilities(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            self.root()  # validates the entry
            if self._capabilities is None or self._key is None:
                reply = compute()
                if self._key is None:
                    return reply
                self._capabilities = reply
            return self._capabilities

def _probe_ids(argument: Any) -> list[str]:
    """The item ids of a probe: one comma-separated string (the shortest form on the wire)."""
    if not isinstance(argument, str) or len(argument) > 64 * 1024:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{PROBE_METHOD} expects the item ids as one comma-separated string")
    ids = [part.strip() for part in argument.split(",") if part.strip()]
    if not ids:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{PROBE_METHOD}: no item ids")
    return list(dict.fromkeys(ids))

def _warm_digests(cache: ConfigCache, decoded: Decoded) -> Callable[[Callable[[], None]], None] | None:
    """Digest, right after a fast-path merge, the items it merged: the primary asks for exactly
    these next (the snapshot of what the backup holds now). Done here because the records the
    merge moved in whole are still at hand as dicts (`tree.Grafts.moved`): those subtrees need
    no second conversion (at 20 MB ~0.2 s of the digests' ~0.6 s).

    Items the merge wrote as sent (`ConfigCache.claims`) are left for later: the primary has
    their digests. The function returned computes them, once the reply is out."""
    payload = decoded.payload
    if isinstance(payload, PayloadParts):
        known: dict[etree._Element, dict[str, Any]] | None = payload.moved
        token = payload.token if payload.as_sent else ""
    else:
        known = payload.grafts.moved if isinstance(payload, GraftedPayload) else None
        token = payload.sent.token if isinstance(payload, GraftedPayload) and payload.sent is not None else ""
    sent = set(decoded.sections)
    ids = [item.id for item in cache.registry.resolve(cache.registry.ids()) if set(item.sections) <= sent]
    with cache.lock:
        claimed = cache.claims(token, ids)
        rest = [i for i in ids if i not in claimed]
        if rest:
            cache.digests(rest, known)
    if not claimed:
        return None

    def fill(pause: Callable[[], None]) -> None:
        with gc_paused():  # (as the request that merged: a million short-lived objects, no cycles)
            cache.fill_claims(known, pause)

    return fill


def register(dispatcher: Dispatcher, features: set[str] | None = None,
             cache: ConfigCache | None = None) -> FastPathAgent:
    """Add `METHOD` to an agent's dispatcher; `features` (the capabilities set) gets `FAST_PATH_FEATURE`.

    With a `cache`, `hasync.digest` and `hasync.capabilities` answer from it (same functions,
    same replies, no re-parse and no re-digest while config.xml is unchanged); a merge takes the
    cached tree (`ConfigCache.take`), and the tree it writes becomes the cache.
    """
    agent = FastPathAgent(dispatcher)
    agent.register()
    if features is not None:
        features.update((FAST_PATH_FEATURE, PERNODE_FEATURE))
    if cache is not None:
        agent.after_merge = lambda decoded: _warm_digests(cache, decoded)
        agent.local_rules = frozenset(rule.text for rule in cache.registry.declarations().local)

        if "hasync.digest" in dispatcher.methods:
            if features is not None:
                features.add(AS_SENT_FEATURE)

            def digest(argument: Any, _context: CallContext) -> dict[str, Any]:
                token: Any = ""
                if isinstance(argument, dict):  # {"items": [...], "as_sent": token} (AS_SENT_FEATURE)
                    token = argument.get("as_sent")
                    argument = argument.get("items", [])
                ids = item_ids_argument(argument, "hasync.digest") or cache.registry.ids()
                with cache.lock:  # the claims and the digests of one tree
                    claimed = cache.claims(token if isinstance(token, str) else "", ids)
                    known, unknown = cache.digests([i for i in ids if i not in claimed])
                return digestmod.digest_reply(known, unknown, claimed)

            dispatcher.register("hasync.digest", digest)

            def vouch(argument: Any, _context: CallContext) -> int:
                if not isinstance(argument, dict) or not isinstance(argument.get("as_sent"), str) or \
                        not isinstance(argument.get("items"), dict):
                    raise MethodFault(xmlrpc.INVALID_PARAMS, f"{VOUCH_METHOD} expects {{as_sent, canonical, "
                                      "algorithm, items}")
                if argument.get("canonical") != digestmod.CANONICAL_FORM or \
                        argument.get("algorithm") != digestmod.ALGORITHM:
                    raise MethodFault(xmlrpc.INVALID_PARAMS, f"{VOUCH_METHOD}: another canonical form than "
                                      f"this agent's {digestmod.CANONICAL_FORM!r}/{digestmod.ALGORITHM!r}")
                return len(cache.vouch(argument["as_sent"], argument["items"]))

            dispatcher.register(VOUCH_METHOD, vouch)
            def sync_probe(argument: Any, context: CallContext) -> bytes:
                ids = _probe_ids(argument)
                firmware = dispatcher.methods["opnsense.firmware_version"]([], context)
                known, unknown = cache.digests(ids)
                document = {"firmware": firmware, "canonical": digestmod.CANONICAL_FORM,
                            "algorithm": digestmod.ALGORITHM, "items": known, "unknown": unknown,
                            "features": sorted(features or ())}
                return zlib.compress(json.dumps(document, separators=(",", ":")).encode(), 9)

            dispatcher.register(PROBE_METHOD, sync_probe)
        original_caps = dispatcher.methods.get("hasync.capabilities")
        if original_caps is not None:
            def capabilities(argument: Any, context: CallContext) -> Any:
                return cache.capabilities(lambda: original_caps(argument, context))

            dispatcher.register("hasync.capabilities", capabilities)
    return agent
