"""The few conventions between two opnsense-ha nodes beyond OPNsense's own XML-RPC.

Both ends need them (the primary sends, the agent reads), so they live here rather than in
either side: the names of the fast path's features, two request headers, the text a lock-out
refusal ends with, by which a primary recognises it even through the compatible path, and how
both ends set up a connection's socket (`no_delay`). (Here rather
than in `wire.sections` also because a primary reads them in every sync, and that module, the
fast path's encoder, is loaded only by a sync that sends.)
"""

from __future__ import annotations

import contextlib
import socket

#: The capability by which an agent offers the fast path (`wire.sections`).
FAST_PATH_FEATURE = "restore_sections_xml"
#: The capability of an agent that applies the primary's self_address/swap rules sent along.
PERNODE_FEATURE = "pernode-1"
#: The capability of an agent that answers `hasync.digest` {"items": [...], "as_sent": <the merge's
#: document sha256>} with "as_sent": {item: [sections]} for the items its merge wrote byte for byte
#: as the primary declared them (`wire.sections` ``section_sha256``): the primary's digests are theirs.
AS_SENT_FEATURE = "digest-as-sent-1"
#: With that feature: the primary's own digests of the items named "as sent", which the agent keeps
#: for those items instead of computing them: {"as_sent": token, "canonical", "algorithm", "items"}.
#: The primary sends it in one `system.multicall` with its `opnsense.filter_configure`.
VOUCH_METHOD = "hasync.as_sent_digests"
#: OPNsense's merge method: the compatible path calls it, the fast path ends in its handler.
RESTORE_METHOD = "opnsense.restore_config_section"
#: The agent's per-item digests of its config.xml (`payload.digest`).
DIGEST_METHOD = "hasync.digest"

#: Request header (value "1") by which `sync --allow-lockout` asks the agent to merge anyway.
ALLOW_LOCKOUT_HEADER = "X-Opnsense-Ha-Allow-Lockout"
#: Request header of a merge that is to be confirmed: "<seconds> <id>" (`sync --confirm`).
CONFIRM_HEADER = "X-Opnsense-Ha-Confirm"
#: Every lock-out refusal ends with this.
LOCKOUT_MARK = "the primary would be locked out of this backup"


def no_delay(sock: socket.socket) -> None:
    """Send each write at once (``TCP_NODELAY``), at both ends of an exchange. An HTTP head and
    its body go out as two writes (two TLS records), and under Nagle's algorithm the second waits
    until the peer acknowledges the first, which a peer with nothing to send delays (40 ms on
    Linux): each merge's reply reached the primary ~44 ms after the agent wrote it, a fifth of a
    2 MB sync. (A socket that is not TCP has no such delay and keeps its options.)"""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
