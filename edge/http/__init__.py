"""HTTP without I/O: bytes in, parsed requests out (h11's "bring your own I/O").

``http1.py`` is the strict HTTP/1.1 request parser (the smuggling rules live
there); ``request.py`` is the complete ``Request`` the pipeline sees and the
``ClientSide`` Protocol a client connection offers it. A second protocol
(HTTP/2) adds its sans-I/O adapter here, producing the same ``Request``.

May import: the standard library and multidict. Nothing from the edge above.
"""
