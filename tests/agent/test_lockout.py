"""The lock-out guard: a sync that would take the sync account's access away is refused by the
backup, on the fast path and on OPNsense's own XML-RPC call, and changes nothing there.

Real processes: the agent is `opnsense-ha serve` over TLS, the primary is `opnsense-ha sync`.
The control for every refusal is `--allow-lockout`, which turns the guard off for one sync: the
merge then goes through and the next call is refused exactly as issue 13 reproduced it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from passlib.hash import sha512_crypt

from hasync.agent import lockout
from hasync.config.store import ConfigStore
from hasync.wire.protocol import LOCKOUT_MARK
from support.agents import cli, start_agent, stop
from support.lockout import REFUSALS, edit_primary, leave_group, new_password, sync_user
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair


def sha(conf_dir: Path) -> str:
    return hashlib.sha256((conf_dir / "config.xml").read_bytes()).hexdigest()


def sync_json(pair: Pair, *extra: str) -> tuple[int, dict[str, Any]]:
    done = cli(pair.primary, "sync", "--json", *extra)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("path", ["fast", "compatible"])
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_locking_sync_is_refused_and_changes_nothing(pair: Pair, agent: str, case: str, path: str) -> None:
    change, message = REFUSALS[case]
    edit_primary(pair, change)
    before = sha(pair.backup)
    code, result = sync_json(pair, *(["--no-fast-path"] if path == "compatible" else []))
    assert code == 3, result
    assert result["status"] == "lockout"
    assert message in result["message"]
    transfer = [s for s in result["steps"] if s["step"] == "restore_config_section"]
    assert transfer and transfer[0]["ok"] is False
    assert sha(pair.backup) == before  # nothing written, not even a revision stamp
    # the account still works: a later call (status talks to the backup) authenticates
    status = cli(pair.primary, "status", "--json")
    assert "Authentication failed" not in status.stdout + status.stderr


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_allow_lockout_goes_through_and_the_lockout_happens(pair: Pair, agent: str, case: str) -> None:
    """The control: without the guard the merge is written and the backup then refuses the primary."""
    change, _message = REFUSALS[case]
    edit_primary(pair, change)
    before = sha(pair.backup)
    code, result = sync_json(pair, "--allow-lockout")
    assert code == 0, result
    assert any("no longer accepts the sync credentials" in w for w in result["warnings"])
    assert sha(pair.backup) != before
    code, again = sync_json(pair, "--full")
    assert code == 1 and "Authentication failed" in again["message"]


def test_an_account_change_that_keeps_access_goes_through(pair: Pair, agent: str) -> None:
    def add_user(root: etree._Element) -> None:
        system = root.find("system")
        assert system is not None
        user = etree.SubElement(system, "user")
        etree.SubElement(user, "name").text = "auditor"
        etree.SubElement(user, "uid").text = "2001"
        etree.SubElement(user, "password").text = "$2y$10$" + "x" * 53

    edit_primary(pair, add_user)
    code, result = sync_json(pair)
    assert code == 0, result
    assert b"<name>auditor</name>" in (pair.backup / "config.xml").read_bytes()


# --- the explanation, one account property at a time (no network: the decision is auth's) -------------


def fixture_root(pair: Pair) -> etree._Element:
    return ConfigStore(pair.primary).load()


def expire(root: etree._Element) -> None:
    etree.SubElement(sync_user(root), "expires").text = "01/31/2020"


def disable(root: etree._Element) -> None:
    etree.SubElement(sync_user(root), "disabled").text = "1"


def drop_group(root: etree._Element) -> None:
    for group in root.iterfind("system/group"):
        if group.findtext("name") == "hasync":
            group.getparent().remove(group)  # type: ignore[union-attr]


def group_loses_privilege(root: etree._Element) -> None:
    for priv in root.iterfind("system/group/priv"):
        if priv.text == "page-xmlrpclibrary":
            priv.text = "page-dashboard-all"


EXPLAINED = {
    "expired": (expire, "user 'hasync' would be expired (expires 01/31/2020)"),
    "disabled": (disable, "user 'hasync' would be disabled"),
    "group deleted": (drop_group, "user 'hasync' would no longer have page-xmlrpclibrary (group 'hasync' deleted)"),
    "group privilege": (group_loses_privilege,
                        "user 'hasync' would no longer have page-xmlrpclibrary (group 'hasync' no longer grants it)"),
}


@pytest.mark.parametrize("case", sorted(EXPLAINED))
def test_explain_names_what_the_account_loses(pair: Pair, case: str) -> None:
    change, loss = EXPLAINED[case]
    before = fixture_root(pair)
    after = fixture_root(pair)
    assert lockout.explain(before, after, SYNC_USER, SYNC_PASSWORD, now=time.time()) is None
    change(after)
    problem = lockout.explain(lockout.accounts_copy(before), after, SYNC_USER, SYNC_PASSWORD, now=time.time())
    assert problem == f"refused: after this merge {loss}; {LOCKOUT_MARK}"


def test_an_api_key_that_disappears_is_named_by_its_prefix_only(pair: Pair) -> None:
    key, secret = "K" * 40, "api-secret-value"
    secret_hash = sha512_crypt.hash(secret)
    before = fixture_root(pair)
    etree.SubElement(sync_user(before), "apikeys").text = f"{key}|{secret_hash}\n"
    after = fixture_root(pair)  # the primary's accounts do not have the key
    problem = lockout.explain(before, after, key, secret, now=time.time())
    assert problem == (f"refused: after this merge API key '{key[:8]}...' of user 'hasync' would no longer exist; "
                       f"{LOCKOUT_MARK}")
    assert secret not in problem and secret_hash not in problem and key not in problem


# --- diff flags it before any sync ---------------------------------------------------------------------


def test_diff_flags_a_locking_change_before_any_sync(pair: Pair, agent: str) -> None:
    edit_primary(pair, leave_group)
    before = sha(pair.backup)
    done = cli(pair.primary, "diff", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert report["lockout"] == REFUSALS["group"][1]
    assert [item["id"] for item in report["items"] if item["lockout"]] == ["users"]
    text = cli(pair.primary, "diff", "--color", "never")
    assert f"LOCK-OUT: the backup would refuse this sync: {REFUSALS['group'][1]}" in text.stdout
    assert sha(pair.backup) == before
    # ... and the sync it warned about is indeed refused
    code, result = sync_json(pair)
    assert code == 3 and result["message"].endswith(REFUSALS["group"][1])


def test_diff_does_not_flag_an_account_change_that_keeps_access(pair: Pair, agent: str) -> None:
    """The control: a users change that leaves the sync account alone differs but is no lock-out."""
    def rename_admins(root: etree._Element) -> None:
        for description in root.iterfind("system/group/description"):
            description.text = "changed"

    edit_primary(pair, rename_admins)
    done = cli(pair.primary, "diff", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["differences"] >= 1
    assert report["lockout"] == "" and all(item["lockout"] == "" for item in report["items"])


def test_diff_flags_it_from_the_snapshot_of_a_stock_backup(pair: Pair) -> None:
    proc, url = start_agent(pair.backup, "--tls-cert", str(pair.cert_file), "--tls-key", str(pair.key_file),
                            "--services-dir", str(pair.services_dir), "--state-dir", str(pair.state_dir),
                            "--no-extensions")
    try:
        pair.point_primary_at(url.removesuffix("xmlrpc.php"))
        assert cli(pair.primary, "sync").returncode == 0
        edit_primary(pair, new_password)
        report = json.loads(cli(pair.primary, "diff", "--json").stdout)
        assert report["source"] == "snapshot"
        assert report["lockout"] == REFUSALS["password"][1]
    finally:
        assert stop(proc) == 0
