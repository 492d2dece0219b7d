"""The CPU backend of the statistics, :class:`CpuStatistics`: one-pass C
loops (``_cpu_kernels``, docs/performance.md); and :func:`choose_statistics`,
which picks the backend for an input."""

import os
import warnings

import numpy

from multinode_bn import statistics

try:
    from multinode_bn import _cpu_kernels as _native
except ImportError:  # pragma: no cover - built without a C compiler
    _native = None

#: The dtypes the loops serve, computed in their own dtype.
SERVED_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_warned_without_loops = []  # a missing extension is said once per process


def available():
    """Whether the C extension was built."""
    return _native is not None


def serves(x, dtype):
    """Whether the loops serve NumPy input ``x`` computed in ``dtype``."""
    return (_native is not None and type(x) is numpy.ndarray
            and x.dtype in SERVED_DTYPES and x.dtype == dtype)


def choose_statistics(x, dtype):
    """The statistics backend for input ``x`` computed in ``dtype`` (its
    dtype promoted with gamma's): the C loops where :func:`serves` says so
    and ``MULTINODE_BN_CPU_KERNELS`` allows, else the reference code."""
    if serves(x, dtype) and _enabled():
        return CpuStatistics(dtype)
    if (not available() and not _warned_without_loops
            and type(x) is numpy.ndarray and dtype in SERVED_DTYPES):
        _warned_without_loops.append(True)
        warnings.warn(
            'multinode_bn was installed without its C extension (no C '
            'compiler?): the CPU runs the slower NumPy code. Reinstall with '
            'a C compiler to get the one-pass loops.', RuntimeWarning)
    return statistics.ReferenceStatistics(statistics.array_module(x), dtype)


def _enabled():
    value = os.environ.get('MULTINODE_BN_CPU_KERNELS', '1').strip().lower()
    off = value in ('0', 'off', 'false', 'no')
    if not off and value not in ('1', 'on', 'true', 'yes', ''):
        warnings.warn('MULTINODE_BN_CPU_KERNELS={!r} is not valid (accepted: '
                      '0, off, false, no to switch the C loops off; 1, on, '
                      'true, yes); using them.'.format(value), RuntimeWarning)
    return not off


def _ready(a, dtype):
    """``a`` as an aligned C-contiguous ``dtype`` array (copied if need be)."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:
        return a
    return numpy.array(a, dtype=dtype, order='C', copy=True)


class CpuStatistics(object):
    """The C loops' statistics backend for inputs of ``dtype`` (float32 or
    float64)."""

    name = 'C loops'

    def __init__(self, dtype):
        self.dtype = numpy.dtype(dtype)

    def local_moments(self, x3):
        x3 = _ready(x3, self.dtype)
        moments = numpy.empty((x3.shape[1], 3), statistics.MOMENTS_DTYPE)
        shift = numpy.empty(x3.shape[1], statistics.MOMENTS_DTYPE)
        _native.local_moments(*x3.shape, x3, shift, moments,
                              statistics.SHIFT_TOLERANCE)
        return moments

    def normalize(self, x3, mean, scale, beta, out_dtype):
        x3 = _ready(x3, self.dtype)
        centre, rest = statistics.rounded_centre(mean, self.dtype)
        coef = numpy.array([centre, scale, beta + rest * scale], self.dtype)
        y3 = numpy.empty(x3.shape, self.dtype)
        _native.normalize(*x3.shape, x3, coef, y3)
        return y3.astype(out_dtype, copy=False)

    def backward_sums(self, x3, gy3, mean):
        x3, gy3 = _ready(x3, self.dtype), _ready(gy3, self.dtype)
        sums = numpy.empty((2, x3.shape[1]), statistics.MOMENTS_DTYPE)
        _native.backward_sums(*x3.shape, x3, gy3,
                              _ready(mean, statistics.MOMENTS_DTYPE), sums)
        return sums

    def input_gradient(self, x3, gy3, mean, p, q, r, out_dtype):
        x3, gy3 = _ready(x3, self.dtype), _ready(gy3, self.dtype)
        centre, rest = statistics.rounded_centre(mean, self.dtype)
        coef = numpy.array([centre, p, q, r + q * rest], self.dtype)
        gx3 = numpy.empty(x3.shape, self.dtype)
        _native.input_gradient(*x3.shape, x3, gy3, coef, gx3)
        return gx3.astype(out_dtype, copy=False)
