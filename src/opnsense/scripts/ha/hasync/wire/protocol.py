"""The few conventions between two opnsense-ha nodes beyond OPNsense's own XML-RPC.

Both ends need them (the primary sends, the agent reads), so they live here rather than in
either side: two request headers, and the text a lock-out refusal ends with, by which a primary
recognises it even through the compatible path.
"""

from __future__ import annotations

#: Request header (value "1") by which `sync --allow-lockout` asks the agent to merge anyway.
ALLOW_LOCKOUT_HEADER = "X-Opnsense-Ha-Allow-Lockout"
#: Request header of a merge that is to be confirmed: "<seconds> <id>" (`sync --confirm`).
CONFIRM_HEADER = "X-Opnsense-Ha-Confirm"
#: Every lock-out refusal ends with this.
LOCKOUT_MARK = "the primary would be locked out of this backup"
