# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test install install-test clean-venv example-config

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The compat editable mode puts the checkout on sys.path, so that Twisted
# finds twisted/plugins/reductrai_plugin.py beside its own plugins.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

run: install
	$(BIN)/twistd --pidfile= -n reductrai $(ARGS)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

example-config: install
	$(BIN)/python -c "from reductrai.config import example_config; print(example_config(), end='')" > conf/reductrai.example.toml

clean-venv:
	rm -rf $(VENV)
