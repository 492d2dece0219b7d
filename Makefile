# One-command set-up: `make test` and `make demo` create .venv, install
# everything (including the chainer 7.8.1 workaround and MPI from PyPI) and run.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all install test test-serial test-mpi demo bench clean check-python

all: test

check-python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; \
	sys.exit(0 if (3, 8) <= v[:2] <= (3, 11) else \
	"multinode_bn needs Python 3.8-3.11 (chainer 7.8.1 needs pkg_resources and numpy.distutils); " \
	"found %d.%d. Run: make PYTHON=python3.11 ..." % v[:2])'

$(STAMP): pyproject.toml Makefile | check-python
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade 'pip<26' 'setuptools<74' wheel
	# chainer 7.8.1 is an sdist whose setup.py and runtime import pkg_resources
	# and numpy.distutils: numpy<2 and setuptools<74 must be there first.
	$(VPY) -m pip install 'numpy>=1.20,<2' 'setuptools<74'
	$(VPY) -m pip install --no-build-isolation 'chainer==7.8.1'
	$(VPY) -m pip install mpich 'mpi4py>=3.1'
	$(VPY) -m pip install --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -p no:cacheprovider tests

demo: $(STAMP)
	$(VPY) examples/run_demo.py --out result

bench: $(STAMP)
	$(VENV)/bin/mpiexec -n 2 $(VPY) benchmarks/bench_bn.py

clean:
	rm -rf $(VENV) build src/*.egg-info result
