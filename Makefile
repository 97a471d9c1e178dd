# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench-dns bench-edge clean vm-deps vm-box vm-lab vm-lab-down vm-failover

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/carousel demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest tests/unit tests/integration tests/vm
	$(BIN)/pytest tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-dns: $(STAMP)
	$(BIN)/python bench/dns_bench.py

bench-edge: $(STAMP)
	$(BIN)/python bench/edge_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# The VM lab (vagrant/README.md): Debian 12 VMs under Vagrant + libvirt, sealed in a
# network namespace, provisioned by deploy/ansible/site.yml. As root.
VM_DEBS := vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-utils \
	qemu-system-x86 mmdebstrap fdisk dnsmasq-base iptables ansible etcd-client \
	bind9-dnsutils curl openssh-client iproute2 python3-pip

vm-deps:
	@missing=$$(for p in $(VM_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends $$missing; fi

vm-box: vm-deps
	$(PYTHON) vagrant/vmlab.py box

vm-lab: vm-deps $(STAMP)
	$(PYTHON) vagrant/vmlab.py up

vm-failover:
	$(PYTHON) vagrant/vmlab.py exec ./failover.sh --repeat 5 crash halt rolling etcd-member etcd-quorum dnsd upgrade

vm-lab-down:
	$(PYTHON) vagrant/vmlab.py down
