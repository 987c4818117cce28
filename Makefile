# spamviewer: `make run` sets up and starts the system, `make test` sets up and runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test run test lint bench clean

install: $(STAMP)

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) apt-packages-test.txt
	bash scripts/install-apt.sh apt-packages-test.txt
	touch $(TEST_STAMP)

$(STAMP): pyproject.toml apt-packages.txt scripts/install-apt.sh
	bash scripts/install-apt.sh apt-packages.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py ensurevadmin
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py runsystem

test: install-test
	bash scripts/run-tests.sh

lint: install
	$(VENV)/bin/ruff check .

bench: install-test
	bash scripts/run-bench.sh

clean:
	rm -rf $(VENV) var/ staticfiles/
