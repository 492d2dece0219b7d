"""The one-pass C loops of ``multinode_bn.cpu_kernels`` against float64 NumPy.

Each loop is checked on both of its loop orders (``B == 1``: channels
innermost; ``B > 1``: runs of one channel), in float32 and float64, against
the same quantity computed by plain float64 NumPy on the same values. The
link-level tests (``test_link_global_batch.py``) run with the loops and
with the NumPy fallback.
"""

import os

import numpy
import pytest

from multinode_bn import cpu_kernels
from multinode_bn import cuda_kernels
from multinode_bn import statistics

needs_loops = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason='multinode_bn._cpu_kernels was not built (no C compiler?)')

# (A, C, B): channels last / 2-D (in blocks of 64 channels and a tail),
# short runs (B <= 16, in blocks of 512 // B channels and a tail), a single
# value, long runs.
SHAPES = [(7, 5, 1), (33, 70, 1), (3, 130, 1), (3, 4, 13), (3, 50, 13),
          (5, 9, 4), (1, 1, 1), (2, 1, 1000), (4, 3, 49)]
DTYPES = [numpy.float32, numpy.float64]


def _data(shape, dtype, seed=0, loc=0.0, scale=1.0):
    rng = numpy.random.RandomState(seed)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    return x, gy


def _moments64(x3):
    x = x3.astype(numpy.float64)
    count = x.shape[0] * x.shape[2]
    mean = x.mean(axis=(0, 2))
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return count, mean, m2


def test_extension_is_built_where_the_install_expects_it():
    # `make test` sets this: there a C compiler is present, and a failed
    # build (which pip only warns about) must not go unnoticed.
    if os.environ.get('MULTINODE_BN_EXPECT_CPU_KERNELS') != '1':
        pytest.skip('MULTINODE_BN_EXPECT_CPU_KERNELS is not set')
    assert cpu_kernels.available()


@needs_loops
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_local_moments_match_float64(shape, dtype, loc):
    x3, _ = _data(shape, dtype, loc=loc)
    moments, centred, _ = cpu_kernels.local_moments(x3, dtype)
    count, mean, m2 = _moments64(x3)
    assert isinstance(centred, cuda_kernels.ShiftedInput)
    assert centred.x3 is x3
    numpy.testing.assert_array_equal(moments[:, 0], count)
    numpy.testing.assert_allclose(moments[:, 1], mean, rtol=1e-14,
                                  atol=1e-14)
    # float64 sums of float32 values: far inside float32's own rounding,
    # whatever the mean.
    numpy.testing.assert_allclose(moments[:, 2], m2, rtol=1e-10, atol=1e-12)


@needs_loops
@pytest.mark.parametrize('shape', [(40, 5, 1), (3, 4, 13)])
def test_moments_redone_around_the_mean_give_the_same_result(
        shape, monkeypatch):
    x3, _ = _data(shape, numpy.float32, loc=50.0)
    first, _, shift_first = cpu_kernels.local_moments(x3, numpy.float32)
    # The first shift: the mean of at least 16 leading values per channel.
    run = min(shape[2], cpu_kernels.SHIFT_SAMPLE)
    head = x3[:-(-16 // run), :, :run].astype(numpy.float64)
    assert head.shape[0] * head.shape[2] >= min(16, shape[0] * shape[2])
    numpy.testing.assert_allclose(shift_first, head.mean(axis=(0, 2)),
                                  rtol=1e-14)
    # A tolerance of zero makes every shift "too far": the sums are redone
    # once, around the mean of the first pass, which becomes the shift.
    monkeypatch.setattr(cpu_kernels, 'SHIFT_TOLERANCE', 0.0)
    redone, _, shift = cpu_kernels.local_moments(x3, numpy.float32)
    numpy.testing.assert_allclose(shift, first[:, 1], rtol=1e-12)
    assert (numpy.abs(shift - shift_first) > 1e-6).all()
    count, mean, m2 = _moments64(x3)
    numpy.testing.assert_allclose(redone[:, 1], mean, rtol=1e-14)
    numpy.testing.assert_allclose(redone[:, 2], m2, rtol=1e-10)


@needs_loops
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_normalize_matches_float64(shape, dtype, loc):
    x3, _ = _data(shape, dtype, seed=1, loc=loc, scale=2.0)
    channels = shape[1]
    rng = numpy.random.RandomState(2)
    gamma = rng.uniform(0.5, 2.0, channels)
    beta = rng.standard_normal(channels)
    _, mean, m2 = _moments64(x3)
    inv_std = 1.0 / numpy.sqrt(m2 / (shape[0] * shape[2]) + 2e-5)
    _, centred, shift = cpu_kernels.local_moments(x3, dtype)
    y3 = statistics.normalize_into(numpy, centred, shift, mean, inv_std,
                                   gamma, beta)
    expected = (gamma * inv_std)[None, :, None] * (
        x3.astype(numpy.float64) - mean[None, :, None]) + beta[None, :, None]
    assert y3.dtype == dtype and y3.shape == x3.shape
    # float32 outputs keep float32 accuracy of the *normalized* value even
    # at mean / std = 5000: the mean is subtracted before scaling.
    tol = 1e-5 if dtype == numpy.float32 else 1e-12
    numpy.testing.assert_allclose(y3, expected, rtol=tol, atol=tol)


@needs_loops
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('loc', [0.0, 1e4])
def test_backward_matches_float64(shape, dtype, loc):
    x3, gy3 = _data(shape, dtype, seed=3, loc=loc)
    channels = shape[1]
    count, mean, m2 = _moments64(x3)
    inv_std = 1.0 / numpy.sqrt(m2 / count + 2e-5)
    gamma = numpy.random.RandomState(4).uniform(0.5, 2.0, channels)
    sums, centred, shift = statistics.backward_sums(
        numpy, gy3, x3, mean, dtype, inv_std=inv_std)
    assert isinstance(centred, cuda_kernels.ShiftedInput)
    x64, gy64 = x3.astype(numpy.float64), gy3.astype(numpy.float64)
    dev = x64 - mean[None, :, None]
    g1 = gy64.sum(axis=(0, 2))
    g2 = (gy64 * dev).sum(axis=(0, 2))
    numpy.testing.assert_allclose(sums[0], g1, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(sums[1], g2, rtol=1e-10, atol=1e-10)

    a, b, c = statistics.input_gradient_coefficients(
        gamma, inv_std, sums, float(count), mean, shift)
    gx3 = statistics.input_gradient_into(numpy, centred, gy3, a, b, c, dtype)
    x_hat = dev * inv_std[None, :, None]
    expected = (gamma * inv_std)[None, :, None] * (
        gy64 - (x_hat * (g2 * inv_std)[None, :, None]
                + g1[None, :, None]) / count)
    assert gx3.dtype == dtype and gx3.shape == x3.shape
    tol = 2e-5 if dtype == numpy.float32 else 1e-11
    numpy.testing.assert_allclose(gx3, expected, rtol=tol, atol=tol)


def _random_triples(rng, n):
    t = numpy.empty((n, 3))
    t[:, 0] = rng.randint(0, 5, n)
    t[:, 1] = rng.standard_normal(n) * 10.0 ** rng.randint(-3, 6, n)
    t[:, 2] = rng.uniform(0, 10, n) * t[:, 0]
    return t


@needs_loops
def test_merge_is_bitwise_the_numpy_formula_and_commutative():
    rng = numpy.random.RandomState(5)
    a, b = _random_triples(rng, 500), _random_triples(rng, 500)
    # A header row (negative count in the first operand) is summed.
    a[:3, 0] = -1.0
    b[:3, 0] = -1.0
    expected = statistics.merge_moments(numpy, a, b)
    expected[:3] = a[:3] + b[:3]
    ab, ba = b.copy(), a.copy()
    cpu_kernels.merge_moments_into(a, ab)
    cpu_kernels.merge_moments_into(b, ba)
    numpy.testing.assert_array_equal(ab, expected)
    numpy.testing.assert_array_equal(ab[3:], ba[3:])
    # Merging with an empty side returns the other side exactly.
    empty = numpy.zeros((4, 3))
    c = _random_triples(rng, 4)
    c[:, 0] += 1
    out = c.copy()
    cpu_kernels.merge_moments_into(empty, out)
    numpy.testing.assert_array_equal(out, c)


@needs_loops
def test_buffers_of_the_wrong_size_raise_instead_of_overrunning():
    native = cpu_kernels._native
    x = numpy.zeros((2, 3, 4), numpy.float32)
    out = numpy.empty((3, 3))
    with pytest.raises(ValueError, match='x holds'):
        native.local_moments(4, 2, 3, 5, x, numpy.zeros(3), out, 4.0)
    with pytest.raises(ValueError, match='shift holds'):
        native.local_moments(4, 2, 3, 4, x, numpy.zeros(2), out, 4.0)
    with pytest.raises(ValueError, match='itemsize'):
        native.local_moments(2, 2, 3, 4, x, numpy.zeros(3), out, 4.0)
    with pytest.raises(ValueError, match='gx holds'):
        native.input_gradient(4, 2, 3, 4, x, x, numpy.zeros(12, numpy.float32),
                              numpy.empty(5, numpy.float32))
    with pytest.raises(ValueError, match='shape'):
        native.scale_shift(4, -2, 3, -4, x, numpy.zeros(9, numpy.float32), x)
    with pytest.raises((ValueError, BufferError, TypeError)):
        native.local_moments(4, 2, 3, 2, x[:, :, ::2], numpy.zeros(3),
                             out, 4.0)
    with pytest.raises(ValueError, match='b holds'):
        native.merge_moments(numpy.zeros(6), numpy.zeros(7))


def test_inputs_the_loops_do_not_serve_fall_back_to_numpy(monkeypatch):
    x = numpy.random.RandomState(6).standard_normal((4, 3, 5))
    half = x.astype(numpy.float16)
    strided = numpy.asfortranarray(x)
    assert not cpu_kernels.usable(half, numpy.float32)
    assert not cpu_kernels.usable(x.astype(numpy.float32), numpy.float64)
    assert not cpu_kernels.usable(strided, numpy.float64)
    assert not cpu_kernels.usable(x[:0], numpy.float64)
    for array, dtype in [(half, numpy.float32), (strided, numpy.float64)]:
        _, centred, _ = statistics.local_moments(numpy, array, dtype)
        assert isinstance(centred, numpy.ndarray)
    monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '0')
    assert not cpu_kernels.usable(x, numpy.float64)
    _, centred, _ = statistics.local_moments(numpy, x, numpy.float64)
    assert isinstance(centred, numpy.ndarray)
    if cpu_kernels.available():
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '1')
        assert cpu_kernels.usable(x, numpy.float64)


@needs_loops
@pytest.mark.parametrize('shape', [(7, 5, 1), (3, 4, 13)])
@pytest.mark.parametrize('dtype', DTYPES)
def test_loops_and_numpy_fallback_agree(shape, dtype, monkeypatch):
    x3, gy3 = _data(shape, dtype, seed=7, loc=3.0)
    gamma = numpy.linspace(0.5, 1.5, shape[1])
    beta = numpy.linspace(-1, 1, shape[1])
    results = []
    for flag in ('1', '0'):
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', flag)
        moments, centred, shift = statistics.local_moments(numpy, x3, dtype)
        count, mean = moments[0, 0], moments[:, 1]
        inv_std = 1.0 / numpy.sqrt(moments[:, 2] / count + 2e-5)
        y3 = statistics.normalize_into(numpy, centred, shift, mean, inv_std,
                                       gamma, beta)
        sums, centred, shift = statistics.backward_sums(
            numpy, gy3, x3, mean, dtype, inv_std=inv_std)
        a, b, c = statistics.input_gradient_coefficients(
            gamma, inv_std, sums, count, mean, shift)
        gx3 = statistics.input_gradient_into(numpy, centred, gy3, a, b, c,
                                             dtype)
        results.append((moments, y3, sums, gx3))
    tol = 1e-5 if dtype == numpy.float32 else 1e-12
    for loops, fallback in zip(*results):
        numpy.testing.assert_allclose(loops, fallback, rtol=tol, atol=tol)


@pytest.mark.parametrize('layout', ['nchw', 'nc'])
def test_broadcast_upstream_gradient_matches_global_bn(layout, cpu_path):
    # A gy that is a broadcast view (as F.sum's backward produces): the
    # loops need contiguous arrays, the NumPy code reads it as it is.
    import chainer
    import chainer.links as L
    from mpi4py import MPI
    import multinode_bn
    rng = numpy.random.RandomState(8)
    shape = (6, 3, 4, 5) if layout == 'nchw' else (7, 3)
    x = rng.standard_normal(shape).astype(numpy.float32) * 2.0 + 1.0
    row = rng.standard_normal(shape[1:]).astype(numpy.float32)
    gy = numpy.broadcast_to(row, shape)
    assert not gy.flags.c_contiguous
    results = []
    for link, dtype in [
            (multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF),
             numpy.float32),
            (L.BatchNormalization(3, dtype=numpy.float64), numpy.float64)]:
        xv = chainer.Variable(x.astype(dtype))
        y = link(xv)
        link.cleargrads()
        y.grad = gy.astype(dtype) if dtype == numpy.float64 else gy
        y.backward()
        results.append((xv.grad, link.gamma.grad, link.beta.grad))
    for ours, ref in zip(*results):
        numpy.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@needs_loops
def test_shapes_whose_byte_counts_overflow_are_refused():
    native = cpu_kernels._native
    out = numpy.empty((1, 3))
    with pytest.raises(ValueError):
        native.local_moments(8, 2 ** 61, 1, 1, b'', numpy.zeros(1), out, 4.0)
    with pytest.raises(ValueError):
        native.input_gradient(8, 1, 2 ** 62, 1, b'', b'', b'', bytearray())
    with pytest.raises(ValueError):
        native.scale_shift(4, 2 ** 40, 2 ** 40, 2 ** 40, b'', b'',
                           bytearray())
    # An empty batch of absurd length returns at once.
    gx = numpy.empty(0)
    native.input_gradient(8, 2 ** 59, 1, 0, gx, gx, numpy.zeros(4), gx)
    with pytest.raises(ValueError, match='empty'):
        native.local_moments(8, 2 ** 59, 1, 0, b'', numpy.zeros(1),
                             numpy.zeros(3), 4.0)


@needs_loops
@pytest.mark.parametrize('dtype', DTYPES)
def test_unrepresentative_head_keeps_the_dtype_accuracy(dtype):
    # The first values of every channel sit 1000 standard deviations from
    # the rest: the sums are redone around the mean, and m2 keeps the
    # accuracy of float64 sums.
    rng = numpy.random.RandomState(9)
    x3 = (500.0 + rng.standard_normal((1 << 16, 2, 1))).astype(dtype)
    x3[:16] = -499.0
    moments, _, shift = cpu_kernels.local_moments(x3, dtype)
    count, mean, m2 = _moments64(x3)
    numpy.testing.assert_allclose(shift, mean, rtol=1e-12)
    numpy.testing.assert_allclose(moments[:, 1], mean, rtol=1e-14)
    numpy.testing.assert_allclose(moments[:, 2], m2, rtol=1e-12)


WITHOUT_EXTENSION = r'''
import sys

class _NoExtension(object):
    def find_spec(self, name, path=None, target=None):
        if name == 'multinode_bn._cpu_kernels':
            raise ImportError('not built (simulated)')
        return None

sys.meta_path.insert(0, _NoExtension())

import numpy
import chainer
import chainer.links as L
from mpi4py import MPI
import multinode_bn
from multinode_bn import communication, cpu_kernels, statistics

assert not cpu_kernels.available() and not cpu_kernels.enabled()
rng = numpy.random.RandomState(0)
x = (rng.standard_normal((5, 3, 4, 4)) * 3 + 2).astype(numpy.float32)
gy = rng.standard_normal(x.shape).astype(numpy.float32)
results = []
for link, dtype in [(multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF),
                     numpy.float32),
                    (L.BatchNormalization(3, dtype=numpy.float64),
                     numpy.float64)]:
    xv = chainer.Variable(x.astype(dtype))
    y = link(xv)
    link.cleargrads()
    y.grad = gy.astype(dtype)
    y.backward()
    results.append((y.array, xv.grad, link.gamma.grad, link.avg_var))
for ours, ref in zip(*results):
    numpy.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

# The MPI reduction falls back to the NumPy merge.
a = numpy.abs(rng.standard_normal((4, 3))) + 1
b = numpy.abs(rng.standard_normal((4, 3))) + 1
expected = statistics.merge_moments(numpy, a, b)
communication._merge_moments_op(memoryview(a), memoryview(b), None)
numpy.testing.assert_array_equal(b, expected)
print('fallback ok')
'''


def test_package_works_without_the_extension():
    import subprocess
    import sys
    root = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
    environ = dict(os.environ)
    environ['PYTHONPATH'] = os.path.join(root, 'src') + os.pathsep + \
        environ.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-c', WITHOUT_EXTENSION],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=environ, cwd=root,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('fallback ok')


@pytest.mark.parametrize('dtype', DTYPES)
def test_non_finite_values_stay_non_finite_in_the_moments(dtype, cpu_path):
    # A NaN or inf must not come out as a finite variance, which would
    # hide the bad batch from the running statistics.
    x3 = numpy.random.RandomState(10).standard_normal((32, 3, 1)).astype(
        dtype)
    x3[20, 0, 0] = numpy.nan
    x3[20, 1, 0] = numpy.inf
    with numpy.errstate(invalid='ignore'):  # inf - inf, expected here
        moments, _, _ = statistics.local_moments(numpy, x3, dtype)
    assert not numpy.isfinite(moments[:2, 1]).any()
    assert numpy.isnan(moments[:2, 2]).all()
    assert numpy.isfinite(moments[2]).all()
