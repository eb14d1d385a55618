"""HTTP basic-auth for the backup agent, checked against the backup's own config.xml.

It mirrors what OPNsense's `xmlrpc.php` accepts, so the same credentials work against a stock
backup and against ours:

* local users (`system.user[]`): bcrypt `$2y$` hashes (PHP's `password_hash`), refused when
  `<disabled>` is set or `<expires>` (mm/dd/yyyy) lies in the past (valid through that day, as
  in OPNsense's `Auth/Local.php`);
* then API key/secret pairs (`Auth/API.php`): the key acts as the user name, the secret as the
  password, the key maps to its owning user. Both storage forms are read: the newer text blob of
  `KEY|SECRET_HASH` lines and the older `<apikeys><item><key/><secret/></item></apikeys>`.
  Secrets are SHA-512 crypt (`$6$`, PHP `crypt($s, '$6$')`);
* privilege `page-xmlrpclibrary` or `page-all`, from the user's own `priv` plus the `priv` of
  every group whose `member` list holds the user's `uid`. Like OPNsense's ACL, a user's
  `<groupname>` element does not grant anything; membership is the group's `member` list. Newer
  configs store `member`/`priv` as one comma-separated element, older ones repeat the element:
  both are read.

Where OPNsense is weaker we are stricter, without changing what is accepted: the user/password
split follows RFC 7617 (first colon; PHP's `explode` cuts passwords containing a colon), secret
comparisons are constant-time, an unknown user costs a dummy bcrypt verify (so response time
does not reveal which users exist), and failed logins are throttled per source address.

Nothing here ever stores, returns or logs a password or secret; a presented name that is neither
a known user nor a known API key is logged only as a keyed digest, because people do paste
secrets into the user field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import bcrypt
from lxml import etree

from hasync.core.osiface import Clock, SystemClock
from hasync.core.php import php_truthy

# SHA-crypt comes from passlib (FreeBSD port security/py-passlib): its pure-Python backend also
# runs on Python 3.13, which has no `crypt` module. bcrypt is verified with the `bcrypt` package
# directly, never through passlib, whose bcrypt wrapper trips over bcrypt >= 4.1 (it reads a
# removed `__about__`). passlib 1.7.4 probes the stdlib `crypt` on import, which Python 3.11
# and 3.12 answer with a DeprecationWarning; that probe is passlib's business, not our users'.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="'crypt' is deprecated", category=DeprecationWarning)
    from passlib.hash import sha256_crypt, sha512_crypt

log = logging.getLogger("hasync.auth")

#: Either privilege opens `/xmlrpc.php` (ACL patterns `xmlrpc.php*` and `*`).
XMLRPC_PRIVILEGES: tuple[str, ...] = ("page-xmlrpclibrary", "page-all")

REASON_UNKNOWN_USER = "unknown user"
REASON_BAD_PASSWORD = "bad password"
REASON_DISABLED = "disabled"
REASON_EXPIRED = "expired"
REASON_MISSING_PRIVILEGE = "missing privilege page-xmlrpclibrary"
REASON_NO_HEADER = "missing Authorization header"
REASON_BAD_HEADER = "malformed Authorization header"
REASON_THROTTLED = "throttled"

#: Longest Authorization header we decode; a real one is well under 1 KiB.
MAX_HEADER_LENGTH = 8192
#: PHP's bcrypt (like every bcrypt) only uses the first 72 bytes; the `bcrypt` package refuses longer
#: input instead of truncating, so we truncate to keep PHP's behaviour.
BCRYPT_MAX_BYTES = 72

# bcrypt of a random string nobody knows, cost 10 like PHP's default: verified for unknown users so
# that "no such user" takes as long as "wrong password".
_DUMMY_BCRYPT = b"$2b$10$UfasczmQg2X9YK0CZYfUve5L6bfasistMXT2K52i2XX0yhnlqwWV2"

# Keys the digest that stands in for unknown user names in logs (see `_loggable_unverified`).
_LOG_DIGEST_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class Credentials:
    """A decoded basic-auth pair. `__repr__` hides the password so it never lands in a log."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class AuthResult:
    """Outcome of one login attempt; field names match the agent's `AuthVerdict` (ok, username, reason).

    `username` is the account that logged in (for an API key: the key's owner). On failure it is
    the presented name as safe to log (see `loggable_name`). `reason` is empty on success and
    meant for logs only: the client always sees OPNsense's plain `Authentication failed`.
    """

    ok: bool
    username: str
    reason: str = ""
    via_apikey: bool = False


# --------------------------------------------------------------------------------------------
# Authorization header
# --------------------------------------------------------------------------------------------


def parse_basic_auth(header: str | None) -> Credentials | None:
    """Decode `Authorization: Basic <base64(user:password)>`; None for anything malformed.

    Never raises: a hostile header is an authentication failure, not a server error.
    """
    if not header or len(header) > MAX_HEADER_LENGTH:
        return None
    parts = header.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    try:
        raw = base64.b64decode(parts[1].strip(), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, sep, password = text.partition(":")
    if not sep or not username or not password or "\x00" in text:
        return None
    return Credentials(username, password)


# --------------------------------------------------------------------------------------------
# Hash verification
# --------------------------------------------------------------------------------------------


# Successful verifications, keyed by the stored hash and a keyed digest of the password (the key
# is random per process; the password itself is never kept). bcrypt costs ~70 ms by design, and
# a sync is several requests, each authenticated: a no-op sync would spend most of its time here.
# Only successes are remembered, so a guess always pays the full cost; a changed password (a new
# stored hash) misses. Entries live VERIFIED_TTL seconds.
VERIFIED_TTL = 600.0
VERIFIED_MAX = 64
_VERIFIED: dict[tuple[str, bytes], float] = {}
_VERIFIED_KEY = secrets.token_bytes(32)
_VERIFIED_LOCK = threading.Lock()


def verify_hash(password: str, stored: str) -> bool:
    """Verify a password against a crypt(3)-style hash as PHP's `crypt`/`password_verify` would.

    bcrypt (`$2y$`, `$2a$`, `$2b$`) and SHA-512/SHA-256 crypt (`$6$`, `$5$`); anything else (empty,
    plain text, unknown scheme) is refused. The libraries compare in constant time.
    """
    key = (stored, hmac.new(_VERIFIED_KEY, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest())
    now = time.monotonic()
    with _VERIFIED_LOCK:
        seen = _VERIFIED.get(key)
    if seen is not None and now - seen < VERIFIED_TTL:
        return True
    ok = _verify_hash(password, stored)
    if ok:
        with _VERIFIED_LOCK:
            if len(_VERIFIED) >= VERIFIED_MAX:
                _VERIFIED.pop(min(_VERIFIED, key=_VERIFIED.__getitem__))
            _VERIFIED[key] = now
    return ok


def _verify_hash(password: str, stored: str) -> bool:
    try:
        if stored.startswith(("$2y$", "$2a$", "$2b$")):
            # `$2y$` is PHP's name for the fixed bcrypt that everyone else calls `$2b$`.
            normalised = ("$2b$" + stored[4:]) if stored.startswith("$2y$") else stored
            secret = password.encode("utf-8")[:BCRYPT_MAX_BYTES]
            return bcrypt.checkpw(secret, normalised.encode("ascii"))
        if stored.startswith("$6$"):
            return bool(sha512_crypt.verify(password, stored))
        if stored.startswith("$5$"):
            return bool(sha256_crypt.verify(password, stored))
    except (ValueError, TypeError, UnicodeError):
        return False
    return False


def _dummy_verify(password: str) -> None:
    """Spend what a real bcrypt verify spends, so unknown names are not revealed by timing."""
    with contextlib.suppress(ValueError):
        bcrypt.checkpw(password.encode("utf-8", "replace")[:BCRYPT_MAX_BYTES], _DUMMY_BCRYPT)


# --------------------------------------------------------------------------------------------
# Reading accounts from config.xml
# --------------------------------------------------------------------------------------------


def _text(node: etree._Element | None, tag: str) -> str:
    if node is None:
        return ""
    child = node.find(tag)
    return (child.text or "").strip() if child is not None else ""


def list_values(node: etree._Element, tag: str) -> list[str]:
    """Values of a repeated tag, also split on commas (newer OPNsense stores `a,b` in one element)."""
    values: list[str] = []
    for child in node.findall(tag):
        for part in (child.text or "").split(","):
            part = part.strip()
            if part:
                values.append(part)
    return values


def _users(root: etree._Element) -> list[etree._Element]:
    return root.findall("./system/user")


def find_user(root: etree._Element, username: str) -> etree._Element | None:
    """The `<user>` whose `<name>` equals `username` exactly (OPNsense names are case-sensitive)."""
    for user in _users(root):
        if _text(user, "name") == username:
            return user
    return None


def iter_api_keys(user: etree._Element) -> Iterator[tuple[str, str]]:
    """(key, secret hash) pairs of one user, from either storage form."""
    apikeys = user.find("apikeys")
    if apikeys is None:
        return
    items = apikeys.findall("item")
    if items:
        for item in items:
            key, secret = _text(item, "key"), _text(item, "secret")
            if key and secret:
                yield key, secret
        return
    for line in (apikeys.text or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) == 2 and parts[0] and parts[1]:
            yield parts[0], parts[1]


def find_api_key(root: etree._Element, key: str) -> tuple[etree._Element, str] | None:
    """(owning user, secret hash) for an API key; every key is compared, in constant time each."""
    found: tuple[etree._Element, str] | None = None
    presented = key.encode("utf-8")
    for user in _users(root):
        for stored_key, secret in iter_api_keys(user):
            if hmac.compare_digest(stored_key.encode("utf-8"), presented) and found is None:
                found = (user, secret)
    return found


def user_privileges(root: etree._Element, user: etree._Element) -> set[str]:
    """The user's own `priv` plus the `priv` of each group whose `member` list holds the user's uid."""
    privileges = set(list_values(user, "priv"))
    uid = _text(user, "uid")
    if uid:
        for group in root.findall("./system/group"):
            if uid in list_values(group, "member"):
                privileges.update(list_values(group, "priv"))
    return privileges


def has_xmlrpc_privilege(root: etree._Element, user: etree._Element) -> bool:
    return bool(user_privileges(root, user).intersection(XMLRPC_PRIVILEGES))


def is_disabled(user: etree._Element) -> bool:
    """PHP `!empty()` semantics: any value but '' and '0' disables (MVC stores `<disabled>0</disabled>`)."""
    return php_truthy(_text(user, "disabled"))


def _parse_expiry(value: str) -> dt.date | None:
    for fmt in ("%m/%d/%Y", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    return None


def is_expired(user: etree._Element, now: float) -> bool:
    """True when `<expires>` is set and its day has passed (local time), as OPNsense computes it.

    An unreadable date counts as expired: PHP's `strtotime` yields false there, which becomes
    1970-01-01, so OPNsense refuses such an account too (fail closed).
    """
    value = _text(user, "expires")
    if not value:
        return False
    day = _parse_expiry(value)
    if day is None:
        return True
    today = dt.datetime.fromtimestamp(now).date()
    return today > day


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def loggable_name(root: etree._Element, presented: str) -> str:
    """A form of the presented user name that is safe to put into a log line.

    Known users appear by name; API keys as their first 8 characters plus the owner; anything
    else as a keyed digest, since it might be a secret typed into the wrong field.
    """
    if find_user(root, presented) is not None:
        return presented
    hit = find_api_key(root, presented)
    if hit is not None:
        return _apikey_label(presented, _text(hit[0], "name"))
    return _loggable_unverified(presented)


def _apikey_label(key: str, owner: str) -> str:
    """An API key is half a credential: logs get its first 8 characters and the owner only."""
    return f"apikey {key[:8]}... of {owner}"


def verify_credentials(root: etree._Element, username: str, password: str, *, now: float) -> AuthResult:
    """Decide one login against a config.xml root (lxml element from `ConfigStore.load()`).

    The password is always verified before the account state is looked at, so a disabled or
    unprivileged account costs the same time as a good one. `now` is a Unix time for expiry.
    """
    user = find_user(root, username)
    via_apikey = False
    if user is not None:
        name = username
        stored = _text(user, "password")
    else:
        hit = find_api_key(root, username)
        if hit is None:
            _dummy_verify(password)
            return AuthResult(False, _loggable_unverified(username), REASON_UNKNOWN_USER)
        user, stored = hit
        via_apikey = True
        name = _apikey_label(username, _text(user, "name"))

    refusal = ""
    if is_disabled(user):
        refusal = REASON_DISABLED
    elif is_expired(user, now):
        refusal = REASON_EXPIRED
    elif not has_xmlrpc_privilege(root, user):
        refusal = REASON_MISSING_PRIVILEGE
    # Only a login that is going to succeed may be answered from the cache of earlier successes.
    # Any other attempt pays the full hash cost, so timing cannot confirm the password of a
    # disabled, expired or unprivileged account (which may still open the GUI).
    password_ok = (_verify_hash if refusal else verify_hash)(password, stored)
    if not password_ok:
        return AuthResult(False, name, REASON_BAD_PASSWORD, via_apikey)
    if refusal:
        return AuthResult(False, name, refusal, via_apikey)
    return AuthResult(True, _text(user, "name"), "", via_apikey)


# --------------------------------------------------------------------------------------------
# Throttling
# --------------------------------------------------------------------------------------------


def source_key(address: str) -> str:
    """Throttle bucket of a client address: IPv4 as is, IPv6 by /64 (one host owns a whole /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip), 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Failed logins per source address in a sliding window (default: 5 within 60 s).

    A throttled source is refused without checking its password, so a password guesser gets
    5 tries a minute and costs us no bcrypt work beyond that. Refused attempts do not count as
    failures themselves, so a misconfigured primary that keeps retrying gets through again once
    its old failures leave the window. Memory is bounded: at most `max_sources` addresses are
    tracked; the least recently failing one is forgotten first.
    """

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        clock: Clock | None = None,
        max_sources: int = 10000,
    ) -> None:
        if max_failures < 1 or window <= 0:
            raise ValueError("max_failures must be >= 1 and window > 0")
        self.max_failures = max_failures
        self.window = window
        self.max_sources = max_sources
        self._clock = clock or SystemClock()
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _expire(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def is_throttled(self, address: str) -> bool:
        key = source_key(address)
        with self._lock:
            times = self._expire(key, self._clock.monotonic())
            return times is not None and len(times) >= self.max_failures

    def record_failure(self, address: str) -> int:
        """Count one failure; returns the failures of this source inside the window."""
        key = source_key(address)
        with self._lock:
            now = self._clock.monotonic()
            times = self._expire(key, now)
            if times is None:
                if len(self._failures) >= self.max_sources:
                    oldest = min(self._failures, key=lambda k: self._failures[k][-1])
                    del self._failures[oldest]
                times = self._failures[key] = deque()
            times.append(now)
            return len(times)

    def failures(self, address: str) -> int:
        key = source_key(address)
        with self._lock:
            times = self._expire(key, self._clock.monotonic())
            return 0 if times is None else len(times)


# --------------------------------------------------------------------------------------------
# What the agent calls
# --------------------------------------------------------------------------------------------


class Authenticator:
    """Callable `(authorization_header, remote_address) -> AuthResult` for the agent.

    `load_root` is called once per attempt (pass `ConfigStore(...).load`), so users and keys that
    arrive with a sync take effect on the next request. Each failure and each throttled attempt
    logs one line on `hasync.auth` naming the user and the source address, never the password.
    """

    def __init__(
        self,
        load_root: Callable[[], etree._Element],
        *,
        throttle: LoginThrottle | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._load_root = load_root
        self._clock = clock or SystemClock()
        self.throttle = throttle if throttle is not None else LoginThrottle(clock=self._clock)
        # user names seen at the last config load: lets a throttled attempt (for which we do not
        # read config.xml at all) still name a known account in its log line.
        # They are listed once per tree (`_names_of`: its id()), not per request: a 20 MB config
        # has ~1,300 users (~2 ms), and a list gone stale costs only a log line.
        self._known_names: frozenset[str] = frozenset()
        self._names_of = 0

    def __call__(self, header: str | None, remote: str) -> AuthResult:
        return self.authenticate_header(header, remote)

    def authenticate_header(self, header: str | None, remote: str) -> AuthResult:
        """Check an `Authorization` header value (None when absent) from client address `remote`."""
        credentials = parse_basic_auth(header)
        if self.throttle.is_throttled(remote):
            return self._throttled(credentials.username if credentials else "", remote)
        if credentials is None:
            reason = REASON_NO_HEADER if not header else REASON_BAD_HEADER
            return self._failed(AuthResult(False, "", reason), remote)
        return self._verify(credentials.username, credentials.password, remote)

    def authenticate(self, username: str, password: str, remote: str) -> AuthResult:
        """Same as `authenticate_header`, for credentials that arrived another way."""
        if self.throttle.is_throttled(remote):
            return self._throttled(username, remote)
        return self._verify(username, password, remote)

    def is_throttled(self, remote: str) -> bool:
        """Lets the agent refuse a throttled client before it reads the request body."""
        return self.throttle.is_throttled(remote)

    def _throttled(self, username: str, remote: str) -> AuthResult:
        shown = username if username in self._known_names else _loggable_unverified(username)
        log.warning(
            "authentication refused for '%s' from %s: throttled after %d failed logins within %gs",
            shown, remote, self.throttle.max_failures, self.throttle.window,
        )
        return AuthResult(False, shown, REASON_THROTTLED)

    def _verify(self, username: str, password: str, remote: str) -> AuthResult:
        root = self._load_root()
        if id(root) != self._names_of:
            self._known_names = frozenset(_text(user, "name") for user in _users(root))
            self._names_of = id(root)
        result = verify_credentials(root, username, password, now=self._clock.time())
        if not result.ok:
            return self._failed(result, remote)
        log.debug("authenticated '%s'%s from %s", result.username, " (API key)" if result.via_apikey else "", remote)
        return result

    def _failed(self, result: AuthResult, remote: str) -> AuthResult:
        count = self.throttle.record_failure(remote)
        log.warning(
            "authentication error for '%s' from %s: %s (%d of %d allowed failures within %gs)",
            result.username, remote, result.reason, count, self.throttle.max_failures, self.throttle.window,
        )
        return result


def _loggable_unverified(name: str) -> str:
    """Stand-in for a name that is not a known account (or was not looked up: throttled).

    Such a name may be a password typed into the wrong field, so it is never logged. A keyed
    digest (key random per process, so no offline dictionary attack) still lets an administrator
    see that the same unknown name keeps coming back.
    """
    if not name:
        return "<no name>"
    digest = hmac.new(_LOG_DIGEST_KEY, name.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:8]
    return f"<unknown name #{digest}, {len(name)} characters>"
