"""Between the nodes: the XML-RPC codec, the HTTPS client and trust store, TLS, the fast path's wire
form (`sections`), what a peer offers (`discovery`), our own headers (`protocol`)."""
