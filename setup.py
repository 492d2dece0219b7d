"""Builds the optional C loops of ``multinode_bn.cpu_kernels``.

Everything else is declared in pyproject.toml. Without a C compiler the
extension is skipped and the package falls back to its NumPy code.
"""
import sys

from setuptools import Extension
from setuptools import setup

if sys.platform == 'win32':
    flags = ['/O2', '/fp:precise']
else:
    # No fused multiply-add contraction: the moments merge must give the
    # same bits whatever the order of its operands, on every rank.
    flags = ['-O3', '-fopenmp-simd', '-ffp-contract=off', '-std=c99']

setup(ext_modules=[Extension(
    'multinode_bn._cpu_kernels',
    sources=['src/multinode_bn/_cpu_kernels.c'],
    # _cpu_kernels.c includes the loops: rebuild when they change, and ship
    # them in the source distribution.
    depends=['src/multinode_bn/_cpu_kernels_loops.h'],
    extra_compile_args=flags,
    optional=True,
)])
