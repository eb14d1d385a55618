#!/usr/local/bin/python3
"""configd `ha check` (JSON, cron): health checks of the pair (`opnsense-ha check --json`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["check", "--json"]))
