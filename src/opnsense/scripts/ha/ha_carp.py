#!/usr/local/bin/python3
"""configd `ha carp_*` actions: `opnsense-ha carp status|maintenance|set-status|preempt|disable|enable|event`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.family_action("carp", configd.CARP_ACTIONS, sys.argv[1:]))
