#!/usr/bin/env bash
# Failover measurements on the Vagrant lab: crash, graceful halt and rolling restart
# of the edges, timed with dig against ns1. Run from this directory after `vagrant up`.
#   ./failover.sh                 all three experiments
#   ./failover.sh crash           one of them
#   ./failover.sh --dry-run       simulated cluster, commands printed, nothing touched
# Each command's whole output (vagrant, ansible-playbook) goes to its own file under
# failover-logs/<UTC date and time>/ (--log-dir DIR to choose), so a failed step can be
# read afterwards. Options: ./failover.sh --help. Needs python3 and dig (bind9-dnsutils).
set -euo pipefail
cd "$(dirname "$0")"
exec python3 failover.py "$@"
