"""The way to members: the HTTP/1.1 client, pools, balancing, health, and the proxy handler.

``client.py`` (the lean client and its sans-I/O response parser, idle
connection pools per member), ``pool.py`` (members from config and registry,
health checks, passive ejection, ``max_conns`` + queue), ``balancer.py``,
``proxy.py`` (the terminal handler for pool routes: buffer, retry, buffer
back), ``websocket.py`` (101 pass-through on websocket routes).

May import: edge.core, edge.http, carousel; never a feature, the front or main.
"""
