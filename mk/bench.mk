# Performance benchmark (issue 5). Included by the top Makefile; also works alone:
#   make -f mk/bench.mk bench | bench-quick
# bench        full run (about 11 min; 662 s in the committed run): N = 100..19000, writes bench/results/full.{jsonl,png} (committed)
# bench-quick  CI-sized run (about 2 min): N = 100, 1000, writes bench/results/tmp/quick.{jsonl,png}
# bench-scale  N named clients (default N=100000, about 3 min) pinging every INTERVAL s (default 10) against
#              hbd with workers, state store and history; writes bench/results/scale-N.{jsonl,md}, scale.png.
#              Toward a million: make bench-scale N=250000 INTERVAL=60 SCALE_ARGS="--rate 2000" (timeout 3 x
#              interval; a timeout under 2 x interval makes every client go LATE and back once an interval)
#              Runs under flock $(BENCH_LOCK): one load run at a time on a shared machine.
# They run on Debian's python3 and install what they miss with apt-get (root, or sudo):
# python3-yaml for hbd itself, python3-matplotlib for the PNG (the run still works without it).

BENCH_PY ?= /usr/bin/python3
BENCH_APT := $(shell [ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300
BENCH_ARGS ?=
N ?= 100000
INTERVAL ?= 10
SCALE_ARGS ?=
BENCH_LOCK ?= /tmp/hbd-bench.lock

.PHONY: bench bench-quick bench-scale bench-deps

bench-deps:
	@$(BENCH_PY) -c 'import yaml, matplotlib' 2>/dev/null || { \
	  echo "installing python3-yaml python3-matplotlib"; \
	  $(BENCH_APT) update -q >/dev/null && \
	  $(BENCH_APT) install -y -q --no-install-recommends python3-yaml python3-matplotlib >/dev/null \
	  || echo "bench: could not install python3-matplotlib; the run will skip the PNG"; }

bench: bench-deps
	$(BENCH_PY) -m bench --mode full $(BENCH_ARGS)

bench-quick: bench-deps
	$(BENCH_PY) -m bench --mode quick $(BENCH_ARGS)

bench-scale: bench-deps
	ulimit -n 20000 2>/dev/null; flock $(BENCH_LOCK) $(BENCH_PY) -m bench.scale -n $(N) --interval $(INTERVAL) $(SCALE_ARGS)
