"""The backup's XML-RPC agent: server, authentication, opnsense.* and hasync.* methods, fast path."""
