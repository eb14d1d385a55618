#!/usr/local/bin/python3
"""configd `ha services` (JSON, cached 5 s by configd): `{"response": [services of the backup]}`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_json(["services", "list"]))
