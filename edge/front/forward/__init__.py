"""The forward proxy (issue 9): clients reach origins through the edge, which can refuse, cache and anonymise.

Modules: ``listener`` (the listener, answering, writing), ``chain`` (the feature
order: auth, destination, headers, cache), ``policy`` (target parsing, ports,
name lists, address blocks), ``auth`` (Basic credentials, password hashes),
``origin`` (resolving, connecting, the plain-HTTP terminal), ``tunnel``
(CONNECT), ``pages`` (403/407/5xx pages), ``metrics``.
"""

from edge.front.forward.listener import ForwardProxy

__all__ = ["ForwardProxy"]
