"""Edits of the primary's accounts that would lock the sync account out of the backup, with the
refusal each must get (shared by the lock-out and the commit-confirm tests)."""

from __future__ import annotations

from collections.abc import Callable

import bcrypt
from lxml import etree

from hasync.config.store import ConfigStore
from support.nodes import SYNC_USER, Pair

Edit = Callable[[etree._Element], None]

def edit_primary(pair: Pair, change: Edit) -> None:
    with ConfigStore(pair.primary).transaction("test: edit accounts", username="root@test") as root:
        change(root)

def sync_user(root: etree._Element) -> etree._Element:
    for user in root.iterfind("system/user"):
        if user.findtext("name") == SYNC_USER:
            return user
    raise AssertionError("fixture has no sync user")

def leave_group(root: etree._Element) -> None:
    for member in root.iterfind("system/group/member"):
        if member.text == "2000":
            member.getparent().remove(member)  # type: ignore[union-attr]

def new_password(root: etree._Element) -> None:
    node = sync_user(root).find("password")
    assert node is not None
    node.text = bcrypt.hashpw(b"a-new-password", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)

def delete_user(root: etree._Element) -> None:
    user = sync_user(root)
    user.getparent().remove(user)  # type: ignore[union-attr]

REFUSALS = {
    "group": (leave_group, "refused: after this merge user 'hasync' would no longer have page-xmlrpclibrary "
                           "(removed from group 'hasync'); the primary would be locked out of this backup"),
    "password": (new_password, "refused: after this merge user 'hasync' would get a password that no longer "
                               "matches the one the primary syncs with (hasync.password); the primary would be "
                               "locked out of this backup"),
    "deleted": (delete_user, "refused: after this merge user 'hasync' would no longer exist; the primary would be "
                             "locked out of this backup"),
}
