# qmotion: `make demo` and `make test` work from a fresh clone on Debian 12, as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := qemu-system-x86 qemu-utils iproute2 busybox-static cpio gcc libc6-dev procps
BENCH_PACKAGES := ganeti-htools
STAMP := $(VENV)/.installed

.PHONY: setup debs test test-unit check demo bench clean

setup: debs $(STAMP)

# Idempotent: installs only what is missing, and runs apt-get update only then.
debs:
	@missing=""; for p in $(DEB_PACKAGES) $(EXTRA_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collects nothing; that is reported, not hidden as a pass of real tests.
# hbal (ganeti-htools) too: a unit test has it score an exported placement.
test: EXTRA_DEBS = $(BENCH_PACKAGES)
test: setup
	$(PY) -m qmotion image build
	$(PY) -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-unit: setup
	$(PY) -m pytest tests/unit

check: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

demo: setup
	$(PY) -m qmotion demo

bench: EXTRA_DEBS = $(BENCH_PACKAGES)
bench: setup
	$(PY) -m bench.migration
	$(PY) -m bench.drs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
