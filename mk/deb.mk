# Debian package and real-systemd tests. Included by the top Makefile; also works alone:
#   make -f mk/deb.mk deb | deb-lint | systemd-test
# `deb` installs the build dependencies with apt-get when they are missing (needs root), then builds
# dist/hbd_<version>_all.deb in a clean copy of the tree under build/deb/ (the source package lands there too).

# debian/changelog is the one place the version is set (debian/rules carries it into hbd and the dist-info).
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([0-9]*:\)\{0,1\}\([^)]*\)).*/\2/p' debian/changelog)
DEB_FILE := dist/hbd_$(DEB_VERSION)_all.deb
DEB_BUILD := build/deb
# Rebuild when anything that goes into the package changed.
DEB_INPUTS := $(shell find hbd etc systemd debian docs examples pyproject.toml -type f \
                -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null) \
              $(wildcard README.md bench/results/full.png)
PYTHON_DEB ?= /usr/bin/python3
DEB_PATH := /usr/sbin:/usr/bin:/sbin:/bin
DEB_APT := $(shell [ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300

.PHONY: deb deb-deps deb-lint systemd-test

deb: $(DEB_FILE)

# dpkg-checkbuilddeps comes with dpkg-dev, which a fresh machine lacks; apt-get build-dep reads debian/control.
deb-deps:
	@if command -v dpkg-checkbuilddeps >/dev/null && dpkg-checkbuilddeps 2>/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then \
	  echo "make deb needs the package's build dependencies; run as root: apt-get build-dep $(CURDIR)" >&2; exit 1; \
	else echo "installing build dependencies (apt-get build-dep ./)"; \
	  $(DEB_APT) update -q >/dev/null && $(DEB_APT) build-dep -y -q --no-install-recommends ./ >/dev/null; fi

$(DEB_FILE): $(DEB_INPUTS)
	$(MAKE) -f mk/deb.mk deb-deps
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/hbd-$(DEB_VERSION) dist
	# Only what git tracks or would track (no build/, dist/, caches), so the source package is clean.
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git ls-files -z --cached --others --exclude-standard | tar -c --null -T - -f -; \
	else tar -c --exclude-vcs --exclude=./build --exclude=./dist --exclude=__pycache__ --exclude='.*_cache' \
	    --exclude=.hypothesis --exclude='.venv*' -f - .; fi | \
	  tar -x -C $(DEB_BUILD)/hbd-$(DEB_VERSION) -f -
	# Debian's own python3, not a pyenv/venv one earlier on PATH.
	cd $(DEB_BUILD)/hbd-$(DEB_VERSION) && env -u PYTHONPATH -u VIRTUAL_ENV PATH=$(DEB_PATH) dpkg-buildpackage -us -uc
	cp $(DEB_BUILD)/hbd_$(DEB_VERSION)_all.deb $@

# Fails on any error or warning, for the binary and the source package alike.
deb-lint: $(DEB_FILE)
	@sh mk/apt-need.sh "make deb-lint" lintian
	lintian --fail-on error,warning --display-info --pedantic $(DEB_BUILD)/hbd_$(DEB_VERSION)_*.changes

systemd-test:
	bash .ci/systemd-prepare.sh
	$(PYTHON_DEB) -m pytest -q -m systemd tests/
