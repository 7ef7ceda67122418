# Two commands set everything up on a fresh machine (see README):
#   make demo   creates .venv, installs the runtime dependencies, runs the offline tiny-world quick start
#   make test   creates .venv, installs the test dependencies, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
WORLD  ?= world

.PHONY: demo test clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/python world.py --out $(WORLD)

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(WORLD) .pytest_cache
