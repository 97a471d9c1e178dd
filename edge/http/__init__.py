"""HTTP without I/O: bytes in, parsed requests out (h11's "bring your own I/O").

``http1.py`` is the strict HTTP/1.1 request parser (the smuggling rules live
there); ``request.py`` is the complete ``Request`` the pipeline sees and the
``ClientSide`` Protocol a client connection offers it. ``h2wire.py`` is HTTP/2's
framing, stream states and flow control, ``h2hpack.py`` its response header
encoding, and ``h2.py`` its RFC 9113 section 8 request rules, producing the same ``Head``.

May import: the standard library, multidict and hpack (python-hyper). Nothing from the edge above.
"""
