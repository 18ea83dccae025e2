# The two commands of the README. Each creates .venv on a fresh machine and installs what it needs.
# torch is pinned to the 2.13.0 CPU wheel (on this machine's disk; other builds download gigabytes).
VENV := .venv
INSTALL := python3 -m venv $(VENV) && $(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0

.PHONY: test
test:
	$(INSTALL) -e '.[dev]' && HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
