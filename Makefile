# The two commands a new user needs: `make demo` and `make test`.
# Both install redis-server and PostgreSQL first when they are missing (apt-get, as root or
# with sudo).

CARGO ?= cargo
SHELL := /bin/bash

# The workspace's tools run through cargo, which finds them wherever they were
# built: ./target, or $$CARGO_TARGET_DIR (never assume ./target).
RUN_RELEASE = $(CARGO) run --release --quiet -p integration-tests --bin
RUN_DEBUG = $(CARGO) run --quiet -p integration-tests --bin

.PHONY: demo test run chaos bench fuzz build release lint redis postgres promtool apt-check chromium venv openapi clean demo-check

## demo: start a private Redis, a coordinator and 3 agents; tell the story; stop everything
## (a debug build: it compiles in about half the time of a release build, and make test's
## build serves it; make run, chaos and bench build in release mode)
demo: redis postgres build
	$(RUN_DEBUG) demo

## test: every unit and integration test, against real redis-server processes
## (one test at a time: each starts a whole cluster, and a 2-core machine has room for one);
## then the system tests that do not inject faults into one redis-server again, and the
## stale-read checker, on a Redis Cluster (3 masters, 3 replicas) and under Sentinel (a
## primary, a replica, 3 sentinels);
## then the criterion benches once each, as tests (criterion takes no --test-threads)
test: redis postgres promtool chromium venv build
	$(CARGO) test --workspace --lib --bins --tests -- --test-threads=1
	DCC_TEST_REDIS=cluster $(CARGO) test -p integration-tests --test system -- --test-threads=1 $(TOPOLOGY_TESTS)
	DCC_TEST_REDIS=sentinel $(CARGO) test -p integration-tests --test system -- --test-threads=1 $(TOPOLOGY_TESTS)
	DCC_TEST_REDIS=cluster DCC_CHECKER_SECS=$(TOPOLOGY_CHECKER_SECS) $(CARGO) test -p integration-tests --test checker
	DCC_TEST_REDIS=sentinel DCC_CHECKER_SECS=$(TOPOLOGY_CHECKER_SECS) $(CARGO) test -p integration-tests --test checker
	$(CARGO) test --workspace --benches
	$(MAKE) demo-check

## The stale-read checker on a cluster (master kills, CLUSTER FAILOVER) and under Sentinel
## (SENTINEL FAILOVER), besides its 50 s on one server; make chaos runs it for longer
TOPOLOGY_CHECKER_SECS = 30

## The system tests that run on every Redis topology (the others kill, restart or
## reconfigure one redis-server; cluster:: and sentinel:: start their own topologies;
## bad_input:: is refused before Redis is touched, the same on every topology)
TOPOLOGY_TESTS = cache_api:: invalidation:: faults::wait_all_answers faults::fill_tokens \
	faults::two_coordinators faults::a_frozen_agent operations::cluster_health operations::agent_status \
	operations::rules_endpoint operations::an_event_id operations::health_readiness operations::the_key_explorer \
	stats::

## demo-check: `make demo` from a copy of the sources that has no ./target, with
## CARGO_TARGET_DIR pointing at this checkout's build folder, so that no target
## can quietly assume ./target again (cargo reuses the build: nothing recompiles)
demo-check: build
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	target=$$($(CARGO) metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'); \
	tar --exclude=./target --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C "$$tmp"; \
	echo "make demo in $$tmp with CARGO_TARGET_DIR=$$target"; \
	CARGO_TARGET_DIR="$$target" $(MAKE) --no-print-directory -C "$$tmp" demo

## run: the same cluster in the foreground until Ctrl-C, with its URLs
run: redis release
	$(RUN_RELEASE) cluster

## chaos: the stale-read checker under injected faults, for CHAOS_SECS seconds (default 300),
## on CHAOS_REDIS: single (default), cluster (3 masters, 3 replicas: master kills and
## forced failovers among the faults) or sentinel (forced Sentinel failovers)
CHAOS_SECS ?= 300
CHAOS_REDIS ?= single
chaos: redis release
	DCC_TEST_REDIS=$(CHAOS_REDIS) $(RUN_RELEASE) chaos -- $(CHAOS_SECS)

## bench: criterion micro-benchmarks, then the system side by side with Redis; writes BENCHMARKS.md
## (QUICK=1 for a short pass that only checks everything runs; it writes BENCHMARKS.quick.md)
bench: redis postgres release
	$(CARGO) bench -p shared -p node-agent $(if $(QUICK),-- --quick,)
	$(RUN_RELEASE) bench -- $(if $(QUICK),--quick --out BENCHMARKS.quick.md,)

## fuzz: the fuzz targets (bolero, run as tests: tests/fuzz.rs of shared, coordinator and node-agent:
## the fill token, the log message, the glob dialect against ports of Redis's and Lua's matchers,
## names, event and invalidate bodies, query strings, cache paths) for FUZZ_SECS seconds each
## (default 30), in release mode, one at a time; a failure prints its input and BOLERO_RANDOM_SEED.
## `make test` runs the same targets for half a second each
FUZZ_SECS ?= 30
fuzz:
	DCC_FUZZ_SECS=$(FUZZ_SECS) $(CARGO) test --release -p shared -p coordinator -p node-agent --test fuzz -- --test-threads=1

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

# $(call apt_install,PACKAGES,WHAT TO INSTALL BY HAND): installs Debian packages with apt-get,
# as root or with sudo; without apt-get (or either), says what to install and fails. The
# targets below call it only when what they need is missing.
define apt_install
if ! command -v apt-get >/dev/null 2>&1; then \
	echo "no apt-get here: install $(2) with your package manager and retry"; exit 1; \
fi; \
if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	echo "run as root, or install $(2) yourself (apt-get install $(1))"; exit 1; fi; \
$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(1) >/dev/null \
	|| { echo "apt-get could not install $(1); install $(2) and retry"; exit 1; }
endef

## redis: make sure redis-server, redis-cli and redis-benchmark are installed (tests and the demo start their own, on free ports)
redis:
	@if { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ]; } \
		&& { command -v redis-cli >/dev/null 2>&1 || [ -x /usr/bin/redis-cli ]; } \
		&& { command -v redis-benchmark >/dev/null 2>&1 || [ -x /usr/bin/redis-benchmark ]; }; then \
		exit 0; \
	fi; \
	echo "redis-server, redis-cli (the tests build Redis Clusters with it) or redis-benchmark (the RESP port test) is missing: installing them with apt-get"; \
	$(call apt_install,redis-server redis-tools,Redis 6.2 or newer (redis-server and redis-tools))

## postgres: make sure PostgreSQL's server programs (initdb, postgres, pg_ctl) and psql are
## installed: the PostgreSQL source's tests, its demo step and its bench rows start a private
## server on a free port (never the machine's own)
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v psql >/dev/null 2>&1; then exit 0; fi; \
	echo "PostgreSQL (initdb, postgres, psql) is missing: installing Debian's postgresql package with apt-get"; \
	$(call apt_install,postgresql postgresql-client,PostgreSQL 14 or newer (server and psql))

## promtool: make sure promtool (Debian's prometheus package) is installed: the deploy-files
## test checks deploy/prometheus/alerts.yml with it
promtool:
	@if command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ]; then exit 0; fi; \
	echo "promtool is missing: installing Debian's prometheus package with apt-get"; \
	$(call apt_install,prometheus,promtool (Prometheus 2.x))

## chromium: make sure Debian's chromium and chromium-driver are installed: the dashboard's
## test (tests/system/dashboard.rs) drives headless Chromium through chromedriver
chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	echo "chromium or chromedriver is missing (the dashboard's test drives them): installing them with apt-get"; \
	$(call apt_install,chromium chromium-driver,Chromium and its chromedriver (same version))

# A check of apt_install itself, on a package every Debian has (make apt-check).
apt-check:
	@$(call apt_install,hostname,hostname)
	@echo "apt_install works"

## venv: the Python tools of make test (schemathesis, the property-based client run against
## the live servers' OpenAPI documents), in ./.venv, from integration-tests/requirements.txt
venv: .venv/.installed
.venv/.installed: integration-tests/requirements.txt
	@command -v python3 >/dev/null 2>&1 || { echo "python3 is missing: install Python 3.9 or newer (apt-get install python3 python3-venv)"; exit 1; }
	@python3 -m venv .venv 2>/dev/null || { \
		echo "python3 cannot make a virtualenv: installing python3-venv with apt-get"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null \
			&& python3 -m venv .venv; }
	.venv/bin/pip install --quiet --disable-pip-version-check -r integration-tests/requirements.txt
	@touch $@

## openapi: rewrite docs/openapi.json and docs/openapi.node-agent.json from the code (the
## drift tests fail until the committed documents are the generated ones)
openapi:
	DCC_UPDATE_OPENAPI=1 $(CARGO) test --quiet -p coordinator -p node-agent --lib the_committed_openapi_document

clean:
	$(CARGO) clean
