"""Where a node keeps its own state, derived from its conf dir (nothing else is hard-wired).

Every layer needs it (the primary's pins and snapshot, the agent's caches, rollback's journal),
so it lives at the bottom instead of in the sync run that first needed it.
"""

from __future__ import annotations

from pathlib import Path

STATE_DIR_NAME = "ha-state"


def state_dir(conf_dir: str | Path) -> Path:
    """Per-node state of opnsense-ha (TOFU pins, last pushed snapshot, caches), next to config.xml."""
    return Path(conf_dir) / STATE_DIR_NAME
