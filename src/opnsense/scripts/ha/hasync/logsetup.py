"""Logging for the CLI: human lines on stderr, and the local syslog with ident `opnsense-ha`.

Every module logs through a `hasync.*` logger; attaching the syslog handler once to the `hasync`
logger gives one syslog line per event, whichever command runs, as OPNsense's tools do.
"""

from __future__ import annotations

import logging
import os

SYSLOG_SOCKET = "/dev/log"
IDENT = "opnsense-ha"


def setup_syslog(logger: logging.Logger | None = None) -> None:
    """Send `logger` (default: `hasync`) to the local syslog if there is one; idempotent."""
    logger = logger or logging.getLogger("hasync")
    if not os.path.exists(SYSLOG_SOCKET):
        return
    from logging.handlers import SysLogHandler  # only where there is a syslog (saves start-up elsewhere)

    if any(isinstance(h, SysLogHandler) for h in logger.handlers):
        return
    try:
        handler = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_USER)
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"{IDENT}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
