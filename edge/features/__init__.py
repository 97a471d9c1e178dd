"""Features: the pipeline steps around the terminal handler, each one module or package.

Each depends on edge.core and edge.http only, never on another feature, on the
upstream layer or on the front (import-linter: "each feature stands alone").
Each has the shape ``feature(config, ctx) -> Feature | None`` (None: off).

ORDER MATTERS. It is fixed here and nowhere else (``FEATURE_ORDER``, outermost
first; features are named by module path and imported when the edge is built):

* ``dos`` first of all: a banned or flooding client should cost as little as
  possible. Connection limits and bans at accept live outside the chain
  (edge/core/limits.py); oversized requests never reach it (edge/http/http1.py).
* ``tls`` (https.py) next: plain HTTP redirected to HTTPS before any work, HSTS
  on every HTTPS answer the features below produce.
* ``headers`` then: everything after it sees the cleaned request, and the
  response is cleaned after every other feature touched it.
* user features next (``[edge] features``, "package.module:factory"), so they
  see (and may veto) requests before any expensive work.
* ``cache`` then ``compression``: the cache after user features, so a user's
  veto (authentication, say) is never bypassed by a hit; compression inside the
  cache, so compressed variants are stored and compressed once.
* The forward proxy is a separate listener with its own chain
  (edge/front/forward/chain.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.core.pipeline import load_factory

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.pipeline import EdgeContext, Feature

# Built-in features, outermost first. "user" marks where [edge] features run.
USER_FEATURES = "user"
FEATURE_ORDER: tuple[str, ...] = (
    "edge.features.dos:feature",
    "edge.features.https:feature",
    "edge.features.headers:feature",
    USER_FEATURES,
    "edge.features.cache:feature",
    "edge.features.compress:feature",
)


def build_features(config: Config, ctx: EdgeContext) -> list[Feature]:
    """Instantiate the features in FEATURE_ORDER, with user features at their slot."""
    features: list[Feature] = []
    for spec in FEATURE_ORDER:
        specs = config.edge.features if spec == USER_FEATURES else [spec]
        for s in specs:
            feature = load_factory(s)(config, ctx)
            if feature is not None:
                features.append(feature)
    return features
