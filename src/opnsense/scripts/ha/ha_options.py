#!/usr/local/bin/python3
"""configd `ha options` (JSON): the sync items this node offers, `{id: description}` like `pluginctl -x`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["items"]))
