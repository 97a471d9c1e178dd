# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-pure test-browser screenshots lint typecheck conformance bench-dns bench-edge fuzz soak clean \
	vm-deps vm-box vm-lab vm-lab-down vm-failover

$(STAMP): pyproject.toml setup.py
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
	$(BIN)/mypy $(LAB_SCRIPTS)
	$(BIN)/lint-imports
	$(BIN)/pytest $(XDIST) $(DURATIONS) tests/unit tests/integration tests/vm
	$(PURE) $(BIN)/pytest $(XDIST) tests/unit $(EDGE_TESTS) $(DNSD_LOOP_TESTS)
	$(BIN)/pytest tests/browser
	$(BIN)/pytest tests/e2e

# The lab's code that is not a package (pyproject's mypy section lists the packages; mypy
# takes packages or files, not both): the VM lab driver, the failover script, the netns lab.
LAB_SCRIPTS := vagrant/failover.py vagrant/vmlab.py lab

# Two pytest workers (pytest-xdist), each file's tests kept together in one worker (their
# module fixtures and order as in one process). The suite mostly waits on daemons, timers
# and etcd: one process kept one core ~30 % busy, so two share the CI machine's two cores.
# e2e and the browser test stay in one process: they measure failover against the clock.
# --no-loadscope-reorder keeps tests/conftest.py's order (the longest files first) instead of
# xdist's (the files with the most tests first), which handed out the few-test Ansible files
# last and left one worker idle for minutes at the end.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
# The first pass lists its slowest tests, so CI's log shows where its minutes go (the
# 15-minute budget; tests/conftest.py orders the files longest first from such lists).
DURATIONS ?= --durations=25 --durations-min=5

# The edge's hot modules run compiled when `pip install` found a C compiler (setup.py); the
# same tests again on the pure-Python sources, which stay the fallback. `make test` runs the
# unit tests and the edge's integration tests both ways; `make test-pure` runs everything pure.
# The pure pass leaves out the unit test files whose code reaches no compiled module and starts
# no Python (tests/pure_scope.py, read from their imports): both passes would run them alike.
# dnsd's receive loop is compiled too (dnsd/_udploop.c): its batch test runs both ways.
PURE       := CAROUSEL_PURE_PYTHON=1
EDGE_TESTS := $(wildcard tests/integration/test_edge_*.py tests/integration/test_cache_*.py \
	tests/integration/test_compress.py tests/integration/test_slowloris.py \
	tests/integration/test_forward_*.py tests/integration/test_tls_termination.py)
DNSD_LOOP_TESTS := tests/integration/test_dnsd_mmsg_batch.py
test-pure: $(STAMP)
	$(PURE) $(BIN)/pytest $(XDIST) tests/unit tests/integration
	$(PURE) $(BIN)/pytest tests/e2e

# The cache-tests.fyi suite (npm http-cache-tests) against the edge's cache; needs node and npm.
conformance: $(STAMP)
	$(BIN)/python tests/conformance/cache_tests.py

# The dashboard in Debian's chromium, driven by playwright-core from npm (skips without
# chromium or node). `make screenshots` runs it to regenerate docs/dashboard.png.
test-browser: $(STAMP)
	$(BIN)/pytest tests/browser -s

screenshots: $(STAMP)
	CAROUSEL_SCREENSHOTS=docs $(BIN)/pytest tests/browser -s

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy $(LAB_SCRIPTS)
	$(BIN)/lint-imports

bench-dns: $(STAMP)
	$(BIN)/python bench/dns_bench.py

bench-edge: $(STAMP)
	$(BIN)/python bench/edge_bench.py

# Coverage-guided fuzzing (atheris/libFuzzer), see fuzz/README.md: the DNS parser and
# responder for FUZZ_RUNS inputs, then each other harness for FUZZ_SECONDS.
FUZZ_RUNS    ?= 1000000
FUZZ_SECONDS ?= 120
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.dns -runs=$(FUZZ_RUNS)
	$(BIN)/python -m fuzz.http1 -max_total_time=$(FUZZ_SECONDS)
	$(BIN)/python -m fuzz.registry -max_total_time=$(FUZZ_SECONDS)
	$(BIN)/python -m fuzz.config -max_total_time=$(FUZZ_SECONDS)

# Soak: steady HTTP + DNS load through a loopback cluster while daemons are killed and
# restarted on a schedule (bench/soak.py). A quick try that still kills all four kinds:
# make soak SOAK_SECONDS=60 SOAK_ARGS="--interval 5 --down 3"
SOAK_SECONDS ?= 600
SOAK_ARGS    ?=
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# The VM lab (vagrant/README.md): Debian 12 VMs under Vagrant + libvirt, sealed in a
# network namespace, provisioned by deploy/ansible/site.yml. As root.
VM_DEBS := vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-utils \
	qemu-system-x86 mmdebstrap fdisk dnsmasq-base iptables ansible etcd-client \
	bind9-dnsutils curl openssh-client iproute2 python3-pip

# DPkg::Lock::Timeout: wait for another apt-get (on a fresh machine one often runs) instead
# of failing at once on its lock.
vm-deps:
	@missing=$$(for p in $(VM_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get -o DPkg::Lock::Timeout=1200 update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 \
		install -y -q --no-install-recommends $$missing; fi

vm-box: vm-deps
	$(PYTHON) vagrant/vmlab.py box

vm-lab: vm-deps $(STAMP)
	$(PYTHON) vagrant/vmlab.py up

# etcd stopped and started over a kept SSH connection (vmlab.py ssh), not a `vagrant ssh`
# per command; --timeout 600: a TCG VM took 225-333 s to boot back (vagrant/README.md).
# Each command's output goes to vagrant/failover-logs/<UTC time>/.
vm-failover:
	$(PYTHON) vagrant/vmlab.py exec ./failover.sh --repeat 5 --timeout 600 \
		--etcd-stop-cmd './vmlab.py ssh {member} sudo systemctl stop etcd' \
		--etcd-start-cmd './vmlab.py ssh {member} sudo systemctl start etcd' \
		crash halt rolling etcd-member etcd-quorum dnsd upgrade

vm-lab-down:
	$(PYTHON) vagrant/vmlab.py down
