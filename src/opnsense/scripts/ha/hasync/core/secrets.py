"""The one list of what counts as a secret in a config: never printed, logged or put in JSON.

`payload --redact`, `diff` (human and JSON), the merge report and the logs all ask this module,
so a field hidden in one place is hidden in all. The test is by name, generous on purpose: a
field wrongly hidden costs an admin a look at config.xml, a field wrongly shown leaks a key.
"""

from __future__ import annotations

import re

SECRET_NAMES = frozenset({
    "password", "passwd", "pass", "prv", "privkey", "privatekey", "private_key", "private-key", "secret",
    "apikeys", "psk", "pre-shared-key", "presharedkey", "shared_key", "sharedkey", "tls", "authkey",
    "ldap_bindpw", "radius_secret", "otp_seed", "md5-hash", "nt-hash", "bcrypt-hash", "sha512-hash",
    "ipsecpsk", "ddnsdomainkey", "tsigkey", "key_secret", "crypto_key", "auth_key",
})
SECRET_PARTS = ("password", "passwd", "secret", "privkey", "private", "psk", "hash")
_INDEX = re.compile(r"\[\d+\]")


def is_secret_name(name: str) -> bool:
    """True for a field (or attribute, with its `@`) whose name says it holds a secret."""
    lowered = name.lower().lstrip("@")
    if lowered in SECRET_NAMES or any(part in lowered for part in SECRET_PARTS):
        return True
    # tsig-key, tls_key, crypto_key, ...: key material unless it says it is the public half
    return lowered.endswith(("_key", "-key")) and "pub" not in lowered


def is_secret_path(path: str) -> bool:
    """True when the field or anything above it has a secret-looking name."""
    return any(is_secret_name(part) for part in _INDEX.sub("", path).replace("@", ".").split(".") if part)
