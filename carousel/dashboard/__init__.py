"""`carousel dashboard`: a live view of the cluster in the browser, and the operator's actions.

config.py   the [dashboard] TOML, validated into typed objects
scrape.py   Prometheus text and agent /status into plain numbers (no I/O)
view.py     ClusterView: registry + scrapes -> the document the page shows, with 15 min of history
collect.py  the I/O: etcd mirrors, lease TTLs, scraping every admin endpoint on a timer
server.py   the aiohttp listener: page, live stream (SSE), actions behind the admin token
main.py     the command
"""
