"""Between the nodes: the XML-RPC codec, the HTTPS client and trust store, TLS, peer features."""
