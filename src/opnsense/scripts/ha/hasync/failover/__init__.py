"""Failover control: CARP/pfsync on OPNsense, keepalived/conntrackd/nftables on Linux."""
