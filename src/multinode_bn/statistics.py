"""Statistics math for synchronized batch normalization.

Pure functions over ``xp`` arrays (NumPy or CuPy). Nothing here knows Chainer
or MPI: the communication layer moves the small per-channel buffers these
functions produce, and the Chainer glue decides when to call them.

Every input is first seen as a three-axis array ``(A, C, B)`` (a
:class:`Layout`): ``C`` runs over the channels (the axes that are *not*
reduced), ``A`` and ``B`` over the reduced axes before and after them *in
memory order*. Since the sums over the reduced axes do not depend on their
order, the reduced axes are taken in the order of their strides, so that the
view is free for every layout real layers produce: ``(N, C, H, W)`` in
NCHW memory is ``(N, C, H*W)``; the same shape as a view of NHWC memory
(Chainer's CPU convolutions) is ``(N*H*W, C, 1)``, as is channels-last
``(N, H, W, C)``; ``(N, C)`` is ``(N, C, 1)``. Outputs are written in that
order and seen back in the input's shape, so they keep its memory order.

The four operations that pass over the batch form the interface of a
*statistics backend* (:class:`ReferenceStatistics` is the plain one over
``xp``; :class:`multinode_bn.cpu_kernels.CpuStatistics` the C loops):

``local_moments(x3)``
    float64 ``(C, 3)``: ``(count, mean, m2)`` per channel, ``m2`` the sum
    of squared deviations from ``mean``. ``x3`` is not empty.
``normalize(x3, mean, scale, beta, out_dtype)``
    ``y = (x - mean) * scale + beta``.
``backward_sums(x3, gy3, mean)``
    float64 ``(2, C)``: ``sum gy`` and ``sum gy * (x - mean)``.
``input_gradient(x3, gy3, mean, p, q, r, out_dtype)``
    ``gx = p * gy + q * (x - mean) + r``.

``mean``, ``scale``, ``beta``, ``p``, ``q`` and ``r`` are float64 ``(C,)``.
The element-wise operations subtract ``mean`` rounded to the computation
dtype and fold the rounding remainder into the constant term in float64
(:func:`rounded_centre`), so a large mean costs no digits.

Across processes, moments travel as float64 sums around a per-channel shift
``K`` that is the same on every process (:func:`moments_to_shifted_sums`):
a plain elementwise sum (MPI's built-in ``SUM``, NCCL) combines them, and
:func:`shifted_sums_to_moments` recovers the global moments. The variance
loses about ``eps64 * (mean - K)**2 / var`` of relative accuracy to the
cancellation, so ``K`` should be near the mean (the previous global mean
does well). :func:`merge_moments` combines two sets of moments exactly,
whatever their means.
"""

import functools
import importlib

import numpy

#: The dtype moments and sums travel in.
MOMENTS_DTYPE = numpy.dtype(numpy.float64)

# Sums exchanged around a shift more than ``sqrt`` of this many standard
# deviations from the global mean are exchanged again around the mean: the
# variance then keeps about ``1e-12`` of relative accuracy.
EXCHANGE_SHIFT_TOLERANCE = 1e4

# A shift more than this many standard deviations from the mean is replaced
# by the mean and the sums are taken again: the cancellation in
# ``m2 = sum d*d - (sum d)**2 / n`` amplifies rounding by
# ``1 + (shift - mean)**2 / var``, which this keeps below 17.
SHIFT_TOLERANCE = 4.0


def compute_dtype(dtype):
    """The dtype element-wise work runs in: float16 in float32 (its squares
    overflow), every other floating dtype in itself."""
    dtype = numpy.dtype(dtype)
    return numpy.dtype(numpy.float32) if dtype.itemsize < 4 else dtype


class Layout(object):
    """How an input of one shape and strides is seen as ``(A, C, B)``.

    Args:
        x (ndarray): The input (only its shape and strides are read).
        axis (tuple of ints): Sorted axes to reduce over.

    Attributes:
        order (tuple of ints): The input's axes in the order of the view.
        shape3 (tuple of ints): ``(A, C, B)``.
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
        self.shape3 = tuple(_prod(x.shape[i] for i in part)
                            for part in (a_axes, keep, b_axes))
        self._inverse = tuple(int(i) for i in numpy.argsort(self.order))

    @staticmethod
    def of(x, axis):
        """The layout of ``x`` (cached per shape, strides and axes: a
        layer's input has the same ones at every call)."""
        return _layout(tuple(x.shape), tuple(x.strides), tuple(axis))

    def view(self, a):
        """``a`` seen as ``(A, C, B)``: a view when its memory order allows
        it (a C-contiguous result), otherwise one C-contiguous copy."""
        moved = a.transpose(self.order)
        xp = _array_module(a)
        if not moved.flags.c_contiguous:
            moved = xp.ascontiguousarray(moved)
        return moved.reshape(self.shape3)

    def restore(self, a3):
        """Inverse of :meth:`view` for a C-contiguous ``(A, C, B)`` array:
        a view in the input's shape and memory order."""
        return a3.reshape([self.shape[i] for i in self.order]).transpose(
            self._inverse)


@functools.lru_cache(maxsize=1024)
def _layout(shape, strides, axis):
    return Layout(_Shape(shape, strides), axis)


class _Shape(object):
    """Just the shape and strides of an array."""

    def __init__(self, shape, strides):
        self.shape, self.strides, self.ndim = shape, strides, len(shape)


def rounded_centre(mean, dtype):
    """``mean`` rounded to ``dtype``, and what the rounding left out.

    Element-wise work subtracts the rounded mean ``m`` in ``dtype``; the
    remainder ``m - mean`` (float64) goes into a per-channel constant.
    """
    m = mean.astype(dtype)
    return m, m.astype(MOMENTS_DTYPE) - mean


def gradient_coefficients(gamma, inv_std, global_sums, count):
    """Per-channel ``(p, q, r)`` with ``gx = p * gy + q * (x - mean) + r``.

    ``global_sums`` are ``(sum gy, sum gy * (x - mean))`` over the global
    batch of ``count`` samples. A zero ``gamma`` gives a zero gradient
    exactly, as in Chainer.
    """
    inv_count = 1.0 / (count + (count == 0))
    p = gamma * inv_std
    q = -p * inv_std * inv_std * global_sums[1] * inv_count
    r = -p * global_sums[0] * inv_count
    return p, q, r


def moments_to_shifted_sums(xp, moments, shift):
    """``(count, mean, m2)`` as a flat float64 buffer of sums around
    ``shift``: ``[count, sum (x - shift) per channel, sum (x - shift)**2 per
    channel]``, which an elementwise sum over processes combines when every
    process uses the same ``shift``."""
    count = moments[:1, 0]
    d = moments[:, 1] - shift
    return xp.concatenate([count, count * d, moments[:, 2] + count * d * d])


def shifted_sums_to_moments(xp, sums, shift):
    """Inverse of :func:`moments_to_shifted_sums` after the sums were
    added up: float64 ``(C, 3)`` global ``(count, mean, m2)``."""
    channels = (sums.size - 1) // 2
    count = float(sums[0]) if xp is numpy else sums[0]
    safe = xp.maximum(count, 1.0)
    s1, s2 = sums[1:1 + channels], sums[1 + channels:]
    return _moments(xp, count, shift + s1 / safe, s2 - s1 * s1 / safe)


def shift_too_far(moments, shift, eps=0.0):
    """Whether global ``moments`` obtained from sums around ``shift`` lost
    digits: a mean more than ``sqrt(EXCHANGE_SHIFT_TOLERANCE)`` standard
    deviations (of ``var + eps``) from the shift in some channel."""
    count = max(float(moments[0, 0]), 1.0)
    d = moments[:, 1] - shift
    var = moments[:, 2] / count + eps
    return bool((d * d > EXCHANGE_SHIFT_TOLERANCE * var).any())


def merge_moments(xp, a, b, out=None):
    """Combines two ``(..., 3)`` arrays of ``(count, mean, m2)`` triples.

    The pairwise formula of Chan, Golub and LeVeque: it never subtracts two
    large sums of squares, so it keeps its digits when the mean is large
    compared with the spread. The result does not depend on the order of
    ``a`` and ``b`` to the last bit.
    """
    na, ma, m2a = a[..., 0], a[..., 1], a[..., 2]
    nb, mb, m2b = b[..., 0], b[..., 1], b[..., 2]
    n = na + nb
    safe_n = xp.where(n > 0, n, 1.0)
    delta = mb - ma
    mean = (na * ma + nb * mb) / safe_n
    m2 = m2a + m2b + delta * delta * (na * nb / safe_n)
    if out is None:
        out = xp.empty(xp.broadcast(a, b).shape, dtype=MOMENTS_DTYPE)
    out[..., 0] = n
    out[..., 1] = mean
    out[..., 2] = m2
    return out


class ReferenceStatistics(object):
    """The plain statistics backend over ``xp`` (NumPy or CuPy).

    Short and readable: the test oracle of the fast paths, the CPU fallback
    (float16, mixed precision, no C extension) and the GPU path, where every
    line is one of CuPy's element-wise or reduction kernels. Element-wise
    work runs in :func:`compute_dtype` of the computation dtype; every sum
    is accumulated in float64.

    Args:
        xp: ``numpy`` or ``cupy``.
        dtype: The computation dtype (the input's, promoted with the
            parameters').
    """

    name = 'reference'

    def __init__(self, xp, dtype):
        self.xp = xp
        self.dtype = compute_dtype(dtype)

    def __reduce__(self):
        # A module cannot be copied or pickled: a link that caches this
        # backend is copied (copy.deepcopy, Link.copy) by its module's name.
        return _reference_statistics, (self.xp.__name__, self.dtype)

    def _sums(self, u, v):
        """Per-channel float64 ``sum u`` and ``sum u * v`` of ``(A, C, B)``."""
        return (u.sum(axis=(0, 2), dtype=MOMENTS_DTYPE),
                (u * v).sum(axis=(0, 2), dtype=MOMENTS_DTYPE))

    def local_moments(self, x3):
        x = x3.astype(self.dtype, copy=False)
        count = x.shape[0] * x.shape[2]
        # Sums shifted by the first value of each channel, taken again
        # around the mean should that value lie far from it.
        shift = x[0, :, 0]
        d = x - shift[None, :, None]
        s1, s2 = self._sums(d, d)
        if bool(_too_far(s1, s2, count).any()):
            shift = (shift + s1 / count).astype(self.dtype)
            d = x - shift[None, :, None]
            s1, s2 = self._sums(d, d)
        return _moments(self.xp, count, shift.astype(MOMENTS_DTYPE) +
                        s1 / count, s2 - s1 * s1 / count)

    def normalize(self, x3, mean, scale, beta, out_dtype):
        m, rest = rounded_centre(mean, self.dtype)
        offset = beta + rest * scale
        y = (x3.astype(self.dtype, copy=False) - m[None, :, None]) * \
            scale.astype(self.dtype)[None, :, None]
        y += offset.astype(self.dtype)[None, :, None]
        return y.astype(out_dtype, copy=False)

    def backward_sums(self, x3, gy3, mean):
        m, rest = rounded_centre(mean, self.dtype)
        gy = gy3.astype(self.dtype, copy=False)
        g1, g2 = self._sums(gy, x3.astype(self.dtype, copy=False)
                            - m[None, :, None])
        return self.xp.stack([g1, g2 + rest * g1])

    def input_gradient(self, x3, gy3, mean, p, q, r, out_dtype):
        m, rest = rounded_centre(mean, self.dtype)
        r = r + q * rest
        t = self.dtype
        gx = gy3.astype(t, copy=False) * p.astype(t)[None, :, None]
        gx += (x3.astype(t, copy=False) - m[None, :, None]) * \
            q.astype(t)[None, :, None]
        gx += r.astype(t)[None, :, None]
        return gx.astype(out_dtype, copy=False)


def _too_far(s1, s2, count):
    """Channels whose shift lies more than :data:`SHIFT_TOLERANCE` standard
    deviations from the mean, from the shifted sums:
    ``(s1 / n)**2 > tol**2 * m2 / n`` with ``m2 = s2 - s1**2 / n``."""
    tol2 = SHIFT_TOLERANCE ** 2
    return s1 * s1 * (1.0 + tol2) > s2 * (tol2 * count)


def _moments(xp, count, mean, m2):
    moments = xp.empty((mean.shape[0], 3), dtype=MOMENTS_DTYPE)
    moments[:, 0] = count
    moments[:, 1] = mean
    # NaN stays NaN: a non-finite batch must not look like variance 0.
    moments[:, 2] = xp.where(m2 < 0.0, 0.0, m2)
    return moments


def _array_module(a):
    return numpy if isinstance(a, numpy.ndarray) else __import__('cupy')


def _prod(values):
    result = 1
    for v in values:
        result *= int(v)
    return result


def _reference_statistics(module_name, dtype):
    return ReferenceStatistics(importlib.import_module(module_name), dtype)
