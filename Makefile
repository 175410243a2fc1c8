# The two commands: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# `make run` keeps its guests in temporary roots under var/, never in a real /etc/vservers.
DEMO  ?= $(CURDIR)/var/demo
DEMO_ENV := VSERVER_CONFDIR=$(DEMO)/etc VSERVER_ROOTDIR=$(DEMO)/vservers VSERVER_RUNDIR=$(DEMO)/run
PANEL_ADDR ?= 127.0.0.1:8000
# The vserver seed_demo makes; the demo-* targets act on it.
DEMO_GUEST ?= web
CMD ?= ps

.PHONY: run test deps lint clean demo-enter demo-exec demo-stop demo-status agent-stop bench

deps:
	@scripts/bootstrap.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

# The whole suite: lint, then every test (root: kernel tests run for real).
# The websocket tests run on the in-memory channel layer and on a private redis.
test: lint
	@scripts/lxcfs.sh || true
	VPANEL_TEST_REDIS_URL="$$(scripts/redis.sh start)" $(VENV)/bin/pytest -n auto --dist loadfile

run: deps
	$(PY) manage.py migrate --noinput -v0
	@scripts/lxcfs.sh || true
	$(DEMO_ENV) scripts/agent.sh start
	$(DEMO_ENV) $(PY) manage.py seed_demo
	@echo "Panel: http://$(PANEL_ADDR)/  (Ctrl-C stops the panel and its reconciler; the agent and the vservers keep running; make agent-stop ends the agent)"
	@echo "Enter the demo vserver: make demo-enter   (or, as root: $(DEMO_ENV) $(CURDIR)/$(VENV)/bin/vserver $(DEMO_GUEST) enter)"
	PANEL_ADDR=$(PANEL_ADDR) scripts/panel.sh

demo-enter: deps
	$(DEMO_ENV) $(VENV)/bin/vserver $(DEMO_GUEST) enter

demo-exec: deps
	$(DEMO_ENV) $(VENV)/bin/vserver $(DEMO_GUEST) exec $(CMD)

demo-status: deps
	$(DEMO_ENV) $(VENV)/bin/vserver $(DEMO_GUEST) status

# Behind the panel's back: the reconciler sees it and starts it again (the panel wants it running).
demo-stop: deps
	$(DEMO_ENV) $(VENV)/bin/vserver $(DEMO_GUEST) stop

agent-stop:
	$(DEMO_ENV) scripts/agent.sh stop

# Each benchmark runs its named peer in the same run and prints the ratio.
bench: deps
	$(PY) bench/start_stop.py
	$(PY) bench/net_setup.py
	$(PY) bench/density.py
	$(PY) bench/unify.py
	$(PY) bench/agent_api.py
	$(PY) bench/panel_api.py
	$(PY) bench/ws_fanout.py
	$(PY) bench/classroom.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
