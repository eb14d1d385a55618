#!/usr/local/bin/python3
"""configd `ha sync` (script): push the configured sync items to the backup (`opnsense-ha sync`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_script(["sync"]))
