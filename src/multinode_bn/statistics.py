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

On the CPU, for C-contiguous float32 and float64 inputs computed in their
own dtype, the four functions that pass over the batch
(:func:`local_moments`, :func:`normalize_into`, :func:`backward_sums`,
:func:`input_gradient_into`) hand the work to the one-pass C loops of
:mod:`multinode_bn.cpu_kernels` when the extension was built, unless
``MULTINODE_BN_CPU_KERNELS=0``; ``centred`` is then a
:class:`~multinode_bn.cuda_kernels.ShiftedInput` of the input, as with
the CUDA kernels below.

Otherwise (float16, mixed precision, strided views, no C extension), on
NumPy the passes over the batch are what costs, so each function makes as
few as it can and no full-size temporary besides its output: per-channel
sums are ``einsum`` reductions over blocks of the input (float64 only for
the short block sums), per-channel scale and offset are applied in place
with the vector expanded to the length of a sample (see :func:`_channel_op`),
and the input gradient is built over the one buffer that becomes ``gx``.
When every channel's mean is within a few standard deviations of zero, the
input itself is centred well enough: no ``x - shift`` buffer is written,
and the ``centred`` returned is a read-only view of the input, which
:func:`normalize_into` and :func:`input_gradient_into` read into a new
array instead of overwriting.

With CuPy, the four functions that pass over the batch
(:func:`local_moments`, :func:`normalize_into`, :func:`backward_sums`,
:func:`input_gradient_into`) hand the work to the fused one-pass kernels of
:mod:`multinode_bn.cuda_kernels`, unless ``MULTINODE_BN_CUDA_KERNELS=0``.
``centred`` is then a :class:`~multinode_bn.cuda_kernels.ShiftedInput`: the
input and its shift, subtracted by the kernels as they read the input.
"""

import functools

import numpy

from multinode_bn import cpu_kernels
from multinode_bn import cuda_kernels
# One definition for the three statistics modules: the dtype moments and
# sums travel in, and float16 summed in float32, the rest in their own dtype.
from multinode_bn.cuda_kernels import MOMENTS_DTYPE  # NOQA
from multinode_bn.cuda_kernels import accumulation_dtype  # NOQA


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


# Per channel, up to this many values are summed in the accumulation dtype
# before the block sums are added up in float64: float32 sums of a thousand
# values keep about ``1e-6`` relative accuracy, and no whole array is ever
# cast to float64.
_BLOCK = 1024
# Rows are added one after another (SIMD lanes run along the inner axis), so
# a short inner axis gets proportionally fewer rows per block.
_LANES = 16
# NumPy's default ufunc buffer, in elements.
_UFUNC_BUFFER = 8192


@functools.lru_cache(maxsize=256)
def _inner_split(inner):
    """``(chunks, chunk)`` splitting the inner axis into chunks of at most
    :data:`_BLOCK` values, when it has a divisor large enough for the float64
    stage to stay small."""
    if inner > _BLOCK:
        for chunk in range(_BLOCK, _BLOCK // 16 - 1, -1):
            if inner % chunk == 0:
                return inner // chunk, chunk
    return 1, inner


def _channel_reduce(xp, a3, b3, dtype):
    """Per-channel sum of ``a3`` (or of ``a3 * b3``), returned in float64.

    NumPy: one ``einsum`` (SIMD, no full-size temporary) sums blocks of about
    :data:`_BLOCK` values per channel in ``dtype``; the block sums are then
    added in float64. The blocks are views of the operands for any strides
    (axes are only split), so a broadcast ``gy`` needs no copy.
    """
    if xp is not numpy:
        inner = (a3 if b3 is None else a3 * b3).sum(axis=2, dtype=dtype)
        return inner.sum(axis=0, dtype=MOMENTS_DTYPE)
    rows, channels, inner = a3.shape
    if a3.size == 0:
        return numpy.zeros(channels, dtype=MOMENTS_DTYPE)
    operands = (a3,) if b3 is None else (a3, b3)
    chunks, chunk = _inner_split(inner)
    split = (channels, chunks, chunk)
    per_block = max(1, min(rows, _BLOCK // max(chunk, _LANES)))
    blocks, tail = divmod(rows, per_block)
    total = None
    if blocks:
        done = blocks * per_block
        heads = [(o[:done] if tail else o).reshape((blocks, per_block) + split)
                 for o in operands]
        partial = numpy.einsum(
            'qmcnk,qmcnk->qcn' if b3 is not None else 'qmcnk->qcn', *heads,
            dtype=dtype)
        total = partial.sum(axis=(0, 2), dtype=MOMENTS_DTYPE)
    if tail:
        tails = [o[rows - tail:].reshape((tail,) + split) for o in operands]
        partial = numpy.einsum(
            'mcnk,mcnk->cn' if b3 is not None else 'mcnk->cn', *tails,
            dtype=dtype).sum(axis=1, dtype=MOMENTS_DTYPE)
        total = partial if total is None else total + partial
    return total


def channel_sum(xp, a3, dtype):
    """Per-channel float64 sum of ``(A, C, B)``, accumulated in ``dtype``."""
    return _channel_reduce(xp, a3, None, dtype)


def channel_dot(xp, a3, b3, dtype):
    """Per-channel float64 sum of ``a3 * b3``, accumulated in ``dtype``."""
    return _channel_reduce(xp, a3, b3, dtype)


@functools.lru_cache(maxsize=256)
def _period_repeats(rows, period):
    # NumPy's ufunc loop copies a broadcast operand into its buffer whenever
    # an inner run is shorter than the buffer; repeating the per-channel
    # pattern until a run fills the buffer keeps every operand contiguous.
    wanted = -(-_UFUNC_BUFFER // period)
    for k in range(wanted, min(rows, 4 * wanted) + 1):
        if rows % k == 0:
            return k
    return 1


def _channel_op(xp, ufunc, a3, v, out):
    """``out = ufunc(a3, v)`` with ``v`` a per-channel vector of ``(C,)``.

    On NumPy with contiguous arrays the vector is expanded once to the
    length of one sample (``C * B`` values, or a few samples), so the ufunc
    runs over long contiguous runs instead of one short run per
    ``(sample, channel)`` pair: about twice as fast as plain broadcasting.
    """
    v = v.astype(out.dtype, copy=False)
    if (xp is numpy and out.size and a3.flags.c_contiguous
            and out.flags.c_contiguous):
        rows, channels, inner = out.shape
        k = _period_repeats(rows, channels * inner)
        pattern = v.repeat(inner) if inner > 1 else v
        if k > 1:
            pattern = pattern[None].repeat(k, axis=0)
        flat = (rows // k, pattern.size)
        ufunc(a3.reshape(flat), pattern.reshape(-1), out=out.reshape(flat))
    else:
        ufunc(a3, v[None, :, None], out=out)
    return out


def _input_view(x3):
    """``x3`` as the ``centred`` buffer of a zero shift: read-only, so that
    the functions writing over ``centred`` write a new array instead."""
    view = x3.view()
    view.flags.writeable = False
    return view


def _output_buffer(xp, centred, dtype):
    """Where the output built from ``centred`` goes: over it, unless it is a
    read-only view of the input (NumPy only)."""
    if xp is not numpy or centred.flags.writeable:
        return centred
    return xp.empty(centred.shape, dtype=dtype)


# Shifted sums lose about ``1 + d**2 / var`` units of the accumulation's
# rounding in ``m2`` when the shift is ``d`` away from the mean. Shifts are
# kept within ``d**2 <= _SHIFT_TOLERANCE * var`` (4 standard deviations),
# which bounds the loss near ``2e-5`` of the variance for float32 inputs.
_SHIFT_TOLERANCE = 16.0
# The shift is chosen from the first values of each channel (at least this
# many), not from a pass over the whole batch.
_SHIFT_SAMPLE = 16


def _shifted_sums(xp, x3, shift, centred, acc):
    """Fills ``centred`` with ``x3 - shift``; returns its sum and sum of
    squares per channel."""
    _channel_op(xp, xp.subtract, x3, shift, centred)
    return (channel_sum(xp, centred, acc),
            channel_dot(xp, centred, centred, acc))


def local_moments(xp, x3, interm_dtype):
    """Count, mean and squared deviations of the local batch, per channel.

    The batch is centred on a per-channel ``shift`` close to the data; sums
    of the centred values are then small, and the exact mean and ``m2``
    follow from them (shifted sums), so the squares never hold the mean's
    magnitude. With NumPy the shift comes from the first few values of each
    channel, which costs no pass over the batch: zero if they sit within two
    standard deviations of zero (the input is summed as it is, and nothing
    is written), their mean otherwise. Should the shift turn out more than
    ``sqrt(_SHIFT_TOLERANCE)`` standard deviations from the batch mean (an
    unrepresentative head of the batch), the sums are redone once around
    the mean just found. With CuPy the shift is a first-pass mean.

    Args:
        xp: ``numpy`` or ``cupy``.
        x3 (ndarray): Input seen as ``(A, C, B)``.
        interm_dtype: Floating dtype of the centred temporary.

    Returns:
        tuple: ``(moments, centred, shift)`` where ``moments`` is a float64
        array ``(C, 3)`` of ``(count, mean, m2)``, ``centred`` holds
        ``x3 - shift`` and ``shift`` (``interm_dtype``, ``(C,)``) is the
        per-channel centre used. ``centred`` is a new ``interm_dtype`` array
        that :func:`normalize_into` overwrites with the output, or, for a
        zero shift, a read-only view of ``x3``; with the CuPy kernels, a
        :class:`~multinode_bn.cuda_kernels.ShiftedInput`.
    """
    if xp is numpy and cpu_kernels.usable(x3, interm_dtype):
        return cpu_kernels.local_moments(x3, interm_dtype)
    if xp is not numpy and cuda_kernels.enabled():
        return cuda_kernels.local_moments(x3, interm_dtype)
    rows, channels, inner = x3.shape
    count = rows * inner
    acc = accumulation_dtype(interm_dtype)
    if count == 0:
        shift = xp.zeros(channels, dtype=interm_dtype)
        moments = xp.zeros((channels, 3), dtype=MOMENTS_DTYPE)
        return moments, x3.astype(interm_dtype), shift
    if xp is numpy:
        head = x3[:-(-_SHIFT_SAMPLE // inner)]
        sample = head.shape[0] * inner
        h1 = channel_sum(xp, head, acc)
        h2 = channel_dot(xp, head, head, acc)
        # mean**2 <= k * var on the head, with k = _SHIFT_TOLERANCE / 4
        k = 0.25 * _SHIFT_TOLERANCE
        if (h1 * h1 * (1.0 + k) <= h2 * (k * sample)).all():
            shift = xp.zeros(channels, dtype=interm_dtype)
            centred = _input_view(x3)
            s1 = channel_sum(xp, x3, acc)
            s2 = channel_dot(xp, x3, x3, acc)
        else:
            shift = (h1 / sample).astype(interm_dtype)
            centred = xp.empty(x3.shape, dtype=interm_dtype)
            s1, s2 = _shifted_sums(xp, x3, shift, centred, acc)
        # (s1 / count)**2 > _SHIFT_TOLERANCE * m2 / count: shift too far
        if (s1 * s1 * (1.0 + _SHIFT_TOLERANCE)
                > s2 * (_SHIFT_TOLERANCE * count)).any():
            shift = (shift + s1 / count).astype(interm_dtype)
            centred = _output_buffer(xp, centred, interm_dtype)
            s1, s2 = _shifted_sums(xp, x3, shift, centred, acc)
    else:
        shift = (channel_sum(xp, x3, acc) / count).astype(interm_dtype)
        centred = xp.empty(x3.shape, dtype=interm_dtype)
        s1, s2 = _shifted_sums(xp, x3, shift, centred, acc)
    moments = xp.empty((channels, 3), dtype=MOMENTS_DTYPE)
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
    """``gamma * (x - mean) * inv_std + beta`` from ``centred = x - shift``.

    With per-channel ``scale`` and ``offset`` the output is one multiply and
    one add, written over ``centred`` (or, when ``centred`` is a read-only
    view of the input, into a new array of ``shift``'s dtype); no other
    full-size temporary.

    Returns:
        ndarray: The output, ``(A, C, B)`` (of the input's dtype when
        ``centred`` is a :class:`~multinode_bn.cuda_kernels.ShiftedInput`).
    """
    if isinstance(centred, cuda_kernels.ShiftedInput):
        if xp is numpy:
            return cpu_kernels.normalize_into(centred, mean, inv_std, gamma,
                                              beta)
        return cuda_kernels.normalize_into(centred, shift, mean, inv_std,
                                           gamma, beta)
    scale = gamma * inv_std
    offset = beta + (shift - mean) * scale
    out = _output_buffer(xp, centred, shift.dtype)
    _channel_op(xp, xp.multiply, centred, scale, out)
    _channel_op(xp, xp.add, out, offset, out)
    return out


def backward_sums(xp, gy3, x3, mean, interm_dtype, inv_std=None):
    """Local ``(sum gy, sum gy * (x - mean))`` per channel.

    ``x`` is centred on ``mean`` rounded to ``interm_dtype``; the rounding
    remainder is applied to the sums in float64, so a large mean costs no
    digits. Given ``inv_std`` (NumPy), channels whose mean is within four
    standard deviations of zero need no centring: when all are, the sums are
    taken over ``x`` itself and no buffer is written.

    Args:
        xp: ``numpy`` or ``cupy``.
        gy3 (ndarray): Output gradient seen as ``(A, C, B)``.
        x3 (ndarray): Input seen as ``(A, C, B)``.
        mean (ndarray): float64 ``(C,)`` mean of the global batch.
        interm_dtype: Floating dtype of the centred temporary.
        inv_std (ndarray): float64 ``(C,)`` ``1 / sqrt(var + eps)`` of the
            global batch, or ``None``.

    Returns:
        tuple: ``(sums, centred, shift)``; ``sums`` is float64 ``(2, C)``,
        ``centred`` the ``x - shift`` buffer (a new array, or a read-only
        view of ``x3`` for a zero shift) that :func:`input_gradient_into`
        turns into the input gradient (with the CuPy kernels, a
        :class:`~multinode_bn.cuda_kernels.ShiftedInput`).
    """
    if xp is numpy and cpu_kernels.usable(x3, interm_dtype):
        return cpu_kernels.backward_sums(gy3, x3, mean)
    if xp is not numpy and cuda_kernels.enabled():
        return cuda_kernels.backward_sums(gy3, x3, mean, interm_dtype)
    acc = accumulation_dtype(interm_dtype)
    sums = xp.empty((2, x3.shape[1]), dtype=MOMENTS_DTYPE)
    sums[0] = channel_sum(xp, gy3, acc)
    if (xp is numpy and inv_std is not None and x3.size
            and ((mean * inv_std) ** 2 <= _SHIFT_TOLERANCE).all()):
        shift = xp.zeros(x3.shape[1], dtype=interm_dtype)
        centred = _input_view(x3)
    else:
        shift = mean.astype(interm_dtype)
        centred = xp.empty(x3.shape, dtype=interm_dtype)
        _channel_op(xp, xp.subtract, x3, shift, centred)
    sums[1] = (channel_dot(xp, gy3, centred, acc)
               - (mean - shift) * sums[0])
    return sums, centred, shift


def input_gradient_coefficients(gamma, inv_std, global_sums, count, mean,
                                shift):
    """Per-channel ``(a, b, c)`` with ``gx = a * (gy + b * (x - shift) + c)``.

    ``global_sums`` are ``(sum gy, sum gy * (x - mean))`` over the global
    batch of ``count`` samples. ``a`` is factored out of all three terms so
    that :func:`input_gradient_into` needs four passes over the data and no
    temporary; ``b`` and ``c`` do not depend on ``gamma``, so a zero
    ``gamma`` gives a zero gradient exactly as in Chainer.
    """
    a = gamma * inv_std
    inv_count = 1.0 / (count + (count == 0))
    b = -inv_std * inv_std * global_sums[1] * inv_count
    c = -global_sums[0] * inv_count + b * (shift - mean)
    return a, b, c


def input_gradient_into(xp, centred, gy3, a, b, c, out_dtype):
    """Input gradient from the ``centred`` buffer of :func:`backward_sums`.

    Computes ``a * (gy + b * centred + c)`` in four passes with no other
    full-size temporary, over ``centred`` (or, when it is a read-only view
    of the input, into a new array).

    Returns:
        ndarray: ``gx`` seen as ``(A, C, B)``, in ``out_dtype``.
    """
    if isinstance(centred, cuda_kernels.ShiftedInput):
        if xp is numpy:
            return cpu_kernels.input_gradient_into(centred, gy3, a, b, c,
                                                   out_dtype)
        return cuda_kernels.input_gradient_into(centred, gy3, a, b, c,
                                                out_dtype)
    out = _output_buffer(xp, centred, accumulation_dtype(centred.dtype))
    _channel_op(xp, xp.multiply, centred, b, out)
    xp.add(out, gy3, out=out)
    _channel_op(xp, xp.add, out, c, out)
    _channel_op(xp, xp.multiply, out, a, out)
    return out.astype(out_dtype, copy=False)


def _prod(values):
    result = 1
    for v in values:
        result *= int(v)
    return result
