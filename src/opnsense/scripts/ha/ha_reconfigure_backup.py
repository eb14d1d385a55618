#!/usr/local/bin/python3
"""configd `ha reconfigure_backup` (script, cron): sync, then restart the backup's services.

Only when every CARP VIP is MASTER here (pre_check_master). actions_ha.conf runs it under
`flock -n`, so two runs never overlap."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hasync import configd

configd.exit_process(configd.run_script(["sync", "--pre-check-master", "--restart-services"]))
