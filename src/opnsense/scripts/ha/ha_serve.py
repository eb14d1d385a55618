#!/usr/local/bin/python3
"""The backup agent in the foreground for rc.d `opnsense_ha` (`opnsense-ha serve ARGS`); stops on SIGTERM."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_script(["serve", *sys.argv[1:]]))
