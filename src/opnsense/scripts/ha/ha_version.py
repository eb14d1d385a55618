#!/usr/local/bin/python3
"""configd `ha version` (JSON): the backup's firmware versions plus this node's `_my_version`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["version"]))
