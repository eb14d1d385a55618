"""TLS material for the agent and trust-on-first-use pinning for the client.

The agent prefers explicit files, then the web GUI certificate that config.xml points to (so a
real OPNsense backup presents the same certificate on our port as on its GUI), and finally a
self-signed certificate generated once and kept in the state directory, so the primary's TOFU pin
stays valid across restarts.

`cryptography` is imported by the two functions that use it: every sync imports this module for
`fingerprint`, and the library's X.509 layer costs more start-up than the sync's own work.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
from pathlib import Path

from lxml import etree

from hasync.core.errors import HaError
from hasync.core.fileio import atomic_write

MIN_TLS = ssl.TLSVersion.TLSv1_2
CERT_MODE = 0o644  # a certificate is public; its key is written 0600


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint, colon-separated upper-case hex (as `openssl x509 -fingerprint`)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def generate_self_signed(cert_path: Path, key_path: Path, hostname: str | None = None) -> None:
    """A P-256 certificate for the agent, valid 10 years, with localhost/hostname SANs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    name = hostname or socket.gethostname() or "opnsense-ha"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost"),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=CERT_MODE)


def webgui_certificate(root: etree._Element, state_dir: Path) -> tuple[Path, Path] | None:
    """Write the GUI certificate referenced by system.webgui.ssl-certref to files; None if absent."""
    refid = (root.findtext("system/webgui/ssl-certref") or "").strip()
    if not refid:
        return None
    return config_certificate(root, refid, state_dir, "webgui")


def config_certificate(root: etree._Element, refid: str, state_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `<cert>` `refid` of config.xml (base64 PEM in crt/prv) to `name`.crt/.key in state_dir.

    The key goes to a file created 0600 in a 0700 directory, never through argv or the environment,
    so the agent can hand both paths to OpenSSL.
    """
    for cert in root.iterfind("cert"):
        if (cert.findtext("refid") or "").strip() != refid:
            continue
        crt = (cert.findtext("crt") or "").strip()
        prv = (cert.findtext("prv") or "").strip()
        if not crt or not prv:
            raise HaError(f"certificate {refid} in config.xml has no certificate or key")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = state_dir / f"{name}.crt", state_dir / f"{name}.key"
        atomic_write(key_path, base64.b64decode(prv), mode=0o600)
        atomic_write(cert_path, base64.b64decode(crt), mode=CERT_MODE)
        return cert_path, key_path
    raise HaError(f"certificate {refid} is not a <cert> in config.xml (System > Trust > Certificates)")


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    # No TLS 1.3 session tickets: our client never resumes (one connection per call) and the
    # two tickets OpenSSL sends by default are ~500 bytes of every reply.
    context.num_tickets = 0
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as exc:
        raise HaError(f"cannot load TLS certificate {cert_path} / key {key_path}: {exc}") from None
    return context


def certificate_not_after(cert_pem_or_der: bytes) -> dt.datetime:
    from cryptography import x509

    if cert_pem_or_der.lstrip().startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(cert_pem_or_der)
    else:
        cert = x509.load_der_x509_certificate(cert_pem_or_der)
    return cert.not_valid_after_utc
