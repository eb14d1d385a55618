"""`opnsense-ha serve`: run the backup agent in the foreground (pinned command line)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hasync.agent.serve import DEFAULT_PORT, DEFAULT_STATE_DIR, ServeOptions, build_server
from hasync.agent.server import AgentLimits, run_until_signalled
from hasync.cli.commands.common import failover_backend
from hasync.core.memory import single_malloc_arena


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the backup agent (XML-RPC over HTTPS) in the foreground")
    parser.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", metavar="ADDR:PORT")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="FILE")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="FILE")
    parser.add_argument("--cert-ref", default=None, metavar="REFID",
                        help="serve the config.xml certificate with this refid (default: the web GUI's)")
    parser.add_argument("--plain-http", action="store_true", help="serve without TLS (explicit opt-in)")
    parser.add_argument("--allow-loopback", action="store_true",
                        help="accept requests from this server's own address (demo and tests)")
    parser.add_argument("--services-dir", type=Path, default=None, metavar="DIR",
                        help="drop-in directory of service JSON files (instead of OPNsense's pluginctl)")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR), metavar="DIR",
                        help=f"generated certificate and agent state (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--accept-unknown-sections", action="store_true",
                        help="merge sections no registered sync item covers")
    parser.add_argument("--max-body-mb", type=int, default=128, help="request body limit in MiB (default 128)")
    parser.add_argument("--no-extensions", action="store_true",
                        help="offer only OPNsense's opnsense.* methods, no hasync.* (behave like a stock backup)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = ServeOptions(
        conf_dir=Path(args.conf_dir),
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cert_ref=args.cert_ref or None,
        plain_http=args.plain_http,
        allow_loopback=args.allow_loopback,
        services_dir=args.services_dir,
        state_dir=args.state_dir,
        items_dir=Path(args.items_dir) if args.items_dir else None,
        accept_unknown_sections=args.accept_unknown_sections,
        limits=AgentLimits(max_body=args.max_body_mb * 1024 * 1024),
        extensions=not args.no_extensions,
    )
    single_malloc_arena()  # before any thread starts (see hasync.core.memory)
    server = build_server(options, failover_backend(args.conf_dir))
    run_until_signalled(server, lambda: print(f"opnsense-ha agent listening on {server.url}", flush=True))
    return 0
