"""The lock-out guard: a merge must never take the sync account's own access away.

A sync can carry the backup's users and groups (item `users`). If it removes the sync account
from the group that grants `page-xmlrpclibrary`, changes its password under the one the primary
stores in `hasync.password`, disables, expires or deletes it (or drops its API key), the merge
itself succeeds and every later call is refused: the primary has locked itself out of its
backup, and only a console or GUI login there repairs it.

So before the merged config is written, the credentials of the request that carries the merge
are checked against the *merged* tree with the agent's own authenticator
(`auth.verify_credentials`: same users, keys, groups, privileges and expiry rules). If they no
longer open `/xmlrpc.php`, nothing is written and the fault names the account and what it
loses. The primary's `diff` runs the same check on its simulated merge (`diffing`), with the
credentials it would sync with, so the change is flagged before any sync.

`sync --allow-lockout` (header `ALLOW_LOCKOUT_HEADER` on the request) lets an administrator who
means it go through; the agent still logs what the merge took away.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from lxml import etree

from hasync.agent import auth
from hasync.core.errors import MergeError
from hasync.wire.protocol import LOCKOUT_MARK

log = logging.getLogger("hasync.lockout")



class LockoutRefused(MergeError):
    """The merge would lock the requesting account out; nothing was written."""


@dataclass(frozen=True)
class _Account:
    """What decides one login, read from a tree (secrets stay in the tree; only compared)."""

    user: etree._Element | None
    label: str  # "user 'x'" or "API key 'abcd1234...' of user 'x'"
    stored: str  # the password hash or API secret hash the presented secret is checked against


def _account(root: etree._Element, presented: str) -> _Account:
    user = auth.find_user(root, presented)
    if user is not None:
        return _Account(user, f"user '{presented}'", user.findtext("password", "").strip())
    hit = auth.find_api_key(root, presented)
    if hit is not None:
        owner = hit[0].findtext("name", "").strip()
        return _Account(hit[0], f"API key '{presented[:8]}...' of user '{owner}'", hit[1])
    return _Account(None, "", "")


def _granting(root: etree._Element, user: etree._Element) -> dict[str, set[str]]:
    """Where the user's xmlrpc privileges come from: {'' (own) or group name: privileges}."""
    sources: dict[str, set[str]] = {}
    own = set(auth.list_values(user, "priv")) & set(auth.XMLRPC_PRIVILEGES)
    if own:
        sources[""] = own
    uid = user.findtext("uid", "").strip()
    for group in root.findall("./system/group"):
        granted = set(auth.list_values(group, "priv")) & set(auth.XMLRPC_PRIVILEGES)
        if granted and uid and uid in auth.list_values(group, "member"):
            sources[group.findtext("name", "").strip()] = granted
    return sources


def _lost_privilege(before: etree._Element, after: etree._Element, was: etree._Element,
                    now_user: etree._Element) -> str:
    """'page-xmlrpclibrary (removed from group 'ha-sync')': what went and why."""
    had = _granting(before, was)
    privilege = "page-xmlrpclibrary" if any("page-xmlrpclibrary" in p for p in had.values()) else "page-all"
    uid = now_user.findtext("uid", "").strip()
    groups_after = {g.findtext("name", "").strip(): g for g in after.findall("./system/group")}
    why: list[str] = []
    for source in had:
        if source == "":
            why.append("the privilege was taken off the user itself")
            continue
        group = groups_after.get(source)
        if group is None:
            why.append(f"group '{source}' deleted")
        elif not uid or uid not in auth.list_values(group, "member"):
            why.append(f"removed from group '{source}'")
        else:
            why.append(f"group '{source}' no longer grants it")
    return privilege + (f" ({'; '.join(why)})" if why else "")


def explain(before: etree._Element, after: etree._Element, username: str, password: str, *,
            now: float) -> str | None:
    """None if `username`/`password` still open /xmlrpc.php on `after`; else what the account loses.

    `before` is the tree the request authenticated against (a full config or `accounts_copy`).
    The decision is `auth.verify_credentials` on `after`; `before` only serves the explanation.
    """
    result = auth.verify_credentials(after, username, password, now=now)
    if result.ok:
        return None
    was, then = _account(before, username), _account(after, username)
    label = was.label or then.label or "the sync account"
    if then.user is None:
        loss = f"{label} would no longer exist"
    elif result.reason == auth.REASON_BAD_PASSWORD:
        what = "secret" if label.startswith("API key") else "password"
        loss = (f"{label} would get a {what} that no longer matches the one the primary syncs with "
                "(hasync.password)")
    elif result.reason == auth.REASON_DISABLED:
        loss = f"{label} would be disabled"
    elif result.reason == auth.REASON_EXPIRED:
        loss = f"{label} would be expired (expires {then.user.findtext('expires', '').strip()})"
    elif result.reason == auth.REASON_MISSING_PRIVILEGE and was.user is not None:
        loss = f"{label} would no longer have {_lost_privilege(before, after, was.user, then.user)}"
    else:
        loss = f"{label} would no longer log in ({result.reason})"
    return f"refused: after this merge {loss}; {LOCKOUT_MARK}"


def lost_access(before: etree._Element, after: etree._Element, username: str, password: str, *,
                now: float) -> str | None:
    """`explain`, but only for credentials that do log in on `before`: the primary's `diff`
    simulates one item at a time on a partial tree, so only a change *made by the merge* counts
    (credentials that fail before it already fail today and are `check`'s business)."""
    if not username or not password or not auth.verify_credentials(before, username, password, now=now).ok:
        return None
    return explain(before, after, username, password, now=now)


def accounts_copy(root: etree._Element) -> etree._Element:
    """A small tree with copies of the users and groups: the 'before' of `explain` for a merge
    that changes `root` in place (a copy of the whole config would cost far more)."""
    mini = etree.Element(root.tag)
    system = etree.SubElement(mini, "system")
    for node in root.iterfind("system/*"):
        if node.tag in ("user", "group"):
            system.append(copy.deepcopy(node))
    return mini


def guard_merge(before: etree._Element, after: etree._Element, authorization: str | None, *,
                allow: bool, now: float, who: str) -> None:
    """Raise `LockoutRefused` if the request's credentials (its Authorization header) would not
    open /xmlrpc.php on the merged `after`. `allow` (sync --allow-lockout) logs and goes on.

    A merge without credentials (a local `apply-payload`) has no one to lock out.
    """
    credentials = auth.parse_basic_auth(authorization)
    if credentials is None:
        return
    problem = explain(before, after, credentials.username, credentials.password, now=now)
    if problem is None:
        return
    if allow:
        log.warning("merge from %s goes through despite a lock-out (--allow-lockout): %s", who,
                    problem.removeprefix("refused: "))
        return
    log.warning("merge from %s %s", who, problem)
    raise LockoutRefused(problem)
