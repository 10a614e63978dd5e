# iotunnel — the two commands a newcomer needs are `make demo` and `make test`.
# Everything installs into ./.venv (pip) and, when running as root, Debian packages via apt-get.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages driven for real (installed only when missing and root): the demo needs the
# broker and sshd; the test suite also builds and checks packages, keeps the agent's device key
# in a software PKCS#11 token (softhsm2) and sends the agent through a real HTTP proxy
# (tinyproxy).
DEMO_PACKAGES ?= mosquitto openssh-server openssh-client
SYSTEM_PACKAGES ?= $(DEMO_PACKAGES) \
                   lintian systemd binutils binutils-aarch64-linux-gnu linux-libc-dev \
                   gcc-arm-linux-gnueabihf cmake qemu-user softhsm2 tinyproxy \
                   qemu-system-x86 debootstrap
# Architectures `make deb` builds (packaging/build_deb.py; armhf: make deb-armhf).
DEB_ARCHES ?= amd64 arm64

.PHONY: help demo test lint typecheck unit venv system-deps demo-deps proto bench clean deb deb-armhf \
        device-test device-test-arm64 arm64-guest-deps

help:
	@echo "make demo   - the whole walk-through on loopback: open-tunnel, the agent, HTTP and SSH at once"
	@echo "make test   - install what the tests need and run lint, types and the whole suite"
	@echo "make bench  - run the benchmarks (bench/RESULTS.md)"
	@echo "make proto  - regenerate proxy/protocol/_pb from Message.proto"
	@echo "make deb    - build dist/iotunnel_<version>_{amd64,arm64}.deb (packaging/README.md)"
	@echo "make deb-armhf - cross-build awscrt for armv7l, then dist/iotunnel_<version>_armhf.deb"
	@echo "make device-test - the .deb in a Debian 12 guest under qemu, systemd as PID 1 (README)"
	@echo "make device-test-arm64 - the arm64 .deb to a running agent in an emulated arm64 guest"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
	    $(PYTHON) -m venv $(VENV); \
	  else echo "cannot create a venv: install python3-venv" >&2; exit 1; fi; }

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,service,agent,speed]'
	@touch $@

venv: $(STAMP)

system-deps demo-deps arm64-guest-deps: PACKAGES = $(if $(filter demo-deps,$@),$(DEMO_PACKAGES),\
  $(if $(filter arm64-guest-deps,$@),qemu-system-arm debootstrap,$(SYSTEM_PACKAGES)))
system-deps demo-deps arm64-guest-deps:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages:$$missing (tests that need them are skipped)"; fi; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check proxy/protocol

typecheck: venv
	$(BIN)/mypy iotunnel proxy service agent testbed demo bench packaging

unit: venv
	$(BIN)/pytest -q -m "not e2e"

# The whole suite; the sans-IO core must stay at 100% branch coverage.
test: venv system-deps lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider --cov=proxy.protocol --cov-branch \
	  --cov-report=term:skip-covered --cov-fail-under=100

demo: venv demo-deps
	$(BIN)/python -m demo

# The bench extra (matplotlib, for the charts) only here: the tests skip the charts without it.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,service,agent,speed,bench]'
	@touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

proto: venv
	$(BIN)/python -m grpc_tools.protoc -I proxy/protocol --python_out=proxy/protocol/_pb proxy/protocol/Message.proto

deb: venv system-deps
	$(BIN)/python packaging/build_deb.py $(addprefix --arch=,$(DEB_ARCHES))

# The .deb on a booted Debian 12 guest (qemu; root file system cached in /var/cache/iotunnel-device).
device-test: venv system-deps
	$(BIN)/pytest -q -p no:cacheprovider -m device tests/device

# The arm64 package booted to a running agent in an emulated arm64 guest (slow: see README).
device-test-arm64: venv arm64-guest-deps
	IOTUNNEL_DEVICE_ARM64=1 $(BIN)/pytest -q -p no:cacheprovider tests/device/test_device_arm64.py

deb-armhf: venv system-deps
	wheel="$$($(BIN)/python packaging/armhf.py awscrt)" && \
	  $(BIN)/python packaging/build_deb.py --arch=armhf --wheelhouse "$$(dirname "$$wheel")"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .demo build dist *.egg-info
