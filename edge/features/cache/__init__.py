"""The edge's RFC 9111 shared cache: policy (rules), key, store (memory), disk, coalesce, purge, feature.

``edge.features.cache:feature`` is the pipeline factory (see edge/core/pipeline.py FEATURE_ORDER).
"""

from edge.features.cache.feature import CacheFeature, feature

__all__ = ["CacheFeature", "feature"]
