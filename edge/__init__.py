"""The edge: an L7 reverse proxy that routes, serves static files, balances and buffers.

Layers, top to bottom; each imports only from the layers below it (import-linter
contracts in pyproject.toml; edge/README.md draws the request's path through them):

    main.py, testing/   run the edge; helpers that start one in tests and benchmarks
    front/              what faces clients: listeners, the client connection, TLS, passthrough,
                        the forward proxy, and the Edge that assembles everything
    features/           pipeline steps (dos, tls redirect/HSTS, headers, cache, compression,
                        static files), each on its own
    upstream/           beside them, the way to members: client, pools, balancing, the proxy
    core/               the pipeline interface (Exchange, Reply, Body, Feature), config schema,
                        routing, shared HTTP field rules, errors, metrics, limits
    http/               HTTP without I/O: the HTTP/1.1 parser, the Request the pipeline sees
"""
