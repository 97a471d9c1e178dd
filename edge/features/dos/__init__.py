"""The `dos` feature (the notes' mod_dosdetector): per-client rate and concurrency, cluster-wide bans.

Theory of operation
-------------------
The client is the peer address or, when the peer is a trusted proxy, the
rightmost X-Forwarded-For hop that is not one (the headers feature's rule).
IPv6 clients are counted and banned per ``/ipv6_prefix`` network, because one
host owns a whole /64; IPv4-mapped IPv6 peers count as their IPv4 address.

Rate: per client, a sliding window made of two fixed windows (the previous
one weighted by how much of it still overlaps, plus the current one). A
request costs a dict lookup and a few float operations; idle clients are
swept every window. Concurrency: open connections per peer address (from the
ConnectionGuard), or requests in flight for clients behind a trusted proxy,
whose connections are the proxy's.

* Soft threshold (rate over ``soft_rate`` or concurrency over
  ``soft_connections``): 429 with Retry-After, or a delay before serving.
  Rejected requests still count, so a client that ignores 429 keeps climbing.
* Hard threshold (rate over ``hard_rate`` or ``hard_connections`` open
  connections, the latter seen at accept): a ban for ``ban_seconds``. It
  holds at once on this edge (403 + close; new connections closed at accept;
  idle keep-alive connections closed) and is published to etcd as a
  BanRecord under ``{prefix}bans/{address}`` with a lease as long as the ban,
  so it expires by itself and nobody has to clean up.
* Every edge mirrors ``{prefix}bans/`` (snapshot + watch), so a ban made by
  any edge, or by an operator with etcdctl, is enforced everywhere as soon as
  the watch event lands (milliseconds). While etcd is away, local bans still
  work and the known remote ones stay in force until their ``until``.

Allowlisted networks are never limited nor banned. ``dry_run`` detects, logs
and counts everything as ``would_*`` and enforces and publishes nothing.
With ``workers = N`` the counts are the node's (edge/core/node.py): the
rate and the open connections of a client are summed over every worker's
column of a shared table, so a client spread over many connections is limited
as with one worker; a ban made by one worker reaches the others over the
node's bus within milliseconds, with or without etcd.

Requests that match no route are counted too (the edge calls ``unrouted``):
a scanner hammering unknown hosts is limited and banned like anyone else.

Modules: ``detector`` (the pipeline step, bans made and mirrored), ``bans``
(client keys, the ban table), ``metrics`` (the Prometheus families).
``edge.features.dos:feature`` is the pipeline factory.
"""

from edge.features.dos.bans import BanTable, ClientKeys
from edge.features.dos.detector import DosContext, DosDetector, IdleClosable, _Client, feature

__all__ = ["BanTable", "ClientKeys", "DosContext", "DosDetector", "IdleClosable", "_Client", "feature"]
