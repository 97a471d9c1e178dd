"""What faces clients, and the assembly of the whole edge.

``server.py`` (the ``Edge``: builds routes, pools, features and listeners from
the config, answers each request, shuts down gracefully), ``connection.py``
(the HTTP/1.1 client protocol: keep-alive, pipelining, buffering, framing),
``tls.py`` (termination: certificates by SNI, reload), ``h2accept.py``,
``h2conn.py`` and ``h2stream.py`` (HTTP/2 clients by ALPN or h2c prior knowledge:
how they arrive, the connection, its streams), ``passthrough.py`` (TLS
passthrough by SNI), ``forward/`` (the forward proxy, its own listener and chain).

May import: every layer below (features, upstream, core, http) and carousel;
never main.
"""
