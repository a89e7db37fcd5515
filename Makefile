# hbd developer targets. Everything runs on Debian's python3 with Debian's packages, the same
# interpreter and libraries the .deb uses; `make deps` installs them with apt-get (root or sudo).
PY ?= /usr/bin/python3
APT_DEPS := python3 python3-yaml python3-systemd python3-pytest python3-pytest-timeout python3-hypothesis
# reliability and TLS tests: test certificates, network namespaces, a fake wall clock
APT_DEPS += openssl iproute2 faketime
# metrics tests: prometheus_client's parser checks hbd's exposition (hbd itself never imports it)
APT_DEPS += python3-prometheus-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: help deps demo run-server run-client test test-fast lint clean
help:
	@echo "make demo        server + client on 127.0.0.1 (Ctrl-C stops both)"
	@echo "make test        the whole test suite (systemd tests need root)"
	@echo "make test-fast   unit and integration tests only"
	@echo "make run-server  / make run-client   one daemon with the repo's configs"
	@echo "make lint        ruff"
	@echo "make deb         the Debian package in dist/"
	@echo "make bench       / make bench-quick  performance benchmarks"

deps:
	@missing=$$(for p in $(APT_DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

demo: deps
	@mkdir -p demo-logs
	@echo "hbd demo: server and client on 127.0.0.1:54321; errors also go to demo-logs/. Ctrl-C stops both."
	@echo "          in another terminal: $(PY) -m hbd status -s demo-logs/server.sock   (or client.sock)"
	@trap 'kill $$srv 2>/dev/null; wait $$srv' EXIT INT TERM; \
	$(PY) -m hbd server -c etc/server.yaml --host 127.0.0.1 --log-file demo-logs/server.log \
		--control-socket demo-logs/server.sock & srv=$$!; \
	sleep 0.5; $(PY) -m hbd client -c etc/client.yaml --host 127.0.0.1 --log-file demo-logs/client.log \
		--control-socket demo-logs/client.sock

run-server: deps
	$(PY) -m hbd server -c etc/server.yaml --log-file demo-logs/server.log --control-socket demo-logs/server.sock

run-client: deps
	$(PY) -m hbd client -c etc/client.yaml --log-file demo-logs/client.log --control-socket demo-logs/client.sock

test: deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -q -m "not systemd and not slow" $(PYTEST_ARGS)

lint:
	@[ -x .venv-lint/bin/ruff ] || { $(PY) -m venv .venv-lint && .venv-lint/bin/pip install -q ruff; }
	.venv-lint/bin/ruff check hbd tests $(wildcard bench)
	.venv-lint/bin/ruff format --check hbd tests $(wildcard bench) || true

clean:
	rm -rf demo-logs build dist .pytest_cache .ruff_cache *.egg-info

-include mk/*.mk
