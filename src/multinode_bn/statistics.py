"""Statistics math over ``xp`` arrays (NumPy or CuPy; no Chainer, no MPI).

Moments are ``(count, mean, m2)`` per channel, ``m2`` the sum of squared
deviations, exchanged as float64 sums around a shift all processes share.
:class:`ReferenceStatistics` is the plain backend of the four operations
(docs/design.md explains the layouts, the shifted sums and their precision).
"""

import functools
import math
import types

import numpy

#: The dtype moments and sums travel in.
MOMENTS_DTYPE = numpy.dtype(numpy.float64)

# Sums are taken again around the mean where their shift lies more than
# this many standard deviations from it: locally, cancellation amplifies
# rounding by 1 + tolerance**2; float64 exchanged sums keep ~1e-12 of var.
SHIFT_TOLERANCE = 4.0
EXCHANGE_SHIFT_TOLERANCE = 100.0


class Layout(object):
    """How an input ``x`` (its shape and strides) reduced over the sorted
    ``axis`` is seen as ``shape3 = (A, C, B)``, its axes taken in ``order``.
    """

    def __init__(self, x, axis):
        keep = [i for i in range(x.ndim) if i not in axis]
        # Axes of size > 1 by decreasing stride (ties keep their order);
        # reduced axes before the first kept one in memory make A, the rest
        # B, and size-1 axes, which have no place in memory, go to A.
        by_stride = sorted((i for i in range(x.ndim) if x.shape[i] > 1),
                           key=lambda i: -abs(x.strides[i]))
        first = next((k for k, i in enumerate(by_stride) if i not in axis),
                     len(by_stride))
        a_axes = [i for i in axis if x.shape[i] <= 1] + [
            i for i in by_stride[:first] if i in axis]
        b_axes = [i for i in by_stride[first:] if i in axis]
        self.order = tuple(a_axes + keep + b_axes)
        self.shape = tuple(x.shape)
        self.shape3 = tuple(math.prod(x.shape[i] for i in part)
                            for part in (a_axes, keep, b_axes))
        self._inverse = tuple(int(i) for i in numpy.argsort(self.order))

    @staticmethod
    def of(x, axis):
        """The layout of ``x``, cached per shape, strides and axes."""
        return _layout(tuple(x.shape), tuple(x.strides), tuple(axis))

    def view(self, a):
        """``a`` seen as ``(A, C, B)``: a view where its memory order allows
        it, otherwise one C-contiguous copy."""
        moved = a.transpose(self.order)
        if not moved.flags.c_contiguous:
            moved = array_module(a).ascontiguousarray(moved)
        return moved.reshape(self.shape3)

    def restore(self, a3):
        """Inverse of :meth:`view` for a C-contiguous ``(A, C, B)`` array:
        a view in the input's shape and memory order."""
        return a3.reshape([self.shape[i] for i in self.order]).transpose(
            self._inverse)


@functools.lru_cache(maxsize=1024)
def _layout(shape, strides, axis):
    return Layout(types.SimpleNamespace(
        shape=shape, strides=strides, ndim=len(shape)), axis)


def rounded_centre(mean, dtype):
    """``mean`` rounded to ``dtype``, and the float64 remainder the rounding
    left out (which element-wise work folds into a per-channel constant)."""
    m = mean.astype(dtype)
    return m, m.astype(MOMENTS_DTYPE) - mean


def gradient_coefficients(gamma, inv_std, global_sums, count):
    """Per-channel ``(p, q, r)`` of ``gx = p * gy + q * (x - mean) + r``,
    from ``global_sums``, ``(sum gy, sum gy * (x - mean))`` over ``count``
    samples. A zero ``gamma`` gives a zero gradient exactly, as in Chainer."""
    inv_count = 1.0 / (count + (count == 0))
    p = gamma * inv_std
    q = -p * inv_std * inv_std * global_sums[1] * inv_count
    r = -p * global_sums[0] * inv_count
    return p, q, r


def moments_to_shifted_sums(xp, moments, shift):
    """Moments as float64 sums ``[count, sum (x - shift), sum (x - shift)**2]``
    (per channel), which processes sharing ``shift`` add up."""
    count = moments[:1, 0]
    d = moments[:, 1] - shift
    return xp.concatenate([count, count * d, moments[:, 2] + count * d * d])


def shifted_sums_to_moments(xp, sums, shift):
    """Global ``(C, 3)`` moments from added :func:`moments_to_shifted_sums`."""
    channels = (sums.size - 1) // 2
    count = float(sums[0]) if xp is numpy else sums[0]
    safe = xp.maximum(count, 1.0)
    s1, s2 = sums[1:1 + channels], sums[1 + channels:]
    return _moments(xp, count, shift + s1 / safe, s2 - s1 * s1 / safe)


def shift_too_far(moments, shift, eps=0.0):
    """Whether global ``moments`` obtained from sums around ``shift`` lost
    digits: a mean more than :data:`EXCHANGE_SHIFT_TOLERANCE` standard
    deviations (of ``var + eps``) from the shift in some channel."""
    count = max(float(moments[0, 0]), 1.0)
    d = moments[:, 1] - shift
    var = moments[:, 2] / count + eps
    return bool((d * d > EXCHANGE_SHIFT_TOLERANCE ** 2 * var).any())


def merge_moments(xp, a, b):
    """Combines two ``(..., 3)`` arrays of moments exactly, by Chan, Golub
    and LeVeque's pairwise formula: no large sums of squares are subtracted,
    and the bits do not depend on the order of ``a`` and ``b``."""
    na, ma, m2a = a[..., 0], a[..., 1], a[..., 2]
    nb, mb, m2b = b[..., 0], b[..., 1], b[..., 2]
    n = na + nb
    safe_n = xp.where(n > 0, n, 1.0)
    delta = mb - ma
    return xp.stack([n, (na * ma + nb * mb) / safe_n,
                     m2a + m2b + delta * delta * (na * nb / safe_n)], axis=-1)


class ReferenceStatistics(object):
    """The plain statistics backend: the C loops' test oracle, the CPU
    fallback and the GPU path. Element-wise work runs in ``dtype`` (float16's
    in float32: its squares overflow); every sum accumulates in float64.

    Args:
        xp: ``numpy`` or ``cupy``.
        dtype: The input's dtype promoted with the parameters'.
    """

    name = 'reference'

    def __init__(self, xp, dtype):
        self.xp = xp
        self.dtype = numpy.promote_types(dtype, numpy.float32)

    def _sums(self, u, v):  # per channel, in float64: sum u, sum u * v
        return (u.sum(axis=(0, 2), dtype=MOMENTS_DTYPE),
                (u * v).sum(axis=(0, 2), dtype=MOMENTS_DTYPE))

    def local_moments(self, x3):
        """Float64 ``(C, 3)`` moments of ``x3`` (zeros if it is empty)."""
        if not x3.size:
            return self.xp.zeros((x3.shape[1], 3), MOMENTS_DTYPE)
        x = x3.astype(self.dtype, copy=False)
        count = x.shape[0] * x.shape[2]
        shift = x[0, :, 0]
        d = x - shift[:, None]
        s1, s2 = self._sums(d, d)
        # The shift too far from the mean: (s1/n)**2 > tol**2 * m2/n.
        tol2 = SHIFT_TOLERANCE ** 2
        if bool((s1 * s1 * (1.0 + tol2) > s2 * (tol2 * count)).any()):
            shift = (shift + s1 / count).astype(self.dtype)
            d = x - shift[:, None]
            s1, s2 = self._sums(d, d)
        return _moments(self.xp, count, shift.astype(MOMENTS_DTYPE) +
                        s1 / count, s2 - s1 * s1 / count)

    def normalize(self, x3, mean, scale, beta, out_dtype):
        """``y = (x - mean) * scale + beta``. Here and below, the arguments
        but ``x3``, ``gy3`` and ``out_dtype`` are float64 ``(C,)``."""
        m, rest = rounded_centre(mean, self.dtype)
        x = x3.astype(self.dtype, copy=False)
        y = (x - m[:, None]) * scale.astype(self.dtype)[:, None]
        y += (beta + rest * scale).astype(self.dtype)[:, None]
        return y.astype(out_dtype, copy=False)

    def backward_sums(self, x3, gy3, mean):
        """Float64 ``(2, C)``: ``sum gy`` and ``sum gy * (x - mean)``."""
        m, rest = rounded_centre(mean, self.dtype)
        gy = gy3.astype(self.dtype, copy=False)
        g1, g2 = self._sums(gy, x3.astype(self.dtype, copy=False) - m[:, None])
        return self.xp.stack([g1, g2 + rest * g1])

    def input_gradient(self, x3, gy3, mean, p, q, r, out_dtype):
        """``gx = p * gy + q * (x - mean) + r``."""
        m, rest = rounded_centre(mean, self.dtype)
        t = self.dtype
        gx = gy3.astype(t, copy=False) * p.astype(t)[:, None]
        gx += (x3.astype(t, copy=False) - m[:, None]) * q.astype(t)[:, None]
        gx += (r + q * rest).astype(t)[:, None]
        return gx.astype(out_dtype, copy=False)


def _moments(xp, count, mean, m2):
    moments = xp.empty((mean.shape[0], 3), dtype=MOMENTS_DTYPE)
    moments[:, 0] = count
    moments[:, 1] = mean
    # NaN stays NaN: a non-finite batch must not look like variance 0.
    moments[:, 2] = xp.where(m2 < 0.0, 0.0, m2)
    return moments


def array_module(a):
    return numpy if isinstance(a, numpy.ndarray) else __import__('cupy')
