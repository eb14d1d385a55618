#!/usr/local/bin/python3
"""configd `ha boot` (JSON): re-apply maintenance mode and preempt at boot (`opnsense-ha boot --json`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["boot", "--json"]))
