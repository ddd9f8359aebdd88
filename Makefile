# Two entry points, each from a fresh machine with only python3:
#   make demo   - build .venv from the pinned requirements and run the tour (examples/tour.py)
#   make test   - build .venv and run every test: the core matrix, both plugins, Keras once per backend
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: demo test test-core test-keras-backends bench venv clean

$(STAMP): requirements/test.txt pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -e . $(addprefix -e ,$(PLUGINS))
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/tour.py

# Keras fixes its backend once per process: the first run uses TensorFlow (the default), then the
# Keras part runs again on jax and on torch.
test: $(STAMP)
	NORMKIT_STRICT_PLUGINS=1 $(PYTEST) tests plugins
	NORMKIT_STRICT_PLUGINS=1 KERAS_BACKEND=jax $(PYTEST) tests/test_conformance.py plugins/normkit-keras/tests --frameworks=keras --backends=none
	NORMKIT_STRICT_PLUGINS=1 KERAS_BACKEND=torch $(PYTEST) tests/test_conformance.py plugins/normkit-keras/tests --frameworks=keras --backends=none

bench: $(STAMP)
	taskset -c 0 $(PY) benchmarks/run.py

clean:
	rm -rf $(VENV)
