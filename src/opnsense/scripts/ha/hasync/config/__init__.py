"""config.xml and what describes it: the crash-safe store, the XML tree helpers, sync items."""
