#!/usr/bin/env bash
# Failover measurements on the Vagrant lab: crash, graceful halt and rolling restart
# of the edges, timed with dig against ns1. Run from this directory after `vagrant up`.
#   ./failover.sh                 all three experiments
#   ./failover.sh crash           one of them
#   ./failover.sh --dry-run       simulated cluster, commands printed, nothing touched
# Options: ./failover.sh --help. Needs python3 and dig (bind9-dnsutils).
set -euo pipefail
cd "$(dirname "$0")"
exec python3 failover.py "$@"
