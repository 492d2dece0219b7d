"""The statistics backends against float64 NumPy, and the input layouts.

Each backend (the plain reference over NumPy, the C loops, and the
reference over CuPy on a GPU) computes the four operations of the
interface of :mod:`multinode_bn.statistics` on the same values as plain
float64 NumPy. The C loops are checked on both loop orders (``B == 1``:
channels innermost, in register blocks of 64 channels; ``B > 1``: runs of
one channel, short runs ``B <= 16`` in blocks of ``512 // B`` channels).
"""

import numpy
import pytest

from multinode_bn import cpu_kernels
from multinode_bn import statistics

needs_loops = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason='multinode_bn._cpu_kernels was not built (no C compiler?)')

# (A, C, B): channels last / 2-D (blocks of 64 channels and a tail; above
# 256 channels the element-wise loops read rows in order), short runs
# (B <= 16: blocks and a tail), a single value, long runs.
SHAPES = [(7, 5, 1), (33, 70, 1), (3, 130, 1), (5, 300, 1), (3, 4, 13),
          (3, 50, 13), (5, 9, 4), (1, 1, 1), (2, 1, 1000), (4, 3, 49)]
DTYPES = [numpy.float32, numpy.float64]
BACKENDS = ['reference', pytest.param('C loops', marks=needs_loops),
            pytest.param('cupy', marks=pytest.mark.gpu)]


def _cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception as e:  # no CuPy, or no device
        pytest.skip('needs CuPy and a GPU ({})'.format(e))


class Backend(object):
    """A statistics backend with host arrays in and out."""

    def __init__(self, name, dtype):
        self.xp = numpy
        if name == 'C loops':
            self.impl = cpu_kernels.CpuStatistics(dtype)
        elif name == 'cupy':
            self.xp = _cupy()
            self.impl = statistics.ReferenceStatistics(self.xp, dtype)
        else:
            self.impl = statistics.ReferenceStatistics(numpy, dtype)

    def __getattr__(self, op):
        method = getattr(self.impl, op)

        def call(*args):
            args = [self.xp.asarray(a) if isinstance(a, numpy.ndarray) else a
                    for a in args]
            out = method(*args)
            return out if self.xp is numpy else self.xp.asnumpy(out)
        return call


def _data(shape, dtype, seed=0, loc=0.0, scale=1.0):
    rng = numpy.random.RandomState(seed)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    return x, gy


def _moments64(x3):
    x = x3.astype(numpy.float64)
    mean = x.mean(axis=(0, 2))
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return x.shape[0] * x.shape[2], mean, m2


def _tolerance(dtype):
    return 2e-5 if dtype == numpy.float32 else 1e-11


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_local_moments_match_float64(backend, shape, dtype, loc):
    x3, _ = _data(shape, dtype, loc=loc)
    moments = Backend(backend, dtype).local_moments(x3)
    count, mean, m2 = _moments64(x3)
    assert moments.dtype == numpy.float64 and moments.shape == (shape[1], 3)
    numpy.testing.assert_array_equal(moments[:, 0], count)
    # Deviations formed in the input's dtype round to its precision
    # relative to the spread, never to the mean.
    numpy.testing.assert_allclose(moments[:, 1], mean, rtol=1e-14,
                                  atol=_tolerance(dtype) * 0.1)
    # The shifted sums keep m2 to the accumulation's accuracy whatever
    # the mean (1e4 standard deviations here).
    numpy.testing.assert_allclose(moments[:, 2], m2, rtol=_tolerance(dtype),
                                  atol=1e-9)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_normalize_matches_float64(backend, shape, dtype, loc):
    x3, _ = _data(shape, dtype, seed=1, loc=loc)
    count, mean, m2 = _moments64(x3)
    inv_std = 1.0 / numpy.sqrt(m2 / count + 2e-5)
    gamma = numpy.linspace(0.5, 1.5, shape[1])
    beta = numpy.linspace(-1.0, 1.0, shape[1])
    y3 = Backend(backend, dtype).normalize(x3, mean, gamma * inv_std, beta,
                                           dtype)
    expected = (x3.astype(numpy.float64) - mean[None, :, None]) * (
        gamma * inv_std)[None, :, None] + beta[None, :, None]
    assert y3.dtype == dtype and y3.shape == x3.shape
    # The mean is subtracted in the input's dtype: exact up to the input's
    # own rounding relative to the spread.
    tol = 2e-6 * (1 + loc) if dtype == numpy.float32 else 1e-10
    numpy.testing.assert_allclose(y3, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_backward_matches_float64(backend, shape, dtype, loc):
    x3, gy3 = _data(shape, dtype, seed=2, loc=loc)
    count, mean, m2 = _moments64(x3)
    inv_std = 1.0 / numpy.sqrt(m2 / count + 2e-5)
    gamma = numpy.linspace(0.5, 1.5, shape[1])
    stats = Backend(backend, dtype)
    sums = stats.backward_sums(x3, gy3, mean)
    x64, gy64 = x3.astype(numpy.float64), gy3.astype(numpy.float64)
    d = x64 - mean[None, :, None]
    expected = numpy.stack([gy64.sum(axis=(0, 2)),
                            (gy64 * d).sum(axis=(0, 2))])
    scale = numpy.abs(gy64).sum(axis=(0, 2)) * (1 + numpy.sqrt(m2 / count))
    # Products formed in the input's dtype: its rounding, relative to the
    # sum of their magnitudes.
    bound = (1e-6 if dtype == numpy.float32 else 1e-12) * scale + 1e-12
    assert numpy.all(numpy.abs(sums - expected) <= bound)
    p, q, r = statistics.gradient_coefficients(gamma, inv_std, expected,
                                               count)
    gx3 = stats.input_gradient(x3, gy3, mean, p, q, r, dtype)
    x_hat = d * inv_std[None, :, None]
    gx64 = (gamma * inv_std)[None, :, None] * (
        gy64 - (x_hat * (expected[1] * inv_std)[None, :, None]
                + expected[0][None, :, None]) / count)
    assert gx3.dtype == dtype
    tol = 2e-5 * (1 + loc) if dtype == numpy.float32 else 1e-9
    numpy.testing.assert_allclose(gx3, gx64, rtol=tol, atol=tol)


@pytest.mark.parametrize('backend', BACKENDS)
def test_float16_and_mixed_precision_compute_in_float32(backend):
    if backend == 'C loops':
        assert not cpu_kernels.serves(numpy.zeros(1, numpy.float16),
                                      numpy.float16)
        return
    x3, gy3 = _data((16, 3, 9), numpy.float16, loc=30.0, scale=20.0)
    stats = Backend(backend, numpy.float16)
    count, mean, m2 = _moments64(x3)
    moments = stats.local_moments(x3)
    # Squares of float16 deviations of ~60 overflow float16 arithmetic.
    numpy.testing.assert_allclose(moments[:, 2], m2, rtol=1e-3)
    inv_std = 1.0 / numpy.sqrt(m2 / count)
    y3 = stats.normalize(x3, mean, inv_std, numpy.zeros(3), numpy.float16)
    assert y3.dtype == numpy.float16
    numpy.testing.assert_allclose(
        y3, (x3.astype(numpy.float64) - mean[None, :, None])
        * inv_std[None, :, None], atol=5e-3)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', DTYPES)
def test_unrepresentative_head_keeps_the_dtype_accuracy(backend, dtype):
    # The first values of every channel sit 1000 standard deviations from
    # the rest: the sums are taken again around the mean, and m2 keeps the
    # accuracy of float64 sums.
    rng = numpy.random.RandomState(9)
    x3 = (500.0 + rng.standard_normal((1 << 16, 2, 1))).astype(dtype)
    x3[:16] = -499.0
    moments = Backend(backend, dtype).local_moments(x3)
    count, mean, m2 = _moments64(x3)
    single = dtype == numpy.float32
    numpy.testing.assert_allclose(moments[:, 1], mean,
                                  rtol=1e-10 if single else 1e-14)
    numpy.testing.assert_allclose(moments[:, 2], m2,
                                  rtol=1e-5 if single else 1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', DTYPES)
def test_non_finite_values_stay_non_finite_in_the_moments(backend, dtype):
    # A NaN or inf must not come out as a finite variance, which would
    # hide the bad batch from the running statistics.
    x3 = numpy.random.RandomState(10).standard_normal((32, 3, 1)).astype(
        dtype)
    x3[20, 0, 0] = numpy.nan
    x3[20, 1, 0] = numpy.inf
    with numpy.errstate(invalid='ignore'):  # inf - inf, expected here
        moments = Backend(backend, dtype).local_moments(x3)
    assert not numpy.isfinite(moments[:2, 1]).any()
    assert numpy.isnan(moments[:2, 2]).all()
    assert numpy.isfinite(moments[2]).all()


# --------------------------------------------------------------------------
# Moments across processes: shifted sums and the merge


def _split_moments(parts, backend='reference'):
    return [statistics.ReferenceStatistics(numpy, p.dtype).local_moments(p)
            for p in parts]


def test_shifted_sums_give_the_moments_of_the_concatenation():
    rng = numpy.random.RandomState(3)
    parts = [rng.standard_normal((n, 4, 3)) * 2 + 5 for n in (3, 1, 7)]
    moments = _split_moments(parts)
    shift = numpy.array([0.0, 5.0, -3.0, 1e3])
    total = sum(statistics.moments_to_shifted_sums(numpy, m, shift)
                for m in moments)
    merged = statistics.shifted_sums_to_moments(numpy, total, shift)
    count, mean, m2 = _moments64(numpy.concatenate(parts))
    numpy.testing.assert_array_equal(merged[:, 0], count)
    numpy.testing.assert_allclose(merged[:, 1], mean, rtol=1e-13)
    numpy.testing.assert_allclose(merged[:, 2], m2, rtol=1e-9)
    # The exact pairwise merge gives the same.
    pairwise = statistics.merge_moments(
        numpy, statistics.merge_moments(numpy, moments[0], moments[1]),
        moments[2])
    numpy.testing.assert_allclose(pairwise, merged, rtol=1e-9)


def test_shifted_sums_keep_large_mean_variance_with_a_zero_shift():
    # The worst case of the exchange: the first call of a link (shift 0) on
    # float32 inputs 1e4 + N(0, 1), 2 and 3 processes: the variance stays
    # well within 1e-4.
    rng = numpy.random.RandomState(4)
    for ranks in (2, 3):
        parts = [(1e4 + rng.standard_normal((64, 8, 49))).astype(
            numpy.float32) for _ in range(ranks)]
        stats = statistics.ReferenceStatistics(numpy, numpy.float32)
        zero = numpy.zeros(8)
        total = sum(statistics.moments_to_shifted_sums(
            numpy, stats.local_moments(p), zero) for p in parts)
        merged = statistics.shifted_sums_to_moments(numpy, total, zero)
        count, mean, m2 = _moments64(numpy.concatenate(parts))
        relative = numpy.abs(merged[:, 2] / m2 - 1).max()
        assert relative < 1e-6, relative


def test_empty_parts_add_nothing_to_the_sums():
    x = numpy.random.RandomState(5).standard_normal((6, 2, 1))
    moments = _split_moments([x])[0]
    shift = numpy.array([0.5, -0.5])
    empty = statistics.moments_to_shifted_sums(numpy, numpy.zeros((2, 3)),
                                               shift)
    assert not empty.any()
    merged = statistics.shifted_sums_to_moments(
        numpy, statistics.moments_to_shifted_sums(numpy, moments, shift)
        + empty, shift)
    numpy.testing.assert_allclose(merged, moments, rtol=1e-13)
    nothing = statistics.shifted_sums_to_moments(numpy, empty, shift)
    numpy.testing.assert_array_equal(nothing[:, 0], 0)
    numpy.testing.assert_array_equal(nothing[:, 2], 0)


def test_merge_is_commutative_to_the_last_bit():
    rng = numpy.random.RandomState(11)
    a = numpy.abs(rng.standard_normal((50, 3))) * [10, 1e4, 1]
    b = numpy.abs(rng.standard_normal((50, 3))) * [10, 1e4, 1]
    a[:, 0] = numpy.round(a[:, 0])
    b[:, 0] = numpy.round(b[:, 0])
    numpy.testing.assert_array_equal(statistics.merge_moments(numpy, a, b),
                                     statistics.merge_moments(numpy, b, a))


# --------------------------------------------------------------------------
# Layouts: every memory order real layers produce


def _nhwc_view(shape, rng):
    n, c, h, w = shape
    return rng.standard_normal((n, h, w, c)).transpose(0, 3, 1, 2)


LAYOUTS = {
    # name: (array maker, reduced axes, a free view expected)
    'nchw': (lambda rng: rng.standard_normal((2, 3, 4, 5)), (0, 2, 3), True),
    'nchw view of nhwc': (lambda rng: _nhwc_view((2, 3, 4, 5), rng),
                          (0, 2, 3), True),
    'channels last axis': (lambda rng: rng.standard_normal((2, 4, 5, 3)),
                           (0, 1, 2), True),
    'linear (N, C)': (lambda rng: rng.standard_normal((6, 3)), (0,), True),
    'fortran order': (lambda rng: numpy.asfortranarray(
        rng.standard_normal((2, 3, 4, 5))), (0, 2, 3), True),
    'size-1 axes': (lambda rng: _nhwc_view((1, 3, 1, 5), rng), (0, 2, 3),
                    True),
    'two kept axes': (lambda rng: rng.standard_normal((4, 3, 2, 5)), (0, 3),
                      True),
    'negative strides': (lambda rng: rng.standard_normal((2, 3, 4, 5))[
        ::-1, :, ::-1], (0, 2, 3), False),
    'sliced (padded rows)': (lambda rng: rng.standard_normal((2, 3, 6, 5))[
        :, :, 1:-1], (0, 2, 3), False),
    'kept axes together, transposed': (lambda rng: rng.standard_normal(
        (4, 2, 3, 5)).transpose(1, 0, 3, 2), (1, 2), True),
    'kept axes apart in memory': (lambda rng: rng.standard_normal(
        (3, 4, 5)), (1,), False),
    'broadcast': (lambda rng: numpy.broadcast_to(
        rng.standard_normal((1, 3, 1, 5)), (2, 3, 4, 5)), (0, 2, 3), False),
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_layout_view_is_free_where_memory_allows_and_restores_the_order(
        name):
    make, axis, free = LAYOUTS[name]
    x = make(numpy.random.RandomState(12))
    layout = statistics.Layout(x, axis)
    x3 = layout.view(x)
    assert x3.flags.c_contiguous
    assert numpy.shares_memory(x3, x) == free
    keep = [i for i in range(x.ndim) if i not in axis]
    # Channel c of the view is the kept axes' flat index c.
    per_channel = numpy.moveaxis(x, keep, list(range(len(keep)))).reshape(
        x3.shape[1], -1)
    numpy.testing.assert_array_equal(
        numpy.sort(numpy.moveaxis(x3, 1, 0).reshape(x3.shape[1], -1), 1),
        numpy.sort(per_channel, 1))
    restored = layout.restore(x3.copy())
    numpy.testing.assert_array_equal(restored, x)
    if free:
        # An output built in the view's order has the input's memory order.
        assert restored.strides == x.strides
