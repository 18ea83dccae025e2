# The two commands of the README. Each creates .venv on a fresh machine and installs what it needs.
# torch is pinned to the 2.13.0 CPU wheel (on this machine's disk; other builds download gigabytes).
VENV := .venv
INSTALL := python3 -m venv $(VENV) && $(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0

# The lowest transformers of setup.cfg's range, beside the venv's (the newest): saved models must load as remote
# code with both (tests/conftest.py). Installed once, without dependencies (it shares the venv's).
TRANSFORMERS_LOWEST := $(shell sed -n 's/^ *transformers>=\([0-9.]*\),.*/\1/p' setup.cfg)
COMPAT := .compat/transformers-$(TRANSFORMERS_LOWEST)

.PHONY: test demo
test:
	$(INSTALL) -e '.[dev]' \
	&& { test -d $(COMPAT) || $(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --target $(COMPAT) \
	     transformers==$(TRANSFORMERS_LOWEST); } \
	&& HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# Images for a handful of prompts from the bundled tiny model, as one captioned PNG grid (offline, CPU).
demo:
	$(INSTALL) -e '.[retrieval]' && HF_HUB_OFFLINE=1 $(VENV)/bin/cm3leon-hf demo -o cm3leon-demo.png
