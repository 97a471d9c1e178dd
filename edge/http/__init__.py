"""HTTP without I/O: bytes in, parsed requests out (h11's "bring your own I/O").

``http1.py`` is the strict HTTP/1.1 request parser (the smuggling rules live
there); ``request.py`` is the complete ``Request`` the pipeline sees and the
``ClientSide`` Protocol a client connection offers it. ``h2.py`` is the HTTP/2
side (the h2 package configured as a server, RFC 9113 section 8 checks), producing
the same ``Head``.

May import: the standard library, multidict and h2 (python-hyper). Nothing from the edge above.
"""
