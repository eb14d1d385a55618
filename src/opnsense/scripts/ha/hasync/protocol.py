"""Our own additions to the XML-RPC POST, shared by the agent and the primary.

A stock OPNsense peer ignores unknown headers, so the safety switches of a sync ride on the
request as headers rather than as new parameters of OPNsense's methods (whose signatures stay
exactly PHP's). Kept apart from the agent so the primary does not load the server to name them.
"""

from __future__ import annotations

#: Request header (value "1") by which `sync --allow-lockout` asks the agent to merge anyway (lockout.py).
ALLOW_LOCKOUT_HEADER = "X-Opnsense-Ha-Allow-Lockout"
#: Request header of a merge that is to be confirmed: "<seconds> <id>" (confirm.py, armed_rollback.py).
CONFIRM_HEADER = "X-Opnsense-Ha-Confirm"
#: Every lock-out refusal ends with this; the primary recognises a lock-out by it (also through a stock path).
LOCKOUT_MARK = "the primary would be locked out of this backup"
