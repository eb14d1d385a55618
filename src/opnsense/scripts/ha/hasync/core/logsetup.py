"""Logging for the CLI: human lines on stderr, and the local syslog with ident `opnsense-ha`.

Every module logs through a `hasync.*` logger; attaching the syslog handler once to the `hasync`
logger gives one syslog line per event, whichever command runs, as OPNsense's tools do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

# FreeBSD's syslogd (and OPNsense's syslog-ng) listen on /var/run/log; Linux has /dev/log.
SYSLOG_SOCKETS = ("/var/run/log", "/dev/log")
IDENT = "opnsense-ha"


def syslog_socket() -> str:
    """This system's local syslog socket: the first of SYSLOG_SOCKETS that is a socket (else
    /dev/log). Only a socket counts: on some Linux systems /var/run/log is a directory."""
    for path in SYSLOG_SOCKETS:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
    return SYSLOG_SOCKETS[-1]


def setup_syslog(logger: logging.Logger | None = None) -> None:
    """Send `logger` (default: `hasync`) to the local syslog if there is one; idempotent."""
    logger = logger or logging.getLogger("hasync")
    socket_path = syslog_socket()
    if not os.path.exists(socket_path):
        return
    from logging.handlers import SysLogHandler  # only where there is a syslog (saves start-up elsewhere)

    if any(isinstance(h, SysLogHandler) for h in logger.handlers):
        return
    try:
        handler = SysLogHandler(address=socket_path, facility=SysLogHandler.LOG_USER)
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"{IDENT}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
