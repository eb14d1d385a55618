"""One measured operation, run in its own process by `bench/run.py`; prints one JSON line.

Every operation is timed inside the process, after the imports, so interpreter start-up is not
counted (it is the same for every row and says nothing about the code). The process's own peak
RSS (`ru_maxrss`) is reported with it, so the client side of each row is one process.

Bytes on the wire are TCP payload bytes in both directions, TLS records included, read from the
kernel (`TCP_INFO`: `tcpi_bytes_acked` + `tcpi_bytes_received`) on every connection just before
it closes, so they count the handshake, HTTP headers and bodies exactly as they crossed loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import resource
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent / "src" / "opnsense" / "scripts" / "ha"
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))

TCP_INFO_BYTES = 232
_ACKED_OFFSET = 120  # struct tcp_info: tcpi_bytes_acked (u64) follows 8 u8 + 24 u32 + 2 u64 pacing fields
_RECEIVED_OFFSET = 128


def tcp_bytes(sock: socket.socket | None) -> int:
    """Payload bytes this TCP connection sent (acknowledged) and received so far (Linux)."""
    if sock is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return 0
    if len(info) < _RECEIVED_OFFSET + 8:
        return 0
    acked, received = struct.unpack_from("=QQ", info, _ACKED_OFFSET)
    return int(acked + received)


class WireCounter:
    """Sums `tcp_bytes` over every connection the peer client makes (patched in, bench only)."""

    def __init__(self) -> None:
        self.total = 0
        self.connections = 0

    def install(self) -> None:
        from hasync.wire import client

        original = client._read_all
        counter = self

        def read_all(response: http.client.HTTPResponse, limit: int = 512 * 1024 * 1024) -> bytes:
            # Hold a duplicate of the socket's descriptor from before the read: from Python 3.13
            # on, read1() closes `response.fp` as soon as Content-Length bytes have arrived
            # (cpython gh-113199), and with `Connection: close` that was the socket's last
            # reference, so afterwards the socket is closed and TCP_INFO unreadable.
            raw = getattr(response.fp, "raw", None)
            sock = getattr(raw, "_sock", None)
            probe = socket.fromfd(sock.fileno(), sock.family, sock.type) if sock is not None else None
            try:
                data = original(response, limit)
                counter.total += tcp_bytes(probe)
            finally:
                if probe is not None:
                    probe.close()
            counter.connections += 1
            return data

        client._read_all = read_all


def peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    worker would report the peak of the driver it was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def emit(**fields: Any) -> None:
    fields.setdefault("rss_kb", peak_rss_kb())
    print(json.dumps(fields), flush=True)


# --- operations -------------------------------------------------------------------------------


def op_sync(args: argparse.Namespace) -> None:
    from hasync.config.items import SyncItemRegistry
    from hasync.config.store import ConfigStore
    from hasync.sync.run import SyncOptions, SyncRun

    counter = WireCounter()
    counter.install()
    options = SyncOptions(full=args.full, fast_path=not args.compat)
    registry = SyncItemRegistry.load()
    started = time.perf_counter()
    result = SyncRun(ConfigStore(args.conf_dir), registry, options).run()
    seconds = time.perf_counter() - started
    emit(op="sync", seconds=seconds, wire=counter.total, connections=counter.connections,
         status=result.status, message=result.message, steps=[s._asdict() for s in result.steps],
         body_sent=result.bytes_sent, body_received=result.bytes_received, transfer=result.transfer)


def op_status(args: argparse.Namespace) -> None:
    from hasync.config.items import SyncItemRegistry
    from hasync.config.store import ConfigStore
    from hasync.sync.status import Remote

    counter = WireCounter()
    counter.install()
    remote = Remote(ConfigStore(args.conf_dir), SyncItemRegistry.load())
    started = time.perf_counter()
    remote.version()
    remote.services()
    seconds = time.perf_counter() - started
    emit(op="status", seconds=seconds, wire=counter.total, connections=counter.connections, status="ok")


def op_cli(args: argparse.Namespace) -> None:
    """Any CLI subcommand (e.g. `diff`), in process, output swallowed."""
    from hasync import cli

    counter = WireCounter()
    counter.install()
    sink = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        try:
            code = cli.main(["--conf-dir", str(args.conf_dir), *args.argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    seconds = time.perf_counter() - started
    emit(op="cli", seconds=seconds, wire=counter.total, connections=counter.connections, exit_code=code,
         status="ok" if code in (0, 1) else "error", output_bytes=len(sink.getvalue()))


def op_parse(args: argparse.Namespace) -> None:
    """Limit (a): lxml parse + serialize of the config, with the project's parser settings."""
    from hasync.config.store import parse_config_bytes, serialize

    data = Path(args.file).read_bytes()
    started = time.perf_counter()
    root = parse_config_bytes(data, args.file)
    out = serialize(root)
    seconds = time.perf_counter() - started
    emit(op="parse", seconds=seconds, bytes=len(out))


def op_fsync(args: argparse.Namespace) -> None:
    """Limit (c): write the file's bytes to a new file and fsync it."""
    data = Path(args.file).read_bytes()
    target = Path(args.dest)
    started = time.perf_counter()
    write_fsynced(target, data)
    seconds = time.perf_counter() - started
    target.unlink()
    emit(op="fsync", seconds=seconds, bytes=len(data))


def write_fsynced(target: Path, data: bytes) -> None:
    """`data` into a new file `target`, then fsync: what limit (c) times."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def op_post(args: argparse.Namespace) -> None:
    """Limit (b): one HTTPS POST of the file's bytes to the sink, connect to last reply byte."""
    data = Path(args.file).read_bytes()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", args.port, context=context, timeout=120)
    conn.request("POST", "/sink", body=data, headers={"Content-Type": "text/xml"})
    sock = conn.sock
    response = conn.getresponse()
    reply = response.fp.read(2) if response.fp is not None else b""  # keeps the socket open for TCP_INFO
    wire = tcp_bytes(sock)
    response.close()
    conn.close()
    seconds = time.perf_counter() - started
    emit(op="post", seconds=seconds, wire=wire, status="ok" if reply == b"ok" else "error")


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read1(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def op_sink(args: argparse.Namespace) -> None:
    """The POST sink: TLS with the agent's settings, reads and discards the body."""
    from hasync.wire.tls import server_context

    server = ThreadingHTTPServer(("127.0.0.1", args.port), _SinkHandler)
    context = server_context(Path(args.cert), Path(args.key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("sink listening", flush=True)
    sys.stdin.read()  # run until the driver closes our stdin
    server.shutdown()


def op_floor(args: argparse.Namespace) -> None:
    """The steps of a fast-path full sync that libxml2, zlib, hashlib and the kernel do, timed one
    after another in one process, with no Python of the project's between them: a floor under the
    fast-path row for this design (both ends parse, the sections are serialised and compressed
    once, config.xml is written twice with fsync: the history copy, then in place). The network
    is not counted (limit b is a whole 20 MB POST; the fast path sends the compressed sections)."""
    import hashlib
    import zlib

    from lxml import etree

    from hasync.config.items import SyncItemRegistry, read_hasync
    from hasync.config.store import parse_config_bytes, serialize
    from hasync.core import xmlsafe
    from hasync.wire import sections
    from hasync.wire.deflate import ParallelDeflate

    primary_data, backup_data = Path(args.primary).read_bytes(), Path(args.backup).read_bytes()
    registry = SyncItemRegistry.load()
    backup = parse_config_bytes(backup_data, args.backup)  # (the agent holds it parsed already)
    steps: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[name] = now - clock
        clock = now

    root = parse_config_bytes(primary_data, args.primary)
    step("primary: parse config.xml")
    groups = [sections.locate(root, dotted) or [] for dotted in registry.sections_for(read_hasync(root).syncitems)]
    clock = time.perf_counter()
    document = b"".join([b"<sections>", *(etree.tostring(node, encoding="utf-8") for group in groups for node in group),
                         b"</sections>"])
    step("primary: serialise the sections")
    hashlib.sha256(document).digest()
    compressor = ParallelDeflate(sections.COMPRESS_LEVEL)
    compressor.write(document)
    stream = b"".join(compressor.finish())
    step("primary: sha256 and compress")
    inflated = zlib.decompress(stream)
    hashlib.sha256(inflated).digest()
    step("backup: inflate and sha256")
    xmlsafe.parse_bytes(inflated, remove_blank_text=False)
    step("backup: parse the sections")
    data = serialize(backup)
    hashlib.sha256(data).digest()
    step("backup: serialise config.xml and sha256")
    for target in (Path(args.dest), Path(args.dest + ".2")):
        write_fsynced(target, data)
    step("backup: write + fsync, twice")
    for target in (Path(args.dest), Path(args.dest + ".2")):
        target.unlink()
    emit(op="floor", seconds=sum(steps.values()), steps=steps)


def op_settle(args: argparse.Namespace) -> None:
    """Write the backup's config once through the store, as OPNsense's own writes do, so it is the
    newest history file (a first merge into a config copied in by hand also preserves a copy)."""
    from hasync.config.store import ConfigStore

    store = ConfigStore(args.conf_dir)
    store.write(store.load(), "bench: settled")
    emit(op="settle", seconds=0.0)


def op_baseline(_args: argparse.Namespace) -> None:
    """The interpreter plus every module a sync imports: the floor under every client RSS."""
    from hasync.sync import snapshot  # noqa: F401

    emit(op="baseline", seconds=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one benchmark operation (used by bench/run.py)")
    sub = parser.add_subparsers(dest="op", required=True)
    sync = sub.add_parser("sync")
    sync.add_argument("--conf-dir", required=True)
    sync.add_argument("--full", action="store_true")
    sync.add_argument("--compat", action="store_true")
    sync.set_defaults(func=op_sync)
    status = sub.add_parser("status")
    status.add_argument("--conf-dir", required=True)
    status.set_defaults(func=op_status)
    cli = sub.add_parser("cli")
    cli.add_argument("--conf-dir", required=True)
    cli.add_argument("argv", nargs=argparse.REMAINDER)
    cli.set_defaults(func=op_cli)
    parse = sub.add_parser("parse")
    parse.add_argument("file")
    parse.set_defaults(func=op_parse)
    fsync = sub.add_parser("fsync")
    fsync.add_argument("file")
    fsync.add_argument("dest")
    fsync.set_defaults(func=op_fsync)
    post = sub.add_parser("post")
    post.add_argument("file")
    post.add_argument("--port", type=int, required=True)
    post.set_defaults(func=op_post)
    floor = sub.add_parser("floor")
    floor.add_argument("primary")
    floor.add_argument("backup")
    floor.add_argument("dest")
    floor.set_defaults(func=op_floor)
    settle = sub.add_parser("settle")
    settle.add_argument("--conf-dir", required=True)
    settle.set_defaults(func=op_settle)
    baseline = sub.add_parser("baseline")
    baseline.set_defaults(func=op_baseline)
    sink = sub.add_parser("sink")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--cert", required=True)
    sink.add_argument("--key", required=True)
    sink.set_defaults(func=op_sink)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
