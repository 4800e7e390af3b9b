# qmotion: `make demo` and `make test` work from a fresh clone on Debian 12, as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# The console's browser tests: Debian's chromium, driven by PyPI's playwright (which cannot
# download its own browser here), and a font for its screenshots.
BROWSER_PACKAGES := chromium fonts-dejavu-core
# PostgreSQL: the production store for several manager replicas; tests start a throwaway
# cluster of it (initdb and pg_ctl by hand, no service).
DB_PACKAGES := postgresql
DEB_PACKAGES := iproute2 busybox-static cpio gcc libc6-dev procps python3-venv $(BROWSER_PACKAGES) $(DB_PACKAGES)
# `qmotion image build debian`: a Debian 12 root file system, its partition and boot loader.
IMAGE_PACKAGES := mmdebstrap extlinux syslinux-common fdisk
# QEMU from bookworm-backports: before 9.0, QEMU under TCG loses guest writes while it migrates
# (its dirty-bitmap sync leaves TCG's TLB marking pages written; fixed upstream in 9.0), and
# this machine runs guests under TCG.
QEMU_PACKAGES := qemu-system-x86 qemu-utils
QEMU_MIN_MAJOR := 9
BACKPORTS_LIST := /etc/apt/sources.list.d/qmotion-bookworm-backports.sources
BENCH_PACKAGES := ganeti-htools
STAMP := $(VENV)/.installed

.PHONY: lock install setup debs qemu-user test test-unit check demo bench scale faults campaign drs-random screenshots clean

setup: debs qemu-user $(STAMP)

# The unprivileged user each VM's QEMU runs as (`qmotion agent --qemu-user`); in group kvm
# where the host has one, for /dev/kvm. A system user: no home, no login.
QEMU_USER := qmotion-qemu
qemu-user:
	@id -u $(QEMU_USER) >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
	  --home-dir /nonexistent --shell /usr/sbin/nologin --comment "qmotion QEMU" $(QEMU_USER)
	@if getent group kvm >/dev/null && ! id -nG $(QEMU_USER) | grep -qw kvm; then \
	  usermod -a -G kvm $(QEMU_USER); fi

# Idempotent: installs only what is missing, and runs apt-get update only then.
debs:
	@missing=""; for p in $(DEB_PACKAGES) $(IMAGE_PACKAGES) $(EXTRA_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@major=$$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'); \
	if [ "$${major:-0}" -lt $(QEMU_MIN_MAJOR) ] || ! command -v qemu-img >/dev/null; then \
	  echo "installing QEMU >= $(QEMU_MIN_MAJOR) from bookworm-backports"; \
	  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
	    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
	    > $(BACKPORTS_LIST); \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q -t bookworm-backports $(QEMU_PACKAGES); \
	fi

# Exactly the pinned versions, each checked against its hash (requirements.lock), then
# qmotion itself without resolving anything more.
$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Re-pin every dependency (newest that pyproject.toml allows) with hashes, for Linux x86_64.
lock: $(STAMP)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-annotate --no-header -q -o requirements.lock.new
	(printf '%s\n' "# qmotion's dependencies, pinned with their hashes: \`make setup\` installs exactly these" \
	  "# (pip --require-hashes). Regenerate after changing pyproject.toml: \`make lock\`."; \
	  cat requirements.lock.new) > requirements.lock && rm requirements.lock.new

# pytest exits 5 when it collects nothing; that is reported, not hidden as a pass of real tests.
# hbal (ganeti-htools) too: a unit test has it score an exported placement.
test: EXTRA_DEBS = $(BENCH_PACKAGES)
test: setup
	$(PY) -m qmotion image build
	$(PY) -m pytest -m "not faults"; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The console's screenshots in docs/console/, made by its browser tests on a real lab.
screenshots: setup
	$(PY) -m qmotion image build
	QMOTION_SCREENSHOTS=docs/console $(PY) -m pytest tests/integration/test_console_browser.py

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
	$(PY) -m bench.drs_live
	$(PY) -m bench.convergence
	$(PY) -m bench.distance
	$(PY) -m bench.storage
	$(PY) -m bench.failover

# Scale (issue 26): the real manager against 100, 300 and 1 000 simulated hosts (20 VMs
# each), on SQLite and PostgreSQL, with one and two managers; the README's table and plot.
scale: setup
	$(PY) bench/scale.py --hosts 100,300,1000 --vms-per-host 20 --backend sqlite,postgresql \
	  --managers 1,2 --out bench/results/scale.json --plot docs/scale.png

# The lab fault matrix: each migration phase x each fault on real guests (make test runs only
# its unmarked representative cases); writes its table to bench/results/faults.md.
faults: setup
	$(PY) -m qmotion image build
	$(PY) -m pytest tests/integration/test_faults.py

# The randomized fault campaign over the scripted agents, run long (make test runs a fixed
# part of it): STEPS operations from seed SEED on; a broken invariant prints its shrunk
# counterexample and fails.
STEPS ?= 20000
SEED ?= 1
campaign: setup
	$(PY) -m tests.unit.campaign --steps $(STEPS) --seed $(SEED)

# The DRS planner's properties randomised (make test runs them derandomised): 500 fresh
# examples per seed and property, seeds 1..100 (100 000 examples, ~20 min on 2 cores).
drs-random: setup
	$(PY) -m tests.unit.drs_random --first 1 --last 100 --examples 500

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Onto a real host (README "Install on real hosts"): qmotion in its own venv under PREFIX,
# the command in /usr/local/bin, the systemd units, example configs, the manager's token.
PREFIX ?= /opt/qmotion
install: debs qemu-user
	python3 -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --upgrade pip
	$(PREFIX)/bin/pip install -q --require-hashes -r requirements.lock
	$(PREFIX)/bin/pip install -q --no-deps .
	ln -sf $(PREFIX)/bin/qmotion /usr/local/bin/qmotion
	install -m 0644 README.md $(PREFIX)/README.md
	install -d -m 0755 /etc/qmotion
	install -m 0644 deploy/etc/manager.toml /etc/qmotion/manager.toml.example
	install -m 0644 deploy/etc/agent.toml /etc/qmotion/agent.toml.example
	[ -e /etc/qmotion/manager.toml ] || install -m 0644 deploy/etc/manager.toml /etc/qmotion/manager.toml
	[ -e /etc/qmotion/manager.token ] || (umask 077; $(PREFIX)/bin/python -c \
	  'import secrets; print(secrets.token_urlsafe(32))' > /etc/qmotion/manager.token)
	install -m 0644 deploy/systemd/qmotion-manager.service deploy/systemd/qmotion-agent.service \
	  /etc/systemd/system/
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; manager: edit /etc/qmotion/manager.toml, systemctl enable --now qmotion-manager"
	@echo "host: qmotion agent join ... (from qmotion host add), systemctl enable --now qmotion-agent"
