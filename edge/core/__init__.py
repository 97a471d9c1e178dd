"""The pipeline interface and what every layer shares.

``pipeline.py`` (Exchange, Reply, Body kinds, the Feature contract, chains),
``config.py`` (the schema: every option with its default), ``routing.py``,
``fields.py`` (HTTP field rules several parts apply), ``spool.py`` (a body
received into memory, then a temp file), ``errors.py``, ``metrics.py``,
``limits.py`` (connection admission and the table of every hard limit).

May import: edge.http and the shared package carousel; never features,
upstream, front or main (a type needed from above is a Protocol here).
"""
