"""Statistics math for synchronized batch normalization.

Pure functions over ``xp`` arrays (NumPy or CuPy). Nothing here knows Chainer
or MPI: the communication layer moves the small per-channel buffers these
functions produce, and the Chainer glue decides when to call them.

Every input is first seen as a three-axis array ``(A, C, B)``: ``C`` runs over
the channels (the axes that are *not* reduced), ``A`` and ``B`` over the
reduced axes before and after them. For the usual layouts this is a free
reshape: ``(N, C, H, W)`` reduced over ``(0, 2, 3)`` is ``(N, C, H*W)``,
channels-last ``(N, H, W, C)`` reduced over ``(0, 1, 2)`` is
``(N*H*W, C, 1)``, and ``(N, C)`` reduced over ``(0,)`` is ``(N, C, 1)``.

Moments travel as float64 triples ``(count, mean, m2)`` per channel, where
``m2`` is the sum of squared deviations from ``mean``. Triples from several
ranks are combined with :func:`merge_moments` (the pairwise formula of Chan,
Golub and LeVeque), which never subtracts two large sums of squares and so
keeps its digits when the mean is large compared with the spread.
"""

import numpy

MOMENTS_DTYPE = numpy.float64


def reduced_view(x, axis):
    """Returns ``x`` seen as ``(A, C, B)`` with ``C`` the kept axes.

    Args:
        x (ndarray): Input array.
        axis (tuple of ints): Sorted axes to reduce over.

    Returns:
        ndarray: A view when the kept axes are adjacent (every layout Chainer
        users have in practice), otherwise a transposed copy of shape
        ``(R, C, 1)``.
    """
    keep = [i for i in range(x.ndim) if i not in axis]
    if not keep:
        return x.reshape(1, 1, -1)
    first, last = keep[0], keep[-1]
    channels = _prod(x.shape[first:last + 1])
    if keep == list(range(first, last + 1)):
        return x.reshape(_prod(x.shape[:first]), channels,
                         _prod(x.shape[last + 1:]))
    moved = x.transpose(tuple(axis) + tuple(keep))
    return moved.reshape(-1, _prod([x.shape[i] for i in keep]), 1)


def restore_shape(x3, shape, axis):
    """Inverse of :func:`reduced_view` for an array of the same size."""
    keep = [i for i in range(len(shape)) if i not in axis]
    if not keep or keep == list(range(keep[0], keep[-1] + 1)):
        return x3.reshape(shape)
    moved_shape = [shape[i] for i in tuple(axis) + tuple(keep)]
    order = tuple(axis) + tuple(keep)
    inverse = [order.index(i) for i in range(len(shape))]
    return x3.reshape(moved_shape).transpose(inverse)


def channel_sum(xp, a3, dtype):
    """Per-channel sum of ``(A, C, B)`` accumulated in ``dtype``.

    The inner axis ``B`` is contiguous for the common layouts, so NumPy sums
    it pairwise; the outer sum runs in float64.
    """
    inner = a3.sum(axis=2, dtype=dtype)
    return inner.sum(axis=0, dtype=MOMENTS_DTYPE)


def channel_dot(xp, a3, b3, dtype):
    """Per-channel sum of ``a3 * b3`` without a full-size temporary."""
    if xp is numpy:
        inner = numpy.einsum('acb,acb->ac', a3, b3, dtype=dtype)
    else:
        inner = (a3 * b3).sum(axis=2, dtype=dtype)
    return inner.sum(axis=0, dtype=MOMENTS_DTYPE)


def accumulation_dtype(dtype):
    """float16 inputs are summed in float32, the rest in their own dtype."""
    dtype = numpy.dtype(dtype)
    return numpy.dtype(numpy.float32) if dtype.itemsize < 4 else dtype


def local_moments(xp, x3, interm_dtype):
    """Count, mean and squared deviations of the local batch, per channel.

    The batch is first centred on a rough per-channel mean; sums of the
    centred values are then small, and the exact mean and ``m2`` follow from
    them (shifted sums), so the squares never hold the mean's magnitude.

    Args:
        xp: ``numpy`` or ``cupy``.
        x3 (ndarray): Input seen as ``(A, C, B)``.
        interm_dtype: Floating dtype of the centred temporary.

    Returns:
        tuple: ``(moments, centred, shift)`` where ``moments`` is a float64
        array ``(C, 3)`` of ``(count, mean, m2)``, ``centred`` is
        ``x3 - shift`` in ``interm_dtype`` (reused by the caller to build the
        output in place) and ``shift`` the per-channel centre used.
    """
    count = x3.shape[0] * x3.shape[2]
    channels = x3.shape[1]
    moments = xp.zeros((channels, 3), dtype=MOMENTS_DTYPE)
    acc = accumulation_dtype(interm_dtype)
    if count == 0:
        shift = xp.zeros(channels, dtype=interm_dtype)
        return moments, x3.astype(interm_dtype), shift
    shift = (channel_sum(xp, x3, acc) / count).astype(interm_dtype)
    centred = xp.subtract(x3, shift[None, :, None], dtype=interm_dtype)
    s1 = channel_sum(xp, centred, acc)
    s2 = channel_dot(xp, centred, centred, acc)
    moments[:, 0] = count
    moments[:, 1] = shift + s1 / count
    moments[:, 2] = xp.maximum(s2 - s1 * s1 / count, 0.0)
    return moments, centred, shift


def merge_moments(xp, a, b, out=None):
    """Combines two ``(..., 3)`` arrays of ``(count, mean, m2)`` triples.

    The result does not depend on the order of ``a`` and ``b`` to the last
    bit, so every rank of an allreduce ends with identical statistics.
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


def moments_to_sums(xp, moments):
    """``(count, mean, m2)`` as ``(count, sum, sum of squares)``.

    The form a plain sum-allreduce (NCCL) can combine. It loses about
    ``2 * eps64 * (mean / std) ** 2`` of relative variance accuracy, against
    none for :func:`merge_moments`.
    """
    n, mean, m2 = moments[:, 0], moments[:, 1], moments[:, 2]
    return xp.stack([n, n * mean, m2 + n * mean * mean], axis=1)


def sums_to_moments(xp, sums):
    """Inverse of :func:`moments_to_sums` after the sums were added up."""
    n = sums[:, 0]
    safe_n = xp.where(n > 0, n, 1.0)
    mean = sums[:, 1] / safe_n
    m2 = xp.maximum(sums[:, 2] - n * mean * mean, 0.0)
    return xp.stack([n, mean, m2], axis=1)


def normalize_into(xp, centred, shift, mean, inv_std, gamma, beta):
    """Writes ``gamma * (x - mean) * inv_std + beta`` over ``centred``.

    ``centred`` holds ``x - shift``; with per-channel ``scale`` and ``offset``
    the output is one multiply and one add over the buffer, with no other
    full-size temporary.
    """
    scale = gamma * inv_std
    offset = beta + (shift - mean) * scale
    dtype = centred.dtype
    centred *= scale.astype(dtype, copy=False)[None, :, None]
    centred += offset.astype(dtype, copy=False)[None, :, None]
    return centred


def backward_sums(xp, gy3, x3, mean, interm_dtype):
    """Local ``(sum gy, sum gy * (x - mean))`` per channel.

    ``x`` is centred on ``mean`` rounded to ``interm_dtype``; the rounding
    remainder is applied to the sums in float64, so a large mean costs no
    digits.

    Returns:
        tuple: ``(sums, centred, shift)``; ``sums`` is float64 ``(2, C)``,
        ``centred`` the ``x - shift`` buffer that
        :func:`input_gradient_into` turns into the input gradient.
    """
    acc = accumulation_dtype(interm_dtype)
    shift = mean.astype(interm_dtype)
    centred = xp.subtract(x3, shift[None, :, None], dtype=interm_dtype)
    sums = xp.empty((2, x3.shape[1]), dtype=MOMENTS_DTYPE)
    sums[0] = channel_sum(xp, gy3, acc)
    sums[1] = (channel_dot(xp, gy3, centred, acc)
               - (mean - shift) * sums[0])
    return sums, centred, shift


def input_gradient_coefficients(gamma, inv_std, global_sums, count, mean,
                                shift):
    """Per-channel ``(a, b, c)`` with ``gx = a * gy + b * (x - shift) + c``.

    ``global_sums`` are ``(sum gy, sum gy * (x - mean))`` over the global
    batch of ``count`` samples.
    """
    a = gamma * inv_std
    inv_count = 1.0 / (count + (count == 0))
    b = -a * inv_std * inv_std * global_sums[1] * inv_count
    c = -a * global_sums[0] * inv_count + b * (shift - mean)
    return a, b, c


def input_gradient_into(xp, centred, gy3, a, b, c, out_dtype):
    """Input gradient over the ``x - shift`` buffer from :func:`backward_sums`."""
    dtype = centred.dtype
    centred *= b.astype(dtype, copy=False)[None, :, None]
    centred += c.astype(dtype, copy=False)[None, :, None]
    a = a.astype(dtype, copy=False)[None, :, None]
    if gy3.dtype != dtype:
        gy3 = gy3.astype(dtype)
    centred += gy3 * a
    return centred.astype(out_dtype, copy=False)


def _prod(values):
    result = 1
    for v in values:
        result *= int(v)
    return result
