"""Pair health on the primary: diff against the backup, checks for cron and monit."""
