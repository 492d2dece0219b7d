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

$(STAMP): pyproject.toml setup.py Makefile | check-python
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade 'pip<26' 'setuptools<74' wheel
	# chainer 7.8.1 is an sdist whose setup.py and runtime import pkg_resources
	# and numpy.distutils: numpy and setuptools<74 must be there first. Its
	# F.resize_images (pyramid pooling, decoders) uses numpy.float, which
	# NumPy 1.24 removed: numpy<1.24.
	$(VPY) -m pip install 'numpy>=1.20,<1.24' 'setuptools<74'
	$(VPY) -m pip install --no-build-isolation 'chainer==7.8.1'
	$(VPY) -m pip install --no-build-isolation -e '.[test,mpich]'
	touch $(STAMP)

# The C loops of multinode_bn.cpu_kernels, rebuilt when their source changes.
# The old build goes first: pip only warns when the optional extension fails
# to compile, and the import below must then fail rather than find it.
EXT_SRC := src/multinode_bn/_cpu_kernels.c src/multinode_bn/_cpu_kernels_loops.h
EXT_STAMP := $(VENV)/.extension

$(EXT_STAMP): $(EXT_SRC) $(STAMP)
	rm -f src/multinode_bn/_cpu_kernels.*.so src/multinode_bn/_cpu_kernels.*.pyd
	$(VPY) -m pip install --no-build-isolation --no-deps -e .
	$(VPY) -c 'import multinode_bn._cpu_kernels'
	touch $(EXT_STAMP)

install: $(STAMP) $(EXT_STAMP)

# Single-process tests first, then every MPI test under 2 and 3 ranks
# (tests/run_stages.py): each rank's pytest output goes to its own file in
# logs/, rank 0's is shown, and the last line gives the verdict of all
# stages. A failure on any rank fails its stage and makes this exit non-zero.
# The tests also check that the C loops were built (pip only warns when an
# optional extension fails to compile).
test: export MULTINODE_BN_EXPECT_CPU_KERNELS = 1
test: install
	$(VPY) tests/run_stages.py --logs logs --mpiexec $(VENV)/bin/mpiexec

# scikit-learn (the digits) and matplotlib, only for the demo.
DEMO_STAMP := $(VENV)/.demo

$(DEMO_STAMP): $(STAMP)
	$(VPY) -m pip install --no-build-isolation -e '.[demo]'
	touch $(DEMO_STAMP)

# DEMO_ARGS='--seeds 1 2 3' for the documentation's three seeds.
DEMO_ARGS ?=
demo: install $(DEMO_STAMP)
	$(VPY) examples/run_demo.py --out result $(DEMO_ARGS)

bench: install
	$(VENV)/bin/mpiexec -n 2 $(VPY) benchmarks/bench_bn.py

clean:
	rm -rf $(VENV) build src/*.egg-info result logs
