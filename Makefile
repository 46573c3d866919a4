# The two commands of the README:
#   make serve   create the environment if missing, then serve on http://127.0.0.1:8000
#   make test    create the environment if missing, then run every test tier
VENV ?= .venv
FLAVOUR ?= auto
STAMP := $(VENV)/.bootstrap-stamp
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test test-unit test-integration env system-deps clean-env

$(STAMP): pyproject.toml scripts/bootstrap-env.sh
	scripts/bootstrap-env.sh $(VENV) $(FLAVOUR)
	touch $(STAMP)

env: $(STAMP)

system-deps:
	scripts/install-system-deps.sh

serve: $(STAMP)
	$(VENV)/bin/medgemma-serve serve $(SERVE_ARGS)

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -m unit $(PYTEST_ARGS)

test-integration: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -m integration $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
