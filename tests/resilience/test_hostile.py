"""Hostile input: fuzzing a running agent process, its body limits and deadlines, and the decoders.

Design rule of the HTTP fuzz: config.xml must stay byte-identical, so no request may be a valid
merge. Every body is checked before it is sent: one that decodes to `restore_config_section`
(directly or inside `system.multicall`) with a payload the merge would accept is dropped and
counted. Everything else is either invalid XML-RPC, a wrong-typed call, a call about unknown or
protected sections, or a harmless read. The backup has no sync in its history, so
`hasync.rollback` has nothing to undo.

Every reply must be an XML-RPC fault, an XML-RPC value (for harmless calls) or an HTTP 4xx, within
`MAX_SECONDS`; never a dropped connection, a 5xx, an unhandled exception ("internal error in") or a
Traceback in the agent's log. External entities point at a canary listener that must never be
contacted. The agent must be alive afterwards and its memory must not have grown by what was sent.

Bulk fuzz over plain HTTP (no TLS handshake per request), in parallel threads; a subset over TLS.
Bodies come from hypothesis strategies (generated up front with a fixed seed, so a CI failure can
be replayed: the failing body is written next to the test's tmp dir) plus the corpus in
`fixtures/hostile/` (file names say what must come back: `fault-*` or `reply-*`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime as dt
import json
import math
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.agent.server import AgentLimits
from hasync.config.items import SyncItemRegistry
from hasync.config.store import parse_config_bytes
from hasync.core.errors import ConfigError, MergeError
from hasync.payload.validate import check_payload, normalize_payload
from hasync.wire import sections as sectionsmod
from hasync.wire import xmlrpc
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair, running_agent
from support.paths import FIXTURES
from support.reliability import (
    AgentProcess,
    RawResponse,
    basic,
    client_tls_context,
    proc_status,
    raw_request,
    set_user_password,
    sha256,
)

CORPUS = FIXTURES / "hostile"
MAX_SECONDS = 10.0
FUZZ_TOTAL = int(os.environ.get("OPNSENSE_HA_FUZZ_TOTAL", "10000"))
THREADS = 4
IXR_CODES = {xmlrpc.PARSE_ERROR, xmlrpc.NOT_METHOD_CALL, xmlrpc.UNKNOWN_METHOD, xmlrpc.INVALID_PARAMS,
             xmlrpc.INTERNAL_ERROR}
REGISTRY = SyncItemRegistry.load()


# --------------------------------------------------------------------------------------------
# the target: a real agent process on a backup conf dir, plus a canary for external entities
# --------------------------------------------------------------------------------------------


class Canary:
    """A listener that records every connection: external entities must never reach it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.hits = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@dataclass
class Target:
    agent: AgentProcess
    conf_dir: Path
    pre: bytes
    canary: Canary
    auth: str
    tmp: Path
    stats: dict[str, Any] = field(default_factory=dict)

    def unchanged(self) -> None:
        data = (self.conf_dir / "config.xml").read_bytes()
        assert sha256(data) == sha256(self.pre), "config.xml changed under hostile input"

    def healthy(self) -> None:
        """Alive and still answering a good request correctly."""
        assert self.agent.alive(), f"agent died; log:\n{self.agent.log_text()[-3000:]}"
        reply = raw_request(self.agent.port, xmlrpc.dumps_request("opnsense.test", ["still here"]),
                            headers={"Authorization": self.auth}, timeout=MAX_SECONDS)
        assert reply.status == 200 and xmlrpc.loads_response(reply.body) == "still here"


def make_target(tmp: Path, tls: bool = False) -> Target:
    pair = make_pair(tmp)
    set_user_password(pair.backup, SYNC_USER, SYNC_PASSWORD)  # cost 4: 10k logins stay cheap
    services = tmp / "services-none"
    services.mkdir()
    agent = AgentProcess(pair.backup, tmp / "agent-state", services, tmp / "agent.log",
                         tls=(pair.cert_file, pair.key_file) if tls else None).start()
    try:
        # nothing for hasync.rollback to undo: no sync in this node's history
        merged = [p for p in (pair.backup / "backup").iterdir() if b"from XMLRPC client." in p.read_bytes()]
        assert not merged
        # every method the agent offers is fuzzed; a new one must be added here (and to would_merge
        # if it writes), or this fails
        listed = raw_request(agent.port, xmlrpc.dumps_request("system.listMethods", []),
                             headers={"Authorization": basic(SYNC_USER, SYNC_PASSWORD)},
                             tls=client_tls_context() if tls else None)
        offered = set(xmlrpc.loads_response(listed.body))
        assert offered <= set(KNOWN_METHODS), \
            f"methods not covered by the fuzz: {sorted(offered - set(KNOWN_METHODS))}"
    except BaseException:
        agent.stop()  # no fixture teardown runs for a half-made target
        raise
    return Target(agent, pair.backup, (pair.backup / "config.xml").read_bytes(), Canary(),
                  basic(SYNC_USER, SYNC_PASSWORD), tmp)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    made = make_target(tmp_path_factory.mktemp("hostile"))
    try:
        yield made
    finally:
        made.agent.stop()
        made.canary.close()
    log = made.agent.log_text()
    assert "Traceback" not in log, log[-5000:]
    assert made.canary.hits == 0, "an external entity or DTD was fetched"


# --------------------------------------------------------------------------------------------
# judging a reply
# --------------------------------------------------------------------------------------------


def judge(reply: RawResponse) -> str:
    """'fault <code>', 'value', 'auth failed', 'http <4xx>', or a problem starting with '!'."""
    if reply.status == 0:
        return f"! no HTTP reply ({reply.error or 'connection closed'})"
    if 400 <= reply.status < 500:
        return f"http {reply.status}"
    if reply.status != 200:
        return f"! HTTP {reply.status}"
    if reply.body == xmlrpc.AUTH_FAILED_RESPONSE:
        return "auth failed"
    try:
        xmlrpc.loads_response(reply.body)
    except xmlrpc.Fault as fault:
        if fault.code not in IXR_CODES or not fault.message.strip():
            return f"! fault {fault.code} {fault.message!r}"
        if "internal error in" in fault.message:
            return f"! unhandled exception: {fault.message}"
        return f"fault {fault.code}"
    except xmlrpc.XmlRpcDecodeError as exc:
        return f"! garbled reply: {exc}"
    return "value"


def would_merge(body: bytes) -> bool:
    """True when the agent would accept this body as a merge (such bodies are not sent)."""
    try:
        method, params = xmlrpc.loads_request(body)
    except (xmlrpc.XmlRpcDecodeError, RecursionError):
        return False
    calls: list[tuple[Any, Any]] = [(method, params)]
    if method == "system.multicall" and len(params) == 1 and isinstance(params[0], list):
        calls += [(c.get("methodName"), c.get("params", [])) for c in params[0] if isinstance(c, dict)]
    for name, args in calls:
        argument = args[0] if isinstance(args, list) and len(args) == 1 else args
        if name == sectionsmod.METHOD:  # the compressed fast path: drop anything that gets past its checks
            try:
                sectionsmod.read_param(argument)
            except Exception:
                continue
            return True
        if name != "opnsense.restore_config_section":
            continue
        try:
            check_payload(normalize_payload(argument), REGISTRY)
        except (MergeError, RecursionError):
            continue
        except Exception:  # anything else: be safe, do not send
            return True
        return True
    return False


# --------------------------------------------------------------------------------------------
# hypothesis strategies for request bodies
# --------------------------------------------------------------------------------------------

KNOWN_METHODS = [
    "opnsense.firmware_version", "opnsense.restore_config_section", "opnsense.filter_configure",
    "opnsense.configd_reload_all_templates", "opnsense.list_services", "opnsense.start_service",
    "opnsense.stop_service", "opnsense.restart_service", "opnsense.test", "system.listMethods",
    "system.getCapabilities", "system.multicall", "hasync.capabilities", "hasync.digest",
    "hasync.export_sections", "hasync.carp_status", "hasync.history", "hasync.rollback",
    "hasync.restore_sections_xml", "hasync.sync_probe", "hasync.confirm", "hasync.confirm_state",
    "hasync.as_sent_digests",
]
SECTION_WORDS = ["zz_unknown", "hasync", "interfaces", "system", "filter", "aliases", "nat", "virtualip",
                 "OPNsense", "1bad", "a b", "@attributes", "x" * 300, "revision", "../etc", ""]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def encode(value: Any, style: int = 0) -> str:
    """XML-RPC text for a value, deliberately *without* the codec's guards (huge ints, control
    characters, lone surrogates all go out as they are)."""
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, int):
        tag = ("int", "i4", "i8")[style % 3]
        return f"<{tag}>{value}</{tag}>"
    if isinstance(value, float):
        return f"<double>{value!r}</double>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>" if style % 2 == 0 else _escape(value)
    if isinstance(value, bytes):
        return f"<base64>{base64.b64encode(value).decode()}</base64>"
    if isinstance(value, dt.datetime):
        return f"<dateTime.iso8601>{value.strftime('%Y%m%dT%H:%M:%S')}</dateTime.iso8601>"
    if value is None:
        return "<nil/>"
    if isinstance(value, dict):
        members = "".join(f"<member><name>{_escape(str(k))}</name><value>{encode(v, style)}</value></member>"
                          for k, v in value.items())
        return f"<struct>{members}</struct>"
    if isinstance(value, list):
        return "<array><data>" + "".join(f"<value>{encode(v, style)}</value>" for v in value) + "</data></array>"
    raise TypeError(type(value))


def call_bytes(method: str, params: list[Any], style: int = 0) -> bytes:
    text = (f'<?xml version="1.0"?>\n<methodCall>\n<methodName>{_escape(method)}</methodName>\n<params>\n'
            + "".join(f"<param><value>{encode(p, style)}</value></param>\n" for p in params)
            + "</params></methodCall>")
    return text.encode("utf-8", "surrogatepass")


scalars = st.one_of(
    st.integers(),  # includes values far outside 64 bits
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=()), max_size=10),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=5),  # control chars
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), max_size=3),
    st.binary(max_size=40),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.none(),
)
keys = st.one_of(st.sampled_from(SECTION_WORDS), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
methods = st.one_of(st.sampled_from(KNOWN_METHODS), st.text(max_size=30))
# wrong types for every method: any method, any number of params of any shape
calls = st.builds(call_bytes, methods, st.lists(values, max_size=3), st.integers(0, 5))
# restore_config_section and service actions with struct arguments of hostile shape
section_structs = st.dictionaries(keys, values, min_size=1, max_size=4)
restores = st.builds(lambda p, s: call_bytes("opnsense.restore_config_section", [p], s), section_structs,
                     st.integers(0, 5))
service_calls = st.builds(
    lambda m, a, s: call_bytes(m, [a], s),
    st.sampled_from(["opnsense.start_service", "opnsense.stop_service", "opnsense.restart_service"]),
    st.one_of(values, st.fixed_dictionaries({"service": values}, optional={"id": values})),
    st.integers(0, 5),
)
multicalls = st.builds(
    lambda entries: call_bytes("system.multicall", [entries]),
    st.lists(st.one_of(values, st.fixed_dictionaries({"methodName": methods},
                                                     optional={"params": st.lists(values, max_size=2)})),
             max_size=4),
)

BASES = [
    call_bytes("opnsense.restore_config_section", [{"zz_unknown": {"rule": [{"descr": "x", "type": "pass"}]}}]),
    call_bytes("opnsense.restore_config_section", [{"interfaces": {"wan": {"ipaddr": "6.6.6.6"}}}]),
    call_bytes("opnsense.restart_service", [{"service": "unbound", "id": "1"}]),
    call_bytes("system.multicall", [[{"methodName": "opnsense.test", "params": ["a"]}]]),
    call_bytes("opnsense.firmware_version", []),
    call_bytes("hasync.digest", [["aliases", "rules"]]),
    call_bytes("hasync.digest", [{"items": ["rules"], "as_sent": "0" * 64}]),
    call_bytes("hasync.as_sent_digests", [{"as_sent": "0" * 64, "canonical": "hasync-canonical-2",
                                           "algorithm": "sha256", "items": {"rules": "0" * 64}}]),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with byte-level damage: flips, deletions, insertions, duplication, truncation."""
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "delete", "insert", "dup", "truncate", "utf8"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 20))]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from([b"<", b">", b"&", b"]]>", b"<value>", b"</struct>", b"\x00",
                                                  b"&#0;", b"<!--", b"<?pi?>", b"<![CDATA[", b"\xff"]))
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 200))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.sampled_from([b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
                                                  b"\xef\xbf\xbe", b"\xfe\xff"]))
    return bytes(data)


xml_alphabet = st.sampled_from([*"<>/&;=\"' ?!-[]abcdefghijklmnopqrstuvwxyz",
                                "methodCall", "methodName", "params", "param", "value", "struct", "member",
                                "name", "array", "data", "string", "int", "<!DOCTYPE", "<!ENTITY", "&x;", "\n"])
xmlish = st.lists(xml_alphabet, max_size=80).map(lambda parts: "".join(parts).encode())


@st.composite
def dtd_bodies(draw: st.DrawFn, canary_port: int) -> bytes:
    """Internal/external entities, parameter entities, external DTDs: never expanded or fetched."""
    kind = draw(st.sampled_from(["internal", "system", "parameter", "external_dtd", "nested"]))
    name = draw(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True))
    url = draw(st.sampled_from([f"http://127.0.0.1:{canary_port}/{name}", "file:///etc/passwd",
                                f"ftp://127.0.0.1:{canary_port}/x", "/etc/hostname", "php://filter/x"]))
    refs = "".join(f"&{name};" for _ in range(draw(st.integers(1, 50))))
    if kind == "internal":
        subset = f'<!ENTITY {name} "{draw(st.text(alphabet="abc&;%", max_size=30))}">'
    elif kind == "system":
        subset = f'<!ENTITY {name} SYSTEM "{url}">'
    elif kind == "parameter":
        subset = f'<!ENTITY % {name} SYSTEM "{url}"> %{name};'
    elif kind == "nested":
        subset = (f'<!ENTITY {name}0 "{"x" * draw(st.integers(1, 1000))}">'
                  + "".join(f'<!ENTITY {name}{i} "{f"&{name}{i - 1};" * 10}">' for i in range(1, 8)))
        refs = f"&{name}7;"
    else:
        return (f'<?xml version="1.0"?>\n<!DOCTYPE methodCall SYSTEM "{url}">\n<methodCall><methodName>'
                f"opnsense.test</methodName><params><param><value>{refs}</value></param></params></methodCall>"
                ).encode()
    method = draw(st.sampled_from(["opnsense.test", "opnsense.restore_config_section"]))
    inner = (f"<string>{refs}</string>" if method == "opnsense.test"
             else f"<struct><member><name>aliases</name><value><string>{refs}</string></value></member></struct>")
    return (f'<?xml version="1.0"?>\n<!DOCTYPE methodCall [{subset}]>\n<methodCall><methodName>{method}'
            f"</methodName><params><param><value>{inner}</value></param></params></methodCall>").encode()


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting around libxml2's depth limit (256) in XML-RPC and in plain elements."""
    depth = draw(st.integers(150, 2000))
    if draw(st.booleans()):
        opening = "<value><array><data>" * depth
        closing = "</data></array></value>" * depth
        inner = f"<param>{opening}<value>x</value>{closing}</param>"
    else:
        tag = draw(st.sampled_from(["value", "struct", "member", "a"]))
        inner = f"<{tag}>" * depth + f"</{tag}>" * depth
    return f"<methodCall><methodName>opnsense.test</methodName><params>{inner}</params></methodCall>".encode()


def generate(strategy: st.SearchStrategy[bytes], count: int,
             sink: Callable[[bytes], None] | None = None) -> list[bytes]:
    """`count` bodies drawn by hypothesis with a fixed seed (phase generate only: no shrinking).

    With `sink`, each body is handed over as soon as it is drawn (so sending overlaps drawing)."""
    out: list[bytes] = []

    @settings(max_examples=count, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(body: bytes) -> None:
        if sink is None:
            out.append(body)
        else:
            sink(body)

    collect()
    return out


def corpus(canary_port: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in CORPUS.iterdir() if p.suffix == ".xml")
    assert len(files) >= 50, "fixtures/hostile corpus is missing"
    return [(p.name, p.read_bytes().replace(b"@CANARY@", str(canary_port).encode())) for p in files]


# --------------------------------------------------------------------------------------------
# sending in bulk
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    label: str
    body: bytes
    verdict: str
    seconds: float


def send_one(target: Target, item: tuple[str, bytes], *, tls: ssl.SSLContext | None = None,
             auth: str | None = "good", source: str | None = None) -> Outcome:
    label, body = item
    headers = {"Authorization": target.auth} if auth == "good" else ({"Authorization": auth} if auth else {})
    reply = raw_request(target.agent.port, body, headers=headers, timeout=MAX_SECONDS * 3, tls=tls, source=source)
    return Outcome(label, body, judge(reply), reply.seconds)


def send_all(target: Target, bodies: list[tuple[str, bytes]], *, tls: bool = False,
             auth: str | None = "good", source: str | None = None) -> list[Outcome]:
    context = client_tls_context() if tls else None
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda item: send_one(target, item, tls=context, auth=auth, source=source), bodies))


def problems(target: Target, outcomes: list[Outcome], allowed: Callable[[Outcome], bool]) -> list[str]:
    bad = [o for o in outcomes if o.verdict.startswith("!") or not allowed(o) or o.seconds > MAX_SECONDS]
    dump = target.tmp / "failing-bodies"
    dump.mkdir(exist_ok=True)
    for n, outcome in enumerate(bad[:50]):
        (dump / f"{n:03d}-{re.sub(r'[^a-z0-9-]', '_', outcome.label)}.bin").write_bytes(outcome.body)
    return [f"{o.label}: {o.verdict} in {o.seconds:.2f}s (body kept in {dump})" for o in bad[:20]]


def is_fault_or_4xx(outcome: Outcome) -> bool:
    return outcome.verdict.startswith(("fault", "http 4"))


def restore_never_true(outcome: Outcome) -> bool:
    """A restore call (not filtered out) must be refused: a value reply would mean it merged."""
    return outcome.verdict != "value" or not outcome.label.startswith("restore")


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------


def test_corpus_gets_the_expected_answers(target: Target) -> None:
    items = corpus(target.canary.port)
    outcomes = send_all(target, items)
    expected = {o.label: ("fault" if o.label.startswith("fault-") else "value") for o in outcomes}
    failures = problems(target, outcomes, lambda o: o.verdict.startswith(expected[o.label]))
    assert not failures, "\n".join(failures)
    # every file also bounces off without credentials, from its own address (throttle bucket)
    refused = send_all(target, items, auth=None, source="127.0.0.9")
    assert {o.verdict for o in refused} == {"auth failed"}
    target.unchanged()
    target.healthy()
    target.stats["corpus"] = 2 * len(items)


def test_external_entities_are_not_fetched_or_echoed(target: Target) -> None:
    items = [(n, b) for n, b in corpus(target.canary.port) if "xxe" in n or "xinclude" in n or "stylesheet" in n]
    outcomes = send_all(target, items)
    for outcome in outcomes:
        assert outcome.verdict.startswith(("fault", "value")), outcome
    replies = [raw_request(target.agent.port, body, headers={"Authorization": target.auth}).body
               for _, body in items]
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    assert all(passwd.encode() not in reply for reply in replies)
    assert target.canary.hits == 0
    target.unchanged()


def test_bombs_and_deep_nesting_in_bounded_time_and_memory(target: Target) -> None:
    hwm_before = proc_status(target.agent.pid)["VmHWM"]
    quadratic_entity = "q" * 200_000
    bodies = {
        "quadratic-blowup": (f'<?xml version="1.0"?>\n<!DOCTYPE methodCall [<!ENTITY q "{quadratic_entity}">]>\n'
                             "<methodCall><methodName>opnsense.test</methodName><params><param><value><string>"
                             + "&q;" * 200_000 + "</string></value></param></params></methodCall>").encode(),
        "deep-100k-xmlrpc": ("<methodCall><methodName>opnsense.test</methodName><params><param>"
                             + "<value><array><data>" * 100_000 + "</data></array></value>" * 100_000
                             + "</param></params></methodCall>").encode(),
        "deep-100k-plain": ("<methodCall><methodName>opnsense.test</methodName><params>"
                            + "<a>" * 100_000 + "</a>" * 100_000 + "</params></methodCall>").encode(),
        "deep-100k-unclosed": ("<methodCall>" + "<value>" * 100_000).encode(),
        "deep-255-ok-shape": ("<methodCall><methodName>opnsense.test</methodName><params><param>"
                              + "<value><array><data>" * 80 + "</data></array></value>" * 80
                              + "</param></params></methodCall>").encode(),
        "wide-struct-200k-members": ("<methodCall><methodName>opnsense.restore_config_section</methodName><params>"
                                     "<param><value><struct>"
                                     + "".join(f"<member><name>zz{i}</name><value>x</value></member>"
                                               for i in range(200_000))
                                     + "</struct></value></param></params></methodCall>").encode(),
        "huge-int-1mb": (b"<methodCall><methodName>opnsense.test</methodName><params><param><value><int>"
                         + b"9" * 1_000_000 + b"</int></value></param></params></methodCall>"),
        "huge-method-name": (b"<methodCall><methodName>" + b"m" * 5_000_000 + b"</methodName></methodCall>"),
        "many-attributes": (b"<methodCall " + b" ".join(b'a%d="x"' % i for i in range(100_000))
                            + b"><methodName>opnsense.test</methodName></methodCall>"),
    }
    outcomes = send_all(target, list(bodies.items()))
    # the deep-but-legal array and the attributes (ignored) are harmless calls that get a value;
    # every other one must be refused
    harmless = ("deep-255-ok-shape", "many-attributes")
    failures = problems(target, outcomes,
                        lambda o: o.verdict == "value" if o.label in harmless else is_fault_or_4xx(o))
    assert not failures, "\n".join(failures)
    growth_mb = (proc_status(target.agent.pid)["VmHWM"] - hwm_before) / 1024
    target.stats["bomb_hwm_growth_mb"] = round(growth_mb, 1)
    target.stats["bomb_max_seconds"] = round(max(o.seconds for o in outcomes), 3)
    sent_mb = sum(map(len, bodies.values())) >> 20
    assert growth_mb < 200, f"agent peak memory grew by {growth_mb:.0f} MB on ~{sent_mb} MB of bodies"
    target.unchanged()
    target.healthy()


@pytest.mark.slow
def test_fuzz_bulk_over_plain_http(target: Target) -> None:
    share = FUZZ_TOTAL + 100  # a few are dropped as valid merges
    plan: list[tuple[str, st.SearchStrategy[bytes], float]] = [
        ("call", calls, 0.22),
        ("restore", restores, 0.12),
        ("service", service_calls, 0.06),
        ("multicall", multicalls, 0.05),
        ("mutated", mutated(), 0.22),
        ("binary", st.binary(max_size=3000), 0.10),
        ("xmlish", xmlish, 0.11),
        ("dtd", dtd_bodies(target.canary.port), 0.08),
        ("deep", deep(), 0.04),
    ]
    started = time.monotonic()
    hwm_before = proc_status(target.agent.pid)["VmHWM"]
    futures: list[concurrent.futures.Future[Outcome]] = []
    dropped = 0
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for label, strategy, weight in plan:
            def sink(body: bytes, label: str = label) -> None:
                nonlocal dropped
                if would_merge(body):
                    dropped += 1
                    return
                futures.append(pool.submit(send_one, target, (f"{label}-{len(futures)}", body)))
                if len(futures) % 1000 == 0:  # check config.xml along the way, not only at the end
                    target.unchanged()

            generate(strategy, math.ceil(share * weight), sink)
        generated = time.monotonic() - started
    outcomes = [future.result() for future in futures]
    target.unchanged()
    sent = time.monotonic() - started
    binary_like = ("binary-", "xmlish-")
    failures = problems(target, outcomes, lambda o: restore_never_true(o) and
                        (is_fault_or_4xx(o) if o.label.startswith(binary_like) else True))
    assert not failures, "\n".join(failures)
    target.healthy()
    verdicts: dict[str, int] = {}
    for outcome in outcomes:
        verdicts[outcome.verdict] = verdicts.get(outcome.verdict, 0) + 1
    growth_mb = (proc_status(target.agent.pid)["VmHWM"] - hwm_before) / 1024
    seconds = sorted(o.seconds for o in outcomes)
    target.stats.update({
        "fuzz_sent": len(outcomes), "fuzz_dropped_as_valid_merge": dropped,
        "fuzz_generate_s": round(generated, 1), "fuzz_total_s": round(sent, 1),
        "fuzz_max_s": round(seconds[-1], 3), "fuzz_p99_s": round(seconds[int(len(seconds) * 0.99)], 3),
        "fuzz_hwm_growth_mb": round(growth_mb, 1), "verdicts": verdicts,
    })
    print("\nhostile fuzz:", json.dumps(target.stats))
    assert len(outcomes) >= FUZZ_TOTAL
    assert growth_mb < 200


def test_fuzz_subset_over_tls(tmp_path: Path) -> None:
    made = make_target(tmp_path, tls=True)
    try:
        items = [(f"call-{n}", b) for n, b in enumerate(generate(calls, 150)) if not would_merge(b)]
        items += [(f"mutated-{n}", b) for n, b in enumerate(generate(mutated(), 150)) if not would_merge(b)]
        items += corpus(made.canary.port)
        outcomes = send_all(made, items, tls=True)
        assert not problems(made, outcomes, restore_never_true)
        made.unchanged()
        assert made.agent.alive()
        # garbage instead of a TLS ClientHello, and a handshake that stops half way
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", os.urandom(4096)):
            with socket.create_connection(("127.0.0.1", made.agent.port), timeout=MAX_SECONDS) as sock, \
                    contextlib.suppress(OSError):  # the agent may reset as soon as it sees junk
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        reply = raw_request(made.agent.port, xmlrpc.dumps_request("opnsense.test", ["tls ok"]),
                            headers={"Authorization": made.auth}, tls=client_tls_context())
        assert xmlrpc.loads_response(reply.body) == "tls ok"
    finally:
        made.agent.stop()
        made.canary.close()
    assert "Traceback" not in made.agent.log_text()


def test_control_a_valid_merge_is_filtered_and_would_be_caught(fresh_agent: Target) -> None:
    """Control for the fuzz's two guards: `would_merge` recognises a real merge, and the config
    check notices when one gets through."""
    target = fresh_agent
    body = xmlrpc.dumps_request("opnsense.restore_config_section", [
        {"OPNsense": {"Firewall": {"Alias": {"aliases": {"alias": [{"name": "fuzz_alias", "type": "host",
                                                                    "content": "10.0.0.1", "enabled": "1"}]}}}}}])
    assert would_merge(body)
    assert would_merge(xmlrpc.dumps_request("system.multicall", [[
        {"methodName": "opnsense.restore_config_section", "params": xmlrpc.loads_request(body)[1]}]]))
    reply = send_one(target, ("valid-merge", body))
    assert reply.verdict == "value"
    with pytest.raises(AssertionError, match=r"config\.xml changed"):
        target.unchanged()


# --- size limits ---------------------------------------------------------------------------


def stream_body(port: int, head: bytes, total: int, chunk: int = 1 << 20,
                fill: bytes = b"\0") -> tuple[int, bytes, str]:
    """Send `head`, then up to `total` body bytes of `fill` repeated (its length divides `chunk`);
    returns (bytes of them the kernel took, reply, error)."""
    sent = 0
    error = ""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        block = fill * (chunk // len(fill))
        try:
            while sent < total:
                at = sent % chunk
                sent += sock.send(block[at: at + min(chunk - at, total - sent)])
        except OSError as exc:
            error = type(exc).__name__
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except OSError as exc:
            error = error or type(exc).__name__
    return sent, reply, error


@pytest.fixture
def fresh_agent(tmp_path: Path) -> Iterator[Target]:
    made = make_target(tmp_path)
    try:
        yield made
    finally:
        made.agent.stop()
        made.canary.close()


@pytest.mark.parametrize("authenticated", [True, False])
def test_200mb_body_refused_by_the_size_limit(fresh_agent: Target, authenticated: bool) -> None:
    target = fresh_agent
    total = 200 * 1024 * 1024
    auth = f"Authorization: {target.auth}\r\n" if authenticated else ""
    head = (f"POST /xmlrpc.php HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {total}\r\n{auth}\r\n"
            ).encode()
    # 1. the refusal comes as soon as the header is in: no body byte needed
    with socket.create_connection(("127.0.0.1", target.agent.port), timeout=MAX_SECONDS) as sock:
        started = time.monotonic()
        sock.sendall(head)
        first = b""
        while chunk := sock.recv(65536):
            first += chunk
        seconds = time.monotonic() - started
    expected = b"HTTP/1.0 413" if authenticated else b"HTTP/1.0 200"
    assert first.startswith(expected), first[:200]
    if not authenticated:
        assert first.endswith(xmlrpc.AUTH_FAILED_RESPONSE)
    assert seconds < MAX_SECONDS
    # 2. a client that pushes all 200 MB anyway: the agent stops taking it and its memory stays flat
    before = proc_status(target.agent.pid)
    sampled: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled.append(proc_status(target.agent.pid)["VmRSS"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent, reply, error = stream_body(target.agent.port, head, total)
    stop.set()
    sampler.join()
    after = proc_status(target.agent.pid)
    growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
    rss_growth_mb = (max(sampled) - before["VmRSS"]) / 1024
    target.stats[f"200mb_{'auth' if authenticated else 'noauth'}"] = {
        "accepted_mb": round(sent / 2**20, 1), "hwm_growth_mb": round(growth_mb, 1),
        "max_rss_growth_mb": round(rss_growth_mb, 1), "client_error": error}
    print("\n200 MB body:", target.stats)
    assert sent < total, "the agent read the whole 200 MB body"
    assert growth_mb < 16, f"agent peak RSS grew by {growth_mb:.1f} MB"
    assert reply == b"" or reply.startswith(expected)
    target.unchanged()
    target.healthy()


def test_control_memory_probe_sees_a_body_that_is_read(fresh_agent: Target) -> None:
    """Control for the two tests around it: an authenticated body under the limit *is* read, and
    when what it decodes to is kept (48 MB of array items, never closed: the agent parses a body
    as it arrives, so a body of NULs is refused at its first byte and drained at no cost) the
    same /proc probe shows the agent's peak RSS grow by at least its size."""
    target = fresh_agent
    total = 48 * 1024 * 1024
    start = b"<?xml version='1.0'?><methodCall><methodName>x</methodName><params><param><value><array><data>"
    item = b"<value><string>" + b"a" * (1024 - 32) + b"</string></value>"
    head = (f"POST /xmlrpc.php HTTP/1.0\r\nContent-Length: {total + len(start)}\r\n"
            f"Authorization: {target.auth}\r\n\r\n").encode() + start
    before = proc_status(target.agent.pid)["VmHWM"]
    sent, reply, _error = stream_body(target.agent.port, head, total, fill=item)
    growth_mb = (proc_status(target.agent.pid)["VmHWM"] - before) / 1024
    assert sent == total and b"faultCode" in reply
    assert growth_mb >= 40, f"the probe saw only {growth_mb:.1f} MB for a 48 MB body that was read"
    target.stats["control_48mb_read_hwm_growth_mb"] = round(growth_mb, 1)


def test_large_unauthenticated_body_below_the_limit_is_not_read(fresh_agent: Target) -> None:
    """Credentials are checked from the header: an unauthenticated 100 MB body costs no memory."""
    target = fresh_agent
    total = 100 * 1024 * 1024
    head = (f"POST /xmlrpc.php HTTP/1.0\r\nContent-Length: {total}\r\n"
            f"Authorization: {basic(SYNC_USER, 'wrong')}\r\n\r\n").encode()
    before = proc_status(target.agent.pid)["VmHWM"]
    sent, reply, _error = stream_body(target.agent.port, head, total)
    growth_mb = (proc_status(target.agent.pid)["VmHWM"] - before) / 1024
    assert sent < total and growth_mb < 16, (sent, growth_mb)
    assert reply == b"" or reply.endswith(xmlrpc.AUTH_FAILED_RESPONSE)
    target.healthy()


@pytest.mark.parametrize(
    ("label", "headers", "content_length", "expected"),
    [
        ("no content-length", {}, -1, 411),
        ("negative", {"Content-Length": "-5"}, -1, 413),
        ("not a number", {"Content-Length": "12abc"}, -1, 411),
        ("chunked", {"Transfer-Encoding": "chunked"}, -1, 411),
        ("huge", {}, 10**30, 413),
    ],
)
def test_bad_length_headers(target: Target, label: str, headers: dict[str, str], content_length: int,
                            expected: int) -> None:
    headers = {"Authorization": target.auth, **headers}
    reply = raw_request(target.agent.port, b"", headers=headers, content_length=content_length,
                        timeout=MAX_SECONDS)
    assert reply.status == expected, (label, reply)
    target.unchanged()


def test_length_header_shorter_than_body_reads_only_what_it_says(target: Target) -> None:
    body = xmlrpc.dumps_request("opnsense.test", ["abc"])
    reply = raw_request(target.agent.port, body + b"X" * 100_000, headers={"Authorization": target.auth},
                        content_length=len(body), timeout=MAX_SECONDS)
    assert reply.status == 200 and xmlrpc.loads_response(reply.body) == "abc"


# --- slow clients --------------------------------------------------------------------------


LIMITS = AgentLimits(read_timeout=1.0, body_deadline=2.0, max_connections=3)


@pytest.fixture
def slow_agent(tmp_path: Path) -> Iterator[tuple[int, str]]:
    pair = make_pair(tmp_path)
    set_user_password(pair.backup, SYNC_USER, SYNC_PASSWORD)
    services = tmp_path / "services-none"
    services.mkdir()
    with running_agent(pair, plain_http=True, tls_cert=None, tls_key=None, services_dir=services,
                       limits=AgentLimits(**vars(LIMITS))) as server:
        yield int(server.server_address[1]), basic(SYNC_USER, SYNC_PASSWORD)


def trickle(port: int, data: bytes, interval: float, give_up: float) -> tuple[float, int]:
    """Send `data` one byte per `interval`; returns (seconds until the agent closed, bytes sent)."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.monotonic() - started < give_up:
            try:
                sock.send(data[sent % len(data):sent % len(data) + 1])
                sent += 1
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                try:
                    if not sock.recv(4096):
                        break
                except OSError:
                    break
                break  # the agent answered (408) and closes
    return time.monotonic() - started, sent


def test_trickled_request_head_is_cut_at_the_deadline(slow_agent: tuple[int, str]) -> None:
    port, _auth = slow_agent
    head = b"POST /xmlrpc.php HTTP/1.0\r\n" + b"X-Slow: " + b"a" * 10_000
    seconds, _sent = trickle(port, head, 0.1, give_up=15)
    assert seconds < LIMITS.read_timeout + 2.0, f"a trickling header kept the connection for {seconds:.1f}s"


def test_trickled_body_is_cut_at_the_deadline(slow_agent: tuple[int, str]) -> None:
    port, auth = slow_agent
    for authorization in (auth, basic(SYNC_USER, "wrong")):  # read path and drain path
        head = (f"POST /xmlrpc.php HTTP/1.0\r\nContent-Length: 1000\r\nAuthorization: {authorization}\r\n\r\n"
                ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(head)
            started = time.monotonic()
            _seconds, _sent = trickle_on(sock, b"<", 0.1, give_up=15)
            seconds = time.monotonic() - started
        assert seconds < LIMITS.body_deadline + 2.0, f"a trickling body kept the connection for {seconds:.1f}s"


def trickle_on(sock: socket.socket, data: bytes, interval: float, give_up: float) -> tuple[float, int]:
    """Send `data` every `interval` on an open connection until the agent answers or closes."""
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < give_up:
        try:
            sock.send(data)
            sent += 1
        except OSError:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
    return time.monotonic() - started, sent


def test_slow_clients_cannot_hold_every_connection_slot(slow_agent: tuple[int, str]) -> None:
    """Slow clients take every slot (the control: a good request is turned away), then lose them
    at the head deadline while still trickling, and the good request gets in."""
    port, auth = slow_agent
    held: list[float] = []

    def attack() -> None:
        held.append(trickle(port, b"POST /xmlrpc.php HTTP/1.0\r\nX-Slow: " + b"a" * 10_000, 0.1, give_up=10)[0])

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(LIMITS.max_connections)]
    for thread in attackers:
        thread.start()
    time.sleep(0.3)
    good = xmlrpc.dumps_request("opnsense.test", ["through"])
    started = time.monotonic()
    refused = raw_request(port, good, headers={"Authorization": auth}, timeout=5)
    assert refused.status == 0, "the slow clients did not take every slot: the test proves nothing"
    answered = False
    while not answered and time.monotonic() - started < LIMITS.read_timeout + 3:
        reply = raw_request(port, good, headers={"Authorization": auth}, timeout=5)
        answered = reply.status == 200 and reply.body != xmlrpc.AUTH_FAILED_RESPONSE
        time.sleep(0.05)
    assert answered, "slow clients held every slot past the head deadline"
    for thread in attackers:
        thread.join(timeout=15)
    # each slow client was cut by the agent (it would have trickled for 10 s)
    assert len(held) == LIMITS.max_connections and max(held) < LIMITS.read_timeout + 2.0, held


# --- the decoders, directly ------------------------------------------------------------------

REAL_CONFIG = (FIXTURES / "nodes" / "backup.xml").read_bytes()


@st.composite
def config_mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(REAL_CONFIG)
    for _ in range(draw(st.integers(1, 5))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            del data[pos:pos + draw(st.integers(1, 50))]
        elif op == 2:
            data[pos:pos] = draw(st.sampled_from([b"<!DOCTYPE x [<!ENTITY e 'e'>]>", b"&e;", b"<", b"\xff", b"\x00",
                                                  b"</opnsense>", b"<opnsense>"]))
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2000), config_mutations(), xmlish))
def test_config_loader_fuzz(data: bytes) -> None:
    try:
        root = parse_config_bytes(data, "fuzz.xml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.xml")
        return
    assert root.tag == "opnsense"


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(calls, mutated(), st.binary(max_size=500), xmlish, deep()))
def test_request_decoder_fuzz(body: bytes) -> None:
    try:
        method, params = xmlrpc.loads_request(body)
    except xmlrpc.XmlRpcDecodeError as exc:
        assert exc.code in IXR_CODES and str(exc)
        return
    assert isinstance(method, str) and method.strip() and isinstance(params, list)


def outcome_of(decode: Callable[[], tuple[str, list[Any]]]) -> Any:
    """What a decode gives: its value, or its error's code and message (a syntax error's message
    comes from libxml2, which words a truncated document fed in pieces its own way: the prefix)."""
    try:
        return ("value", decode())
    except xmlrpc.XmlRpcDecodeError as exc:
        message = str(exc)
        return ("error", exc.code, "parse error. not well formed" if message.startswith(
            "parse error. not well formed (") and "nesting too deep" not in message else message)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(calls, restores, multicalls, mutated(), xmlish, deep()), st.integers(1, 64))
def test_request_decoder_in_pieces_gives_the_whole_trees_outcome(body: bytes, feed: int) -> None:
    """`loads_request` parses a piece at a time, decoding and dropping the finished parts of the
    structs and arrays it reads (`xmlrpc._collapse`); in pieces as small as a byte, it gives the
    value or the error the decode of the whole tree gives. Control: the whole tree's decode is
    the path `loads_response` takes, untouched."""
    whole = outcome_of(lambda: xmlrpc._request_of(xmlrpc._parse(body)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xmlrpc, "FEED", feed)
        pieces = outcome_of(lambda: xmlrpc.loads_request(body))
    assert pieces == whole


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
              st.binary(max_size=5), st.datetimes()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(keys, st.integers()), inner,
                                                                        max_size=4)),
    max_leaves=15)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_payload_normalizer_fuzz(value: Any) -> None:
    try:
        result = normalize_payload(value)
    except MergeError as exc:
        assert str(exc)
        return
    assert isinstance(result, dict) and result
    # what passes must be buildable as XML: every key an element name, every text XML-safe
    for key in result:
        if not key.endswith("@attributes"):
            etree.Element(key)


def test_normalizer_refuses_deep_nesting() -> None:
    value: Any = "x"
    for _ in range(100_000):
        value = {"a": value}
    with pytest.raises(MergeError, match="nested deeper"):
        normalize_payload({"zz": value})
