"""Authentication matrix for the backup agent (hasync.auth), against fixtures/auth/config.xml.

The plaintext credentials below are test-only values; fixtures/auth/README.md says how their
hashes were made (bcrypt `$2y$`, SHA-512 crypt from openssl and glibc, not from the code under test).
Every refusal has a control: the same account with the one refusing attribute changed logs in.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import shutil
import subprocess
import sys
import threading
from copy import deepcopy
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from hasync.agent import auth
from hasync.agent.auth import (
    REASON_BAD_HEADER,
    REASON_BAD_PASSWORD,
    REASON_DISABLED,
    REASON_EXPIRED,
    REASON_MISSING_PRIVILEGE,
    REASON_NO_HEADER,
    REASON_THROTTLED,
    REASON_UNKNOWN_USER,
    Authenticator,
    Credentials,
    LoginThrottle,
    parse_basic_auth,
    verify_credentials,
)
from hasync.config.store import ConfigStore
from support.paths import FIXTURES, PACKAGE_ROOT, shared_path

PASSWORDS = {
    "root": "Root-Test-Pass-1",
    "syncuser": "sync user pass: with colon",
    "groupsync": "group-sync-pw",
    "commagroup": "comma-group-pw",
    "nopriv": "no-priv-pw",
    "disableduser": "disabled-pw",
    "expireduser": "expired-pw",
    "futureuser": "future-pw",
    "enabledzero": "enabled-zero-pw",
    "groupnameonly": "groupname-only-pw",
    "apiowner": "api-owner-pw",
    "legacyapi": "legacy-api-pw",
    "noprivapi": "nopriv-api-pw",
    "ünïcødé": "pässwörd-✓",
    "longpw": "L" * 80,
}
KEYS = {
    "new1": "Yx4PBFtde0mmF8yBfpa23E63VDazfgMvmnml9Ztoelb22bFQyoJzxndLeSrtPSU3y/z0GdNGBrobeA77",
    "new2": "gf4IKsDpvfHWbDBFIyaRis/79gYCLI2WUYJvCgHE/3B8QPY4UU2KBWCJlWoo5zvn3XlwM6xaCFEeM9W1",
    "legacy": "EgKi5d2lLNXQ4puryEd6oimND4tme+XCqIt3aHa7OzGy3M7FNnh08oubHTu6nLwMYzu6+BmATKrj9VNJ",
    "nopriv": "Vmp8dJBbnFAdjTFSmGbapw9PdOBrt6i1+FJgA8Qnd+R4Q1SNxd6MBXM0/Q+rhPGubCGDih28KDX+PTSO",
    "disabled": "GcS9PWRm9K23ecDcsc/KtWeE+C1ocfs9gSHQwpOfIRMLh7LsnsnZnGliW3Yzap5POiQba+pJSCr1k8CN",
}
SECRETS = {
    "new1": "VZA17b58eG6KUriIqQ8eMNZf8P6W0GvTlC+TZV5iR9ewKKOzk4e9eI1z5zotZ8sWN8FuAXnCogHo01wb",
    "new2": "fP1xn3tn2omdEfztjGCDbQNGdf/Hr7PPA8I6jHLoM2jpwNS056dmpSPPxsc0mgs0pK0NEw3Az99C8bEQ",
    "legacy": "S9wxXzxi0ekAo/Ph0IflRfMVD3ALWODCiLjCwi8R9jIr6EZQr8jxPLwzJ8N2Pp0K3xnbGJpvkzPG0wnO",
    "nopriv": "yEP3bigHUknR2W61sTKYzPW3cLqYdeUwdSPkqX4fyO8JptmzU90mz4k3c/xo/Rmr1gRz9W9CTZTXv/hn",
    "disabled": "1RcYqJo7b5f8gLEV8X15PnxNh8aYj6wKkljbo7EPYop2Ddp1tEcj412V2mWvSyQ1eesCpOqRptKS95SF",
}
KEY_OWNERS = {"new1": "apiowner", "new2": "apiowner", "legacy": "legacyapi"}

# 2026-06-01 12:00 local time: after expireduser's 01/31/2020, before futureuser's 12/31/2099.
NOW = dt.datetime(2026, 6, 1, 12, 0).timestamp()


class FakeClock:
    """Wall time and monotonic time under test control; sleep() just advances both."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@pytest.fixture(scope="module")
def root() -> etree._Element:
    return ConfigStore(FIXTURES / "auth").load()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def user_el(root: etree._Element, name: str) -> etree._Element:
    found = auth.find_user(root, name)
    assert found is not None, name
    return found


# ------------------------------------------------------------------------------------------
# the matrix
# ------------------------------------------------------------------------------------------

ACCEPTED_USERS = [
    ("root", "admins group (uid 0 in its member list) has page-all"),
    ("syncuser", "own priv page-xmlrpclibrary; password contains ': '"),
    ("groupsync", "group privilege, repeated member/priv elements"),
    ("commagroup", "group privilege, comma-separated member/priv (newer MVC form)"),
    ("enabledzero", "<disabled>0</disabled> is enabled"),
    ("futureuser", "expiry in the future"),
    ("ünïcødé", "UTF-8 name and password"),
    ("longpw", "80-character password"),
]


@pytest.mark.parametrize(("name", "why"), ACCEPTED_USERS)
def test_accepted_users(root: etree._Element, name: str, why: str) -> None:
    result = verify_credentials(root, name, PASSWORDS[name], now=NOW)
    assert result.ok, (why, result)
    assert result.username == name
    assert result.reason == ""
    assert not result.via_apikey


@pytest.mark.parametrize(("name", "why"), ACCEPTED_USERS)
def test_wrong_password_is_refused_for_every_accepted_user(root: etree._Element, name: str, why: str) -> None:
    result = verify_credentials(root, name, "?" + PASSWORDS[name], now=NOW)
    assert not result.ok
    assert result.reason == REASON_BAD_PASSWORD


def test_long_password_follows_php_bcrypt_72_byte_rule(root: etree._Element) -> None:
    # PHP's bcrypt looks at the first 72 bytes only; the same password with another tail matches there too.
    same_prefix = "L" * 72 + "different tail"
    assert verify_credentials(root, "longpw", same_prefix, now=NOW).ok
    other_prefix = "L" * 71 + "M" + "L" * 8
    assert verify_credentials(root, "longpw", other_prefix, now=NOW).reason == REASON_BAD_PASSWORD


def test_real_php_bcrypt_hash_from_opnsense_verifies() -> None:
    """The root hash of OPNsense's own test config was made by PHP (`$2y$`); its password is 'opnsense'."""
    path = shared_path("fixtures", "real", "opnsense-core-AclConfig__config.xml")
    real = etree.parse(str(path)).getroot()
    result = verify_credentials(real, "root", "opnsense", now=NOW)
    assert result.ok and result.username == "root"
    assert verify_credentials(real, "root", "opnsense1", now=NOW).reason == REASON_BAD_PASSWORD
    # the users without any privilege in that file are refused for the privilege, not the password
    test1 = auth.find_user(real, "test1")
    assert test1 is not None and not auth.has_xmlrpc_privilege(real, test1)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nopriv", REASON_MISSING_PRIVILEGE),
        ("groupnameonly", REASON_MISSING_PRIVILEGE),
        ("disableduser", REASON_DISABLED),
        ("expireduser", REASON_EXPIRED),
        ("noprivapi", REASON_MISSING_PRIVILEGE),
    ],
)
def test_refused_users_with_the_right_password(root: etree._Element, name: str, reason: str) -> None:
    result = verify_credentials(root, name, PASSWORDS[name], now=NOW)
    assert not result.ok
    assert result.reason == reason
    # a wrong password is reported as such even for these accounts
    assert verify_credentials(root, name, "wrong", now=NOW).reason == REASON_BAD_PASSWORD


def test_controls_each_refusal_is_caused_by_its_attribute(root: etree._Element) -> None:
    tree = deepcopy(root)
    # disabled -> enabled
    user_el(tree, "disableduser").find("disabled").text = "0"  # type: ignore[union-attr]
    assert verify_credentials(tree, "disableduser", PASSWORDS["disableduser"], now=NOW).ok
    # expired -> moved into the future
    user_el(tree, "expireduser").find("expires").text = "01/31/2030"  # type: ignore[union-attr]
    assert verify_credentials(tree, "expireduser", PASSWORDS["expireduser"], now=NOW).ok
    # System: High Availability -> plus the XMLRPC library privilege
    etree.SubElement(user_el(tree, "nopriv"), "priv").text = "page-xmlrpclibrary"
    assert verify_credentials(tree, "nopriv", PASSWORDS["nopriv"], now=NOW).ok
    # groupname alone does nothing; membership in the group's member list does
    admins = tree.find("./system/group[name='admins']")
    assert admins is not None
    etree.SubElement(admins, "member").text = "2008"
    assert verify_credentials(tree, "groupnameonly", PASSWORDS["groupnameonly"], now=NOW).ok


def test_group_privilege_comes_from_the_group_not_the_user(root: etree._Element) -> None:
    tree = deepcopy(root)
    group = tree.find("./system/group[name='hasyncers']")
    assert group is not None
    for priv in group.findall("priv"):
        if priv.text == "page-xmlrpclibrary":
            group.remove(priv)
    assert verify_credentials(tree, "groupsync", PASSWORDS["groupsync"], now=NOW).reason == REASON_MISSING_PRIVILEGE
    comma = tree.find("./system/group[name='commagroup']/member")
    assert comma is not None
    comma.text = "2009,2012"  # commagroup's uid 2003 removed from the comma list
    assert verify_credentials(tree, "commagroup", PASSWORDS["commagroup"], now=NOW).reason == REASON_MISSING_PRIVILEGE


def test_unknown_user(root: etree._Element) -> None:
    result = verify_credentials(root, "nobody", "whatever", now=NOW)
    assert (result.ok, result.reason) == (False, REASON_UNKNOWN_USER)
    assert "nobody" not in result.username  # an unknown name may be a misplaced password


def test_account_without_password_hash_is_refused(root: etree._Element) -> None:
    assert verify_credentials(root, "nohash", "", now=NOW).reason == REASON_BAD_PASSWORD
    assert verify_credentials(root, "nohash", "anything", now=NOW).reason == REASON_BAD_PASSWORD


def test_unknown_user_costs_a_bcrypt_verify(root: etree._Element, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = auth.bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(auth.bcrypt, "checkpw", counting)
    verify_credentials(root, "nobody", "whatever", now=NOW)
    assert len(calls) == 1 and calls[0].startswith(b"$2b$10$")
    calls.clear()
    verify_credentials(root, "syncuser", "whatever", now=NOW)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------
# API keys
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["new1", "new2", "legacy"])
def test_api_key_both_storage_forms(root: etree._Element, which: str) -> None:
    result = verify_credentials(root, KEYS[which], SECRETS[which], now=NOW)
    assert result.ok, result
    assert result.username == KEY_OWNERS[which]
    assert result.via_apikey


@pytest.mark.parametrize("which", ["new1", "new2", "legacy"])
def test_api_key_wrong_secret_and_swapped_pairs(root: etree._Element, which: str) -> None:
    assert verify_credentials(root, KEYS[which], SECRETS[which][:-1], now=NOW).reason == REASON_BAD_PASSWORD
    other = "new2" if which != "new2" else "legacy"
    assert verify_credentials(root, KEYS[which], SECRETS[other], now=NOW).reason == REASON_BAD_PASSWORD
    owner = KEY_OWNERS[which]
    # the secret is no password for the owner, and the owner's password is no secret for the key
    assert not verify_credentials(root, owner, SECRETS[which], now=NOW).ok
    assert not verify_credentials(root, KEYS[which], PASSWORDS[owner], now=NOW).ok


def test_api_key_inherits_owner_state(root: etree._Element) -> None:
    assert verify_credentials(root, KEYS["disabled"], SECRETS["disabled"], now=NOW).reason == REASON_DISABLED
    assert verify_credentials(root, KEYS["nopriv"], SECRETS["nopriv"], now=NOW).reason == REASON_MISSING_PRIVILEGE
    tree = deepcopy(root)
    user_el(tree, "disableduser").find("disabled").text = ""  # type: ignore[union-attr]
    assert verify_credentials(tree, KEYS["disabled"], SECRETS["disabled"], now=NOW).ok


def test_every_api_key_is_compared(root: etree._Element, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert auth.find_api_key(root, KEYS["new1"]) is not None  # first key in the file
    assert len(calls) == len(KEYS)  # no early exit on a hit


def test_php_style_empty_salt_secret_is_in_the_fixture(root: etree._Element) -> None:
    """Guard the fixture itself: new2/legacy use PHP's `crypt($s, '$6$')` form with an empty salt."""
    owner = user_el(root, "apiowner")
    hashes = [h for _k, h in auth.iter_api_keys(owner)]
    assert any(h.startswith("$6$$") for h in hashes) and any(not h.startswith("$6$$") for h in hashes)


def sha512_backends() -> list[str]:
    from passlib.hash import sha512_crypt

    return [name for name in ("os_crypt", "builtin") if sha512_crypt.has_backend(name)]


@pytest.mark.parametrize("backend", sha512_backends())
def test_sha512_secrets_verify_with_every_passlib_backend(
    root: etree._Element, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.13 has no `crypt`, so passlib verifies `$6$` with its pure-Python code there: this
    runs that code (and the libc one, where present) against the fixture's glibc/openssl hashes."""
    from passlib.hash import sha512_crypt

    previous = sha512_crypt.get_backend()
    sha512_crypt.set_backend(backend)
    monkeypatch.setattr(auth, "_VERIFIED", {})  # no remembered success from another test
    try:
        for which in ("new1", "new2", "legacy"):
            assert verify_credentials(root, KEYS[which], SECRETS[which], now=NOW).ok, which
            assert not verify_credentials(root, KEYS[which], SECRETS[which][1:], now=NOW).ok, which
    finally:
        sha512_crypt.set_backend(previous)


def test_hash_verification_is_warning_free_in_a_fresh_interpreter(root: etree._Element) -> None:
    """`$2y$` and `$6$` in a new process with warnings as errors: no DeprecationWarning from
    passlib's `crypt` probe (3.11/3.12) and no passlib bcrypt-backend complaint on stderr."""
    bcrypt_hash = auth.bcrypt.hashpw(b"pw", auth.bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    sha_hash = next(h for key, h in auth.iter_api_keys(user_el(root, "apiowner")) if key == KEYS["new1"])
    code = ("import json, sys; from hasync.agent.auth import verify_hash as v; "
            "print([v(*p) for p in json.load(sys.stdin)])")
    pairs = [["pw", bcrypt_hash], [SECRETS["new1"], sha_hash], ["no", sha_hash]]
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], input=json.dumps(pairs),
        capture_output=True, text=True, timeout=60, cwd=PACKAGE_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True, False]"
    assert proc.stderr == ""


# ------------------------------------------------------------------------------------------
# expiry boundary
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires", "when", "expired"),
    [
        ("01/31/2020", dt.datetime(2020, 1, 31, 23, 59), False),  # valid through the whole day
        ("01/31/2020", dt.datetime(2020, 2, 1, 0, 1), True),
        ("2020-01-31", dt.datetime(2020, 1, 31, 12, 0), False),
        ("2020-01-31", dt.datetime(2020, 2, 1, 12, 0), True),
        ("someday", dt.datetime(2020, 1, 1, 0, 0), True),  # unreadable: refused, as PHP's strtotime fails
        ("", dt.datetime(2090, 1, 1, 0, 0), False),
    ],
)
def test_expiry_boundary(root: etree._Element, expires: str, when: dt.datetime, expired: bool) -> None:
    tree = deepcopy(root)
    user_el(tree, "expireduser").find("expires").text = expires  # type: ignore[union-attr]
    result = verify_credentials(tree, "expireduser", PASSWORDS["expireduser"], now=when.timestamp())
    assert result.ok is (not expired)
    if expired:
        assert result.reason == REASON_EXPIRED


# ------------------------------------------------------------------------------------------
# Authorization header
# ------------------------------------------------------------------------------------------


def test_parse_basic_auth_splits_at_the_first_colon() -> None:
    creds = parse_basic_auth(basic("syncuser", PASSWORDS["syncuser"]))
    assert creds == Credentials("syncuser", PASSWORDS["syncuser"])
    assert parse_basic_auth("basic " + base64.b64encode(b"a:b").decode()) == Credentials("a", "b")
    assert parse_basic_auth("  Basic   " + base64.b64encode(b"a:b:c").decode() + " ") == Credentials("a", "b:c")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer " + base64.b64encode(b"a:b").decode(),
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"a:b").decode()[:-1],  # broken padding
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b":password-only").decode(),
        "Basic " + base64.b64encode(b"user-only:").decode(),
        "Basic " + base64.b64encode(b"user:\xff\xfe").decode(),  # not UTF-8
        "Basic " + base64.b64encode(b"us\x00er:pw").decode(),
        "Basic " + base64.b64encode(b"a:" + b"x" * 9000).decode(),  # oversized
    ],
)
def test_malformed_headers_are_failures_not_exceptions(header: str | None) -> None:
    assert parse_basic_auth(header) is None


@given(st.text(max_size=300))
def test_parse_basic_auth_never_raises_on_text(header: str) -> None:
    parse_basic_auth(header)
    parse_basic_auth("Basic " + header)


@given(st.binary(max_size=200))
def test_parse_basic_auth_never_raises_on_decoded_bytes(raw: bytes) -> None:
    result = parse_basic_auth("Basic " + base64.b64encode(raw).decode())
    if result is not None:
        assert f"{result.username}:{result.password}".encode() == raw


def test_credentials_repr_hides_password() -> None:
    creds = Credentials("root", PASSWORDS["root"])
    assert PASSWORDS["root"] not in repr(creds) and PASSWORDS["root"] not in str(creds)


# ------------------------------------------------------------------------------------------
# Authenticator (what the agent calls) and throttling
# ------------------------------------------------------------------------------------------


class CountingLoader:
    def __init__(self, root: etree._Element) -> None:
        self.root = root
        self.calls = 0

    def __call__(self) -> etree._Element:
        self.calls += 1
        return self.root


def make_auth(
    root: etree._Element, clock: FakeClock | None = None, **throttle: float
) -> tuple[Authenticator, CountingLoader, FakeClock]:
    clock = clock or FakeClock()
    loader = CountingLoader(root)
    limits = {"max_failures": 5, "window": 60.0, **throttle}
    authenticator = Authenticator(
        loader, throttle=LoginThrottle(int(limits["max_failures"]), limits["window"], clock=clock), clock=clock
    )
    return authenticator, loader, clock


def test_authenticator_header_matrix(root: etree._Element) -> None:
    a, _loader, _clock = make_auth(root)
    ok = a(basic("groupsync", PASSWORDS["groupsync"]), "192.0.2.10")
    assert ok.ok and ok.username == "groupsync"
    key = a(basic(KEYS["legacy"], SECRETS["legacy"]), "192.0.2.10")
    assert key.ok and key.username == "legacyapi" and key.via_apikey
    assert a(None, "192.0.2.11").reason == REASON_NO_HEADER
    assert a("Basic %%%", "192.0.2.12").reason == REASON_BAD_HEADER
    assert a(basic("nopriv", PASSWORDS["nopriv"]), "192.0.2.13").reason == REASON_MISSING_PRIVILEGE


def test_result_is_usable_as_agent_verdict(root: etree._Element) -> None:
    """The lead's agent reads .ok, .username and .reason from what the auth function returns."""
    a, _loader, _clock = make_auth(root)
    result = a(basic("root", PASSWORDS["root"]), "192.0.2.1")
    assert (result.ok, result.username, result.reason) == (True, "root", "")


def test_throttling_after_five_failures_other_address_unaffected(root: etree._Element) -> None:
    a, loader, clock = make_auth(root)
    attacker, other = "198.51.100.7", "198.51.100.8"
    for _ in range(5):
        assert a(basic("root", "guess"), attacker).reason == REASON_BAD_PASSWORD
        clock.advance(1)
    loads = loader.calls
    # the right password is refused now, and the config is not even read (no bcrypt work)
    refused = a(basic("root", PASSWORDS["root"]), attacker)
    assert (refused.ok, refused.reason) == (False, REASON_THROTTLED)
    assert loader.calls == loads
    # another source still gets in
    assert a(basic("root", PASSWORDS["root"]), other).ok
    # after the window the attacker's address works again
    clock.advance(60)
    assert a(basic("root", PASSWORDS["root"]), attacker).ok


def test_throttle_window_slides(root: etree._Element) -> None:
    a, _loader, clock = make_auth(root)
    src = "203.0.113.5"
    for _ in range(5):  # failures at t = 0, 10, 20, 30, 40
        a(basic("root", "guess"), src)
        clock.advance(10)
    assert a.throttle.is_throttled(src)  # t = 50
    clock.advance(10.5)  # t = 60.5: the failure of t = 0 left the window
    assert not a.throttle.is_throttled(src)
    assert a.throttle.failures(src) == 4
    a(basic("root", "guess"), src)  # fifth failure inside the window again
    assert a.throttle.is_throttled(src)
    # throttled attempts do not extend the lockout: at t = 70.5 the failure of t = 10 leaves
    for _ in range(20):
        a(basic("root", "guess"), src)
    clock.advance(10)
    assert not a.throttle.is_throttled(src)


def test_throttle_counts_malformed_headers_and_unknown_users(root: etree._Element) -> None:
    a, _loader, _clock = make_auth(root)
    src = "203.0.113.9"
    for header in [None, "Basic ###", basic("nobody", "x"), basic("nopriv", PASSWORDS["nopriv"]), basic("root", "x")]:
        assert not a(header, src).ok
    assert a(basic("root", PASSWORDS["root"]), src).reason == REASON_THROTTLED


def test_throttle_groups_ipv6_by_64_and_maps_ipv4(root: etree._Element) -> None:
    a, _loader, _clock = make_auth(root)
    for _ in range(5):
        a(basic("root", "x"), "2001:db8:1:2::1")
    assert a(basic("root", PASSWORDS["root"]), "2001:db8:1:2::ffff").reason == REASON_THROTTLED
    assert a(basic("root", PASSWORDS["root"]), "2001:db8:1:3::1").ok
    for _ in range(5):
        a(basic("root", "x"), "::ffff:192.0.2.50")
    assert a(basic("root", PASSWORDS["root"]), "192.0.2.50").reason == REASON_THROTTLED


def test_throttle_configurable_limits(root: etree._Element) -> None:
    a, _loader, clock = make_auth(root, max_failures=2, window=5.0)
    a(basic("root", "x"), "192.0.2.1")
    assert a(basic("root", PASSWORDS["root"]), "192.0.2.1").ok
    a(basic("root", "x"), "192.0.2.1")
    assert a(basic("root", PASSWORDS["root"]), "192.0.2.1").reason == REASON_THROTTLED
    clock.advance(5.0)
    assert a(basic("root", PASSWORDS["root"]), "192.0.2.1").ok


def test_throttle_memory_is_bounded() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(5, 60, clock=clock, max_sources=3)
    for i in range(10):
        throttle.record_failure(f"192.0.2.{i}")
        clock.advance(0.1)
    assert len(throttle._failures) == 3
    assert throttle.failures("192.0.2.9") == 1 and throttle.failures("192.0.2.0") == 0


def test_throttle_is_thread_safe() -> None:
    """Concurrent failures from many threads, while entries expire, are all counted exactly."""
    clock = FakeClock()
    throttle = LoginThrottle(10**9, 1e9, clock=clock)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def worker() -> None:
            for _ in range(500):
                throttle.record_failure("192.0.2.77")
                throttle.is_throttled("192.0.2.77")

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert throttle.failures("192.0.2.77") == 8 * 500


def test_throttle_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        LoginThrottle(0, 60)
    with pytest.raises(ValueError):
        LoginThrottle(5, 0)


# ------------------------------------------------------------------------------------------
# logging: one line per failure/throttle, user and address named, never a password or secret
# ------------------------------------------------------------------------------------------


def _auth_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hasync.auth" and r.levelno >= logging.INFO]


def test_each_failure_logs_one_line_with_user_and_address(
    root: etree._Element, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hasync.auth")
    a, _loader, _clock = make_auth(root)
    a(basic("syncuser", "wrong"), "192.0.2.33")
    lines = _auth_lines(caplog)
    assert len(lines) == 1
    assert "syncuser" in lines[0] and "192.0.2.33" in lines[0] and REASON_BAD_PASSWORD in lines[0]
    caplog.clear()
    a(basic("syncuser", PASSWORDS["syncuser"]), "192.0.2.33")
    assert _auth_lines(caplog) == []  # success is not a warning
    for _ in range(4):
        a(basic("syncuser", "wrong"), "192.0.2.33")
    caplog.clear()
    a(basic("syncuser", PASSWORDS["syncuser"]), "192.0.2.33")
    lines = _auth_lines(caplog)
    assert len(lines) == 1 and "throttled" in lines[0] and "syncuser" in lines[0] and "192.0.2.33" in lines[0]


def test_no_password_or_secret_ever_reaches_logs_or_results(
    root: etree._Element, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, _loader, clock = make_auth(root)
    results = []
    attempts: list[tuple[str, str]] = []
    for name, password in PASSWORDS.items():
        attempts += [(name, password), (name, password + "!"), (password, name)]  # also fields swapped
    for which in KEYS:
        attempts += [(KEYS[which], SECRETS[which]), (KEYS[which], SECRETS[which] + "!"), (SECRETS[which], KEYS[which])]
        attempts += [(SECRETS[which], SECRETS[which])]
    for i, (user, password) in enumerate(attempts):
        results.append(a(basic(user, password), f"10.1.{i // 200}.{i % 200}"))
        clock.advance(0.5)
    # and once more while throttled, from one address
    for _ in range(7):
        results.append(a(basic(SECRETS["new1"], SECRETS["new1"]), "10.9.9.9"))
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(repr(r) for r in results)
    assert any(r.ok for r in results) and any(not r.ok for r in results)  # the matrix ran both ways
    for secret in [*PASSWORDS.values(), *SECRETS.values()]:
        assert secret not in text, secret
    for key in KEYS.values():  # the key is half a credential: only a prefix is logged
        assert key not in text
    # control: the capture does contain what we expect to see, so the check above can fail
    assert "syncuser" in text and "10.9.9.9" in text and "apikey " + KEYS["new1"][:8] in text


def test_loggable_name_masks_unknown_names(root: etree._Element) -> None:
    assert auth.loggable_name(root, "root") == "root"
    assert auth.loggable_name(root, KEYS["new1"]) == "apikey " + KEYS["new1"][:8] + "... of apiowner"
    masked = auth.loggable_name(root, SECRETS["new1"])
    assert masked.startswith("<unknown name #") and masked.endswith(", 80 characters>")
    assert SECRETS["new1"][:8] not in masked
    # the same unknown name maps to the same stand-in, a different one to another
    assert auth.loggable_name(root, "someone") == auth.loggable_name(root, "someone")
    assert auth.loggable_name(root, "someone") != auth.loggable_name(root, "someone2")
    assert "\n" not in auth.loggable_name(root, "bad\nname")


def test_store_loaded_config_is_reread_per_attempt(tmp_path: Path) -> None:
    """Users that arrive with a sync take effect on the next request (load_root per attempt)."""
    shutil.copy(FIXTURES / "auth" / "config.xml", tmp_path / "config.xml")
    store = ConfigStore(tmp_path)
    clock = FakeClock()
    a = Authenticator(store.load, throttle=LoginThrottle(100, 60, clock=clock), clock=clock)
    assert a(basic("nopriv", PASSWORDS["nopriv"]), "192.0.2.1").reason == REASON_MISSING_PRIVILEGE
    with store.transaction("grant xmlrpc to nopriv") as cfg:
        user = auth.find_user(cfg, "nopriv")
        assert user is not None
        etree.SubElement(user, "priv").text = "page-xmlrpclibrary"
    assert a(basic("nopriv", PASSWORDS["nopriv"]), "192.0.2.1").ok
