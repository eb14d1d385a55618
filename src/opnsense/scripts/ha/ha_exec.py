#!/usr/local/bin/python3
"""configd `ha exec <action> <service> <id>` (JSON): the contract of OPNsense's ha_xmlrpc_exec.php."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.exec_action(sys.argv[1:]))
