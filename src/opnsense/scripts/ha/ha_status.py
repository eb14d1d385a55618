#!/usr/local/bin/python3
"""configd `ha status` (JSON): the backup's versions and services in one document."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["status", "--json"]))
