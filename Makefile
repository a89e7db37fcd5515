# hbd developer targets. Everything runs on Debian's python3 with Debian's packages, the same
# interpreter and libraries the .deb uses; targets install what they miss with apt-get (as root, or
# through sudo; with nothing missing they need neither). `make help` lists them.
PY ?= /usr/bin/python3
PORT ?= 54321
# hbd itself (make demo, run-server, run-client)
RUN_DEPS := python3 python3-yaml python3-systemd
# the test suite: hbd, pytest, and for the reliability and TLS tests test certificates, network
# namespaces and a fake wall clock; prometheus_client's parser checks hbd's metrics exposition (hbd
# itself never imports it); groff renders the man page in tests/test_manpage.py; prometheus brings promtool,
# which tests the shipped alerting rules (tests/test_prometheus_rules.py; mk/apt-need.sh stops and
# disables the Prometheus server the package would start). The real-systemd tests (root only) get theirs
# from .ci/systemd-prepare.sh: systemd-container, debootstrap, build deps.
APT_DEPS := $(RUN_DEPS) python3-pytest python3-pytest-timeout python3-hypothesis python3-pytest-xdist
APT_DEPS += openssl iproute2 faketime python3-prometheus-client groff-base prometheus
PYTEST_ARGS ?=
# Most tests wait on real time (daemons, timeouts), not on the CPU: 4 workers on 2 cores. loadgroup keeps
# the real-systemd tests in one worker and the slow load tests in another (tests/conftest.py).
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: help deps demo-deps demo run-server run-client test test-fast test-random lint clean
help:
	@echo "make demo        server + client on 127.0.0.1:$(PORT) in this terminal (Ctrl-C stops both); PORT=N for another port"
	@echo "make test        the whole test suite; as root also the real-systemd tests (it installs and prepares them)"
	@echo "make test-fast   unit and integration tests only (no systemd, no slow tests)"
	@echo "make test-random the tests (no systemd) with new random cases for the property tests"
	@echo "make deps        install the test suite's Debian packages"
	@echo "make run-server  / make run-client   one daemon in the foreground with the repo's configs (logs in demo-logs/)"
	@echo "make lint        ruff check, ruff format --check and mypy (pinned, in a local venv .venv-lint/)"
	@echo "make deb         the Debian package: dist/hbd_<version>_all.deb"
	@echo "make deb-lint    lintian on the binary and source packages (fails on any error or warning)"
	@echo "make systemd-test  only the real-systemd tests (root)"
	@echo "make bench       full benchmark, about 14 min; make bench-quick: about 2 min"
	@echo "make bench-scale N=100000 [INTERVAL=10]  named clients against hbd with store and history, about 3 min"
	@echo "make clean       remove demo-logs, build, dist and caches"

deps:
	@sh mk/apt-need.sh "make $(or $(MAKECMDGOALS),deps)" $(APT_DEPS)

demo-deps:
	@sh mk/apt-need.sh "make demo" $(RUN_DEPS)

# A plain command line, so make runs the script with no shell in between: Ctrl-C ends it quietly.
demo: demo-deps
	@sh mk/demo.sh $(PY) $(PORT)

run-server: demo-deps
	@mkdir -p demo-logs
	$(PY) -m hbd server -c etc/server.yaml --port $(PORT) --log-file demo-logs/server.log --control-socket demo-logs/server.sock

run-client: demo-deps
	@mkdir -p demo-logs
	$(PY) -m hbd client -c etc/client.yaml --port $(PORT) --log-file demo-logs/client.log --control-socket demo-logs/client.sock

# As root, the real-systemd tests run too: .ci/systemd-prepare.sh installs their tools and builds the
# container's root file system and the .deb first (a few seconds when all is in place). Without root they
# are skipped, and the run ends with a summary of every skip and its reason (tests/conftest.py).
test: deps
	@if [ "$$(id -u)" = 0 ]; then bash .ci/systemd-prepare.sh; \
	else echo "make test: not root: the real-systemd tests will be skipped"; fi
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -q $(XDIST) -m "not systemd and not slow" $(PYTEST_ARGS)

# The property tests with new random cases each run (make test's are fixed, so its verdict is not luck).
test-random: deps
	TEST_RANDOM=1 $(PY) -m pytest -q $(XDIST) -m "not systemd" $(PYTEST_ARGS)

# Quality gates, run by .ci/run: pinned versions in a local venv (python3-venv from apt), so a new ruff or
# mypy release can never turn CI red on its own.
LINT_PINS := ruff==0.17.6 mypy==2.4.1 types-PyYAML==6.0.12.20261122
LINT_VENV := .venv-lint
lint:
	@sh mk/apt-need.sh "make lint" python3-venv
	@[ "$$(cat $(LINT_VENV)/.pins 2>/dev/null)" = "$(LINT_PINS)" ] || { rm -rf $(LINT_VENV) && \
	  $(PY) -m venv $(LINT_VENV) && $(LINT_VENV)/bin/pip install -q --disable-pip-version-check $(LINT_PINS) && \
	  echo "$(LINT_PINS)" >$(LINT_VENV)/.pins; }
	$(LINT_VENV)/bin/ruff check hbd tests bench
	$(LINT_VENV)/bin/ruff format --check hbd tests bench
	$(LINT_VENV)/bin/mypy hbd

clean:
	rm -rf demo-logs build dist .pytest_cache .ruff_cache *.egg-info

-include mk/*.mk
