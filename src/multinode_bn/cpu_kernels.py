"""One-pass CPU loops for the statistics of synchronized batch normalization.

The CPU counterpart of :mod:`multinode_bn.cuda_kernels`: the same four
per-channel computations as :mod:`multinode_bn.statistics`, each in exactly
one pass over the batch and with no temporary array, by the small C
extension ``multinode_bn._cpu_kernels`` (built at install time; without a C
compiler the package installs without it and
:mod:`~multinode_bn.statistics` keeps its NumPy code). Nothing here knows
Chainer or MPI.

They serve C-contiguous float32 and float64 inputs whose output dtype is
their own (:func:`usable`); float16 and mixed precision stay on NumPy.
Sums are accumulated in float64.

Local moments (:func:`local_moments`)
    One pass: ``sum d`` and ``sum d * d`` with ``d = x - s`` per channel,
    where the shift ``s`` is the mean of the channel's first
    :data:`SHIFT_SAMPLE` values (a strided slice, no pass over the batch).
    The cancellation in ``m2 = sum d*d - (sum d)**2 / n`` amplifies the
    rounding of the float64 sums by ``1 + (s - mean)**2 / var``; should
    ``s`` lie more than :data:`SHIFT_TOLERANCE` standard deviations from
    the mean (an unrepresentative head of the batch), the sums are redone
    once around the mean just found, so the amplification stays below 17
    for float32 and float64 inputs alike.

Normalization (:func:`normalize_into`)
    ``y = (x - m) * scale + offset`` in the dtype of ``x``, with ``m`` the
    global mean rounded to that dtype and the rounding remainder folded
    into ``offset`` in float64, so a large mean costs no digits.

Backward sums (:func:`backward_sums`)
    ``sum gy`` and ``sum gy * (x - mean)`` per channel in one pass, with
    ``x - mean`` formed in float64.

Input gradient (:func:`input_gradient_into`)
    ``gx = p * gy + q * (x - m) + r``: the coefficients of
    :func:`multinode_bn.statistics.input_gradient_coefficients` with ``a``
    multiplied in, ``m`` the mean rounded to the dtype of ``x``.

Set ``MULTINODE_BN_CPU_KERNELS=0`` to make :func:`enabled` return
``False``.
"""

import os

import numpy

from multinode_bn.cuda_kernels import MOMENTS_DTYPE
from multinode_bn.cuda_kernels import ShiftedInput

try:
    from multinode_bn import _cpu_kernels as _native
except ImportError:  # pragma: no cover - built without a C compiler
    _native = None

#: Largest distance, in standard deviations, between a channel's shift and
#: its mean before the moments are summed again around the mean.
SHIFT_TOLERANCE = 4.0
#: The shift is the mean of at least this many leading values per channel
#: (a constant of the C code).
SHIFT_SAMPLE = getattr(_native, 'SHIFT_SAMPLE', 16)

_SERVED = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def available():
    """Whether the C extension was built."""
    return _native is not None


def enabled():
    """Whether the statistics layer should use these loops for NumPy arrays
    (``MULTINODE_BN_CPU_KERNELS``, default on, and the extension built)."""
    if _native is None:
        return False
    value = os.environ.get('MULTINODE_BN_CPU_KERNELS', '1').strip().lower()
    return value not in ('0', 'off', 'false', 'no')


def usable(x3, interm_dtype):
    """Whether the loops serve this input: enabled, a non-empty
    C-contiguous float32 or float64 NumPy array computed in its own dtype."""
    return (type(x3) is numpy.ndarray and x3.dtype in _SERVED
            and x3.dtype == interm_dtype and x3.size > 0
            and x3.flags.c_contiguous and x3.flags.aligned and enabled())


def _contiguous(a, dtype):
    if (type(a) is numpy.ndarray and a.dtype == dtype
            and a.flags.c_contiguous and a.flags.aligned):
        return a
    return numpy.array(a, dtype=dtype, order='C', copy=True)


def local_moments(x3, interm_dtype):
    """Count, mean and squared deviations of the local batch, per channel.

    See :func:`multinode_bn.statistics.local_moments`; requires
    :func:`usable`.

    Returns:
        tuple: ``(moments, centred, shift)``: float64 ``(C, 3)`` array of
        ``(count, mean, m2)``, a :class:`ShiftedInput` of ``x3`` for
        :func:`normalize_into`, and the float64 shift the sums used.
    """
    rows, channels, inner = x3.shape
    shift = numpy.empty(channels, dtype=MOMENTS_DTYPE)
    moments = numpy.empty((channels, 3), dtype=MOMENTS_DTYPE)
    _native.local_moments(x3.itemsize, rows, channels, inner, x3, shift,
                          moments, SHIFT_TOLERANCE)
    return moments, ShiftedInput(x3, shift), shift


def normalize_into(centred, mean, inv_std, gamma, beta):
    """``gamma * (x - mean) * inv_std + beta`` in the dtype of ``x``.

    Args:
        centred (ShiftedInput): From :func:`local_moments`.
        mean, inv_std, gamma, beta: float64 ``(C,)`` arrays.

    Returns:
        numpy.ndarray: ``(A, C, B)``, a new array.
    """
    x3 = centred.x3
    rows, channels, inner = x3.shape
    coef = numpy.empty((3, channels), dtype=x3.dtype)
    coef[0] = mean
    scale = gamma * inv_std
    coef[1] = scale
    coef[2] = beta + (coef[0] - mean) * scale
    y3 = numpy.empty_like(x3)
    _native.scale_shift(x3.itemsize, rows, channels, inner, x3, coef, y3)
    return y3


def backward_sums(gy3, x3, mean):
    """Local ``(sum gy, sum gy * (x - mean))`` per channel, one pass.

    Args:
        gy3 (numpy.ndarray): Output gradient seen as ``(A, C, B)``.
        x3 (numpy.ndarray): Input seen as ``(A, C, B)``; :func:`usable`.
        mean (numpy.ndarray): float64 ``(C,)`` mean of the global batch.

    Returns:
        tuple: ``(sums, centred, shift)``: float64 ``(2, C)`` sums, a
        :class:`ShiftedInput` for :func:`input_gradient_into` and the mean
        rounded to the dtype of ``x3`` (the ``shift`` of
        :func:`~multinode_bn.statistics.input_gradient_coefficients`).
    """
    rows, channels, inner = x3.shape
    gy3 = _contiguous(gy3, x3.dtype)
    mean = _contiguous(mean, MOMENTS_DTYPE)
    sums = numpy.empty((2, channels), dtype=MOMENTS_DTYPE)
    _native.gradient_sums(x3.itemsize, rows, channels, inner, x3, gy3, mean,
                          sums)
    shift = mean.astype(x3.dtype)
    return sums, ShiftedInput(x3, shift), shift


def input_gradient_into(centred, gy3, a, b, c, out_dtype):
    """``gx = a * (gy + b * (x - shift) + c)``, one pass.

    Args:
        centred (ShiftedInput): From :func:`backward_sums`.
        gy3 (numpy.ndarray): Output gradient seen as ``(A, C, B)``.
        a, b, c: float64 ``(C,)`` coefficients of
            :func:`multinode_bn.statistics.input_gradient_coefficients`
            for this ``shift``.
        out_dtype: dtype of the result.

    Returns:
        numpy.ndarray: ``gx`` seen as ``(A, C, B)``.
    """
    x3, shift = centred.x3, centred.shift
    rows, channels, inner = x3.shape
    gy3 = _contiguous(gy3, x3.dtype)
    coef = numpy.empty((4, channels), dtype=x3.dtype)
    coef[0] = shift
    coef[1] = a
    coef[2] = a * b
    coef[3] = a * c
    gx3 = numpy.empty_like(x3)
    _native.input_gradient(x3.itemsize, rows, channels, inner, x3, gy3, coef,
                           gx3)
    return gx3.astype(out_dtype, copy=False)


def merge_moments_into(a, b):
    """``b = merge(a, b)`` in place for contiguous float64 buffers of
    ``(count, mean, m2)`` triples (rows with a negative count in ``a`` are
    summed): the MPI reduction of
    :class:`~multinode_bn.communication.MpiStatsExchange`."""
    _native.merge_moments(a, b)
