"""The CPU fast path of the statistics: one-pass C loops.

:class:`CpuStatistics` implements the statistics backend interface of
:mod:`multinode_bn.statistics` with the small C extension
``multinode_bn._cpu_kernels`` (built at install time; without a C compiler
the package installs without it, warns once, and uses
:class:`~multinode_bn.statistics.ReferenceStatistics`);
:func:`choose_statistics` picks the backend for an input. Each operation
makes exactly one pass over the batch, with no temporary array, and
accumulates its sums in float64. It serves float32 and float64 NumPy inputs
computed in their own dtype (:func:`serves`), in every memory layout: the
:class:`~multinode_bn.statistics.Layout` view is C-contiguous ``(A, C, B)``
for every layout real layers produce, and the loops run along channels
(``B == 1``: channels last, NCHW views of NHWC memory, ``(N, C)``) or along
the values of one channel (NCHW).

Local moments
    ``sum d`` and ``sum d * d`` with ``d = x - s`` per channel, where the
    shift ``s`` is the mean of the channel's first 16 values; should ``s``
    lie more than :data:`~multinode_bn.statistics.SHIFT_TOLERANCE` standard
    deviations from the mean, the sums are taken again around the mean.

Normalization, input gradient
    ``y = (x - centre) * scale + offset`` and
    ``gx = p * gy + q * (x - centre) + r`` in the dtype of ``x``, ``centre``
    the mean rounded to that dtype (the remainder is folded into ``offset``
    and ``r`` in float64).

Backward sums
    ``sum gy`` and ``sum gy * (x - mean)`` per channel, ``x - mean`` formed
    in float64.

Nothing here knows Chainer or MPI.
"""

import os
import sys
import warnings

import numpy

from multinode_bn import statistics

try:
    from multinode_bn import _cpu_kernels as _native
except ImportError:  # pragma: no cover - built without a C compiler
    _native = None

#: The dtypes the loops serve, computed in their own dtype.
SERVED_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def available():
    """Whether the C extension was built."""
    return _native is not None


def serves(x, dtype):
    """Whether the loops serve NumPy input ``x`` computed in ``dtype``."""
    return (_native is not None and type(x) is numpy.ndarray
            and x.dtype in SERVED_DTYPES and x.dtype == dtype)


_warned_without_loops = []


def choose_statistics(x, dtype):
    """The statistics backend for input ``x`` computed in ``dtype``.

    The C loops (:class:`CpuStatistics`) for float32 and float64 NumPy
    inputs computed in their own dtype, unless the environment variable
    ``MULTINODE_BN_CPU_KERNELS`` is ``0``, ``off``, ``false`` or ``no``
    (another value than those and ``1``, ``on``, ``true``, ``yes`` gets a
    warning naming it, and the loops). The plain
    :class:`~multinode_bn.statistics.ReferenceStatistics` otherwise (CuPy,
    float16, mixed precision), and where the extension was not built, which
    a ``RuntimeWarning`` says once per process.

    Args:
        x (numpy.ndarray or cupy.ndarray): The input.
        dtype: The computation dtype (the input's, promoted with the
            parameters').

    Returns:
        :class:`CpuStatistics` or
        :class:`~multinode_bn.statistics.ReferenceStatistics`.
    """
    if type(x) is numpy.ndarray and dtype in SERVED_DTYPES:
        if not available():
            if not _warned_without_loops:
                _warned_without_loops.append(True)
                warnings.warn(
                    'multinode_bn was installed without its C extension (no '
                    'C compiler at install time?): batch normalization on '
                    'the CPU runs the slower NumPy code. Reinstall with a C '
                    'compiler to get the one-pass loops.', RuntimeWarning)
        elif _enabled() and serves(x, dtype):
            return CpuStatistics(dtype)
    return statistics.ReferenceStatistics(_array_module(x), dtype)


def _enabled():
    """``MULTINODE_BN_CPU_KERNELS``: ``0``, ``off``, ``false`` or ``no``
    switches the C loops off; ``1``, ``on``, ``true``, ``yes`` or unset
    keeps them (another value: a warning naming it, and on)."""
    value = os.environ.get('MULTINODE_BN_CPU_KERNELS', '1').strip().lower()
    if value in ('0', 'off', 'false', 'no'):
        return False
    if value not in ('1', 'on', 'true', 'yes', ''):
        warnings.warn(
            'MULTINODE_BN_CPU_KERNELS={!r} is not valid (accepted: 0, off, '
            'false, no to switch the C loops off; 1, on, true, yes); using '
            'the C loops.'.format(value), RuntimeWarning)
    return True


def _array_module(x):
    """``cupy`` for a CuPy array, ``numpy`` otherwise (a CuPy array exists
    only once CuPy was imported, so this never imports it)."""
    cupy = sys.modules.get('cupy')
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    return numpy


def _ready(a, dtype):
    """``a`` as an aligned C-contiguous array of ``dtype`` (a copy only for
    what the :class:`~multinode_bn.statistics.Layout` view did not give:
    another dtype, a misaligned buffer)."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:
        return a
    return numpy.array(a, dtype=dtype, order='C', copy=True)


class CpuStatistics(object):
    """The statistics backend of the C loops (see the module docstring).

    Args:
        dtype: float32 or float64, the dtype of the inputs.
    """

    name = 'C loops'

    def __init__(self, dtype):
        self.dtype = numpy.dtype(dtype)

    def local_moments(self, x3):
        x3 = _ready(x3, self.dtype)
        rows, channels, inner = x3.shape
        shift = numpy.empty(channels, dtype=statistics.MOMENTS_DTYPE)
        moments = numpy.empty((channels, 3), dtype=statistics.MOMENTS_DTYPE)
        _native.local_moments(rows, channels, inner, x3, shift, moments,
                              statistics.SHIFT_TOLERANCE)
        return moments

    def normalize(self, x3, mean, scale, beta, out_dtype):
        x3 = _ready(x3, self.dtype)
        rows, channels, inner = x3.shape
        centre, rest = statistics.rounded_centre(mean, self.dtype)
        coef = numpy.empty((3, channels), dtype=self.dtype)
        coef[0] = centre
        coef[1] = scale
        coef[2] = beta + rest * scale
        y3 = numpy.empty(x3.shape, dtype=self.dtype)
        _native.normalize(rows, channels, inner, x3, coef, y3)
        return y3.astype(out_dtype, copy=False)

    def backward_sums(self, x3, gy3, mean):
        x3, gy3 = _ready(x3, self.dtype), _ready(gy3, self.dtype)
        rows, channels, inner = x3.shape
        sums = numpy.empty((2, channels), dtype=statistics.MOMENTS_DTYPE)
        _native.backward_sums(rows, channels, inner, x3, gy3,
                              _ready(mean, statistics.MOMENTS_DTYPE), sums)
        return sums

    def input_gradient(self, x3, gy3, mean, p, q, r, out_dtype):
        x3, gy3 = _ready(x3, self.dtype), _ready(gy3, self.dtype)
        rows, channels, inner = x3.shape
        centre, rest = statistics.rounded_centre(mean, self.dtype)
        coef = numpy.empty((4, channels), dtype=self.dtype)
        coef[0] = centre
        coef[1] = p
        coef[2] = q
        coef[3] = r + q * rest
        gx3 = numpy.empty(x3.shape, dtype=self.dtype)
        _native.input_gradient(rows, channels, inner, x3, gy3, coef, gx3)
        return gx3.astype(out_dtype, copy=False)
