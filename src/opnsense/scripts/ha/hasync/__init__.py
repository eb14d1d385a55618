"""opnsense-ha: High Availability engine for OPNsense.

The package is usable as a library: the CLI (`hasync.cli`) and the configd scripts are thin
wrappers around the modules here.
"""

__version__ = "0.1.0"
