"""The TableBuilder a config asks for: zones, answer policy, DNSSEC signers, sites, cookies.

Apart from daemon.py because a worker process (worker.py) needs it and
nothing of etcd: importing the etcd client (aetcd, gRPC, protobuf) cost each
worker about 0.1 s of CPU at every start, on the core its peers start on.
"""

from __future__ import annotations

import os

from dnsd import wire
from dnsd.build import TableBuilder
from dnsd.config import Config
from dnsd.cookies import Secrets, ServerCookies
from dnsd.dnssec.setup import signers_from_config
from dnsd.sites import SiteMap, site_order
from dnsd.zone import compile_zones


def make_builder(config: Config) -> TableBuilder:
    """The table builder for this config's zones, answer policy, signers, sites and cookies."""
    builder = TableBuilder(
        compile_zones(config.zone),
        max_answer_records=config.dns.max_answer_records,
        all_down=config.dns.all_down,
        degraded_ttl=config.dns.degraded_ttl,
        payload_size=config.dns.udp_payload_size,
        signers=signers_from_config(config),
        unknown_rcode=wire.SERVFAIL if refuses_unknown(config) else wire.NOERROR,
    )
    if config.dns.sites:
        builder.site_map = SiteMap({name: site.networks for name, site in config.dns.sites.items()})
        fallbacks = {name: site.fallback for name, site in config.dns.sites.items()}
        builder.site_orders = {name: site_order(name, fallbacks) for name in config.dns.sites}
    if config.dns.cookies.enabled:
        # A local secret until the cluster's is read from etcd (SecretKeeper).
        builder.cookies = ServerCookies(Secrets(os.urandom(16)))
    return builder


def refuses_unknown(config: Config) -> bool:
    """With snapshots on and past_max_age = "refuse", knowing nothing servable answers SERVFAIL.

    SERVFAIL (not NODATA) sends resolvers to another of the zone's servers, which
    may have current data (RFC 1035 4.1.1, RFC 2308 7.1).
    """
    return bool(config.snapshot.directory) and config.snapshot.past_max_age == "refuse"
