#!/usr/local/bin/python3
"""configd `ha pfsync_status` / `ha pfsync_apply` (JSON): `opnsense-ha pfsync status|apply --json`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.family_action("pfsync", configd.PFSYNC_ACTIONS, sys.argv[1:]))
