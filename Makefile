# The two commands: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Temporary roots for `make run`, so the demo never touches a real /etc/vservers.
DEMO  ?= $(CURDIR)/var/demo

.PHONY: run test deps lint clean demo-stop

deps:
	@scripts/bootstrap.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

test: lint
	$(VENV)/bin/pytest -n auto --dist loadfile

run: deps
	$(PY) manage.py migrate --noinput -v0
	VSERVER_CONFDIR=$(DEMO)/etc VSERVER_ROOTDIR=$(DEMO)/vservers VSERVER_RUNDIR=$(DEMO)/run \
	  $(PY) -m hostagent.demo

demo-stop: deps
	VSERVER_CONFDIR=$(DEMO)/etc VSERVER_ROOTDIR=$(DEMO)/vservers VSERVER_RUNDIR=$(DEMO)/run \
	  $(VENV)/bin/vserver demo stop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
