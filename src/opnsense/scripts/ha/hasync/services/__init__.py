"""Services of a node: listing, start/stop/restart, the services-dir stand-in."""
