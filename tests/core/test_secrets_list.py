"""One list of secret field names: `payload --redact` hides what `diff` hides."""

from __future__ import annotations

import pytest

from hasync.core.php import php_empty, php_truthy
from hasync.core.secrets import SECRET_NAMES, is_secret_name, is_secret_path
from hasync.payload.build import REDACTED, redact


@pytest.mark.parametrize("name", sorted(SECRET_NAMES | {"tsig-key", "wg_private", "crypto_key"}))
def test_redact_hides_every_field_diff_hides(name: str) -> None:
    # before, payload's own shorter list let e.g. otp_seed and tsigkey through --redact
    assert is_secret_path(f"a.{name}")
    assert redact({"a": {name: "s3cr3t", "descr": "shown"}}) == {"a": {name: REDACTED, "descr": "shown"}}


def test_public_halves_and_plain_fields_stay_visible() -> None:
    for name in ("descr", "pubkey", "public_key", "hostname", "keyid"):
        assert not is_secret_name(name), name


@pytest.mark.parametrize(("value", "empty"), [("", True), ("0", True), (0, True), (None, True), ([], True),
                                              ({}, True), (False, True), ("1", False), ("00", False),
                                              (" ", False), ("no", False), (["x"], False), (1, False)])
def test_php_empty_is_phps(value: object, empty: bool) -> None:
    assert php_empty(value) is empty
    assert php_truthy(value) is not empty
