# Two entry points, each from a fresh machine with only python3:
#   make demo   - build .venv from the pinned requirements and run the tour (examples/tour.py)
#   make test   - build .venv and run every test: the core matrix, both plugins, Keras once per backend
PYTHON ?= python3
VENV   := .venv
PY     := $(CURDIR)/$(VENV)/bin/python
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider
# The large test directories run on both cores (pytest-xdist); tests that start processes (gloo ranks, a dask
# cluster) carry xdist_group("processes") and run one at a time on one worker.
PYTEST_N := $(PYTEST) -n 2 --dist loadgroup

.PHONY: demo test bench docs mutants venv clean

# requirements/nodeps.txt: packages installed without their declared dependencies (the file says which
# and why); pip check must report nothing but those known, named absences.
KNOWN_ABSENT := ^(timm [^ ]+ requires torchvision|keras-hub [^ ]+ requires (kagglehub|kagglesdk|sentencepiece|tensorflow-text)),

# requirements/bootstrap.txt: torch (pip takes the machine's CPU wheel) and uv, which installs the rest; uv reads the
# system's certificates (--system-certs); should uv fail, pip installs the same pinned files.
UV_INSTALL := $(CURDIR)/$(VENV)/bin/uv pip install --quiet --python $(PY) --system-certs --compile-bytecode
$(STAMP): requirements/bootstrap.txt requirements/test.txt requirements/nodeps.txt pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/bootstrap.txt
	$(UV_INSTALL) -r requirements/test.txt || $(PY) -m pip install --quiet -r requirements/test.txt
	$(UV_INSTALL) --no-deps -r requirements/nodeps.txt || $(PY) -m pip install --quiet --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . $(addprefix -e ,$(PLUGINS))
	$(PY) -m pip check > $(VENV)/pip-check.txt || true
	! grep -v -E '$(KNOWN_ABSENT)' $(VENV)/pip-check.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/tour.py

# Each test directory runs in its own pytest process with its own rootdir (plugins are separate
# distributions). Keras fixes its backend once per process: TensorFlow (the default) first, then the
# Keras layers and their conformance run again on jax and on torch.
KERAS_TESTS := cd plugins/normkit-keras && $(PYTEST_N) tests
test: export NORMKIT_STRICT_PLUGINS = 1
# One intra-op thread per test process: the two xdist workers share the two cores, where torch, TensorFlow and XLA
# would each start a pool per core (the core stage: 285 s -> 266 s measured here).
test: export OMP_NUM_THREADS = 1
test: export TF_NUM_INTRAOP_THREADS = 1
test: export TF_NUM_INTEROP_THREADS = 1
test: export XLA_FLAGS = --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1
test: $(STAMP)
	$(PYTEST_N) tests
	cd plugins/normkit-torch && $(PYTEST_N) tests
	cd plugins/normkit-flax && $(PYTEST_N) tests
	$(KERAS_TESTS)
	for backend in jax torch; do \
	  KERAS_BACKEND=$$backend $(PYTEST) tests/test_conformance.py --frameworks=keras --backends=none && \
	  (export KERAS_BACKEND=$$backend && $(KERAS_TESTS)) || exit 1; \
	done

# The docs site (mkdocs.yml): the README as the guide, the API reference from the docstrings; --strict: a warning
# fails (tests/test_docs.py builds it too).
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	taskset -c 0 $(PY) benchmarks/run.py

clean:
	rm -rf $(VENV)

# Plant realistic bugs one at a time; each must be killed by the tests (about 10 minutes).
mutants: $(STAMP)
	$(PY) tools/mutants.py
