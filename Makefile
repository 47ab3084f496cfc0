# virt-relay: `make run` and `make test` are the two commands a fresh Debian 12 machine needs.
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .run
ONLY ?=
PYTEST_ARGS ?=

.PHONY: bootstrap run stop test lint bench chaos soak fuzz clean

bootstrap:
	@./scripts/bootstrap.sh

run: bootstrap
	@$(VENV)/bin/virt-relay demo --state-dir $(RUN_DIR)

stop:
	@$(VENV)/bin/virt-relay broker stop --state-dir $(RUN_DIR)/broker

# pytest exits 5 when it collects no test: that must fail, never pass silently.
test: bootstrap
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# ruff, then the walls between the wings (import-linter contracts in pyproject.toml).
lint: bootstrap
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/lint-imports

bench: bootstrap
	@$(PY) -m bench --only "$(ONLY)" --out bench-results.json

# A longer chaos run than the test suite's (as root: it runs a private libvirtd).
chaos: bootstrap
	@$(PY) -m chaos.run --seconds 15 --json chaos-report.json

# 50 broker restarts (graceful and SIGKILL) under load, each followed by a full drain (as root).
soak: bootstrap
	@$(PY) -m chaos.soak --restarts 50 --json soak-report.json

clean:
	rm -rf $(RUN_DIR) bench-results.json chaos-report.json soak-report.json fuzz-report.json \
		.pytest_cache

# A long hostile burst (10,000 messages, twice) against an agent process: refusals/s, peak RSS.
fuzz: bootstrap
	@$(PY) -m harness.fuzz_run --messages 10000 --json fuzz-report.json
