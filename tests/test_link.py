"""The link and the functional API against Chainer on the concatenated global
batch: batch splits, dtypes, axes, memory layouts, running statistics, the
drop-in details (exception types, warnings, copies, names), second-order
gradients, fuzzed inputs, and the GPU (skipped without one)."""

import copy
import types
import warnings

import numpy
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import chainer
import chainer.functions as F
import chainer.links as L
import chainermn
from chainer import gradient_check
from chainer import memory_layouts
from chainer.utils import type_check
from mpi4py import MPI

import multinode_bn
from multinode_bn.functions import batch_normalization as fbn
from multinode_bn.functions import multi_node_batch_normalization
from conftest import (CountingComm, Result, assert_close,
                      assert_matches_reference, make_batches, on_every_rank,
                      reference, run_link, split_sizes)

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])
parallel = pytest.mark.parallel(nprocs=[2, 3])

# Tolerances against the float64 reference, as rtol and atol.
TOL = {numpy.float64: 1e-9, numpy.float32: 2e-4, numpy.float16: 3e-2}


# --- The global batch, split every way ---------------------------------------

SHAPES = {'2d': (5,), '4d': (3, 4, 5)}


def _check(sizes, tail, dtype, seed=0, rtol=None, atol=None, steps=1,
           link_kwargs=None, loc=0.0, scale=1.0, param_dtype=None):
    comm = MPI.COMM_WORLD
    xs, gys = make_batches(seed, sizes, tail, dtype, loc=loc, scale=scale)
    channels = tail[0]
    kwargs = dict(link_kwargs or {})
    ref = reference(xs, gys, channels, steps=steps, **kwargs)
    link = multinode_bn.MultiNodeBatchNormalization(
        channels, comm, dtype=param_dtype or dtype, **kwargs)
    offset, n = split_sizes(sizes, comm.rank)
    for _ in range(steps):
        ours = run_link(link, xs[comm.rank], gys[comm.rank])
    assert_matches_reference(ours, ref, offset, n, comm.size,
                             rtol or TOL[dtype], atol or TOL[dtype])
    assert ours.y.dtype == dtype and ours.gx.dtype == dtype
    return link, ours


@parallel
@pytest.mark.parametrize('tail', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_equal_batches_match_global_bn(tail, dtype, cpu_path):
    size = MPI.COMM_WORLD.size
    _check([4] * size, tail, dtype, steps=2)


@parallel
@pytest.mark.parametrize('tail', SHAPES.values(), ids=SHAPES.keys())
def test_uneven_batches_match_global_bn(tail, cpu_path):
    sizes = [1, 6, 3][:MPI.COMM_WORLD.size]
    _check(sizes, tail, numpy.float64, seed=1, steps=2)
    _check(sizes, tail, numpy.float32, seed=2)


@parallel
@pytest.mark.parametrize('tail', SHAPES.values(), ids=SHAPES.keys())
def test_zero_size_batch_on_one_rank_matches_global_bn(tail, cpu_path):
    size = MPI.COMM_WORLD.size
    sizes = [0] + [3] * (size - 1)
    link, ours = _check(sizes, tail, numpy.float64, seed=3)
    if MPI.COMM_WORLD.rank == 0:
        assert ours.y.shape == (0,) + tail
        assert ours.gx.shape == (0,) + tail


@parallel
def test_all_but_one_rank_empty_matches_global_bn():
    size = MPI.COMM_WORLD.size
    sizes = [0] * (size - 1) + [5]
    _check(sizes, (3, 2, 2), numpy.float64, seed=4)


@parallel
def test_large_mean_variance_within_one_percent_float32(cpu_path):
    """float32 ``1e4 + N(0, 1)``: E[x^2] - E[x]^2 would lose every digit."""
    comm = MPI.COMM_WORLD
    sizes = [8, 3, 5][:comm.size]
    xs, gys = make_batches(5, sizes, (4, 6, 6), numpy.float32, loc=1e4)
    x64 = numpy.concatenate(xs).astype(numpy.float64)
    m = x64.shape[0] * 36
    true_var = x64.var(axis=(0, 2, 3)) * m / (m - 1)
    link = multinode_bn.MultiNodeBatchNormalization(
        4, comm, decay=0.0)
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    rel = numpy.abs(ours.avg_var / true_var - 1).max()
    assert rel < 0.01, rel
    # and in fact far better than the bound
    assert rel < 1e-4, rel
    ref = reference(xs, gys, 4)
    offset, n = split_sizes(sizes, comm.rank)
    assert_close(ours.y, ref.y[offset:offset + n], 1e-3, 1e-3, 'y')
    assert_close(ours.gx, ref.gx[offset:offset + n], 1e-3, 1e-3, 'gx')


@parallel
def test_running_variance_unbiased_with_global_count():
    comm = MPI.COMM_WORLD
    sizes = [2] * comm.size
    xs, gys = make_batches(6, sizes, (3,), numpy.float64)
    link = multinode_bn.MultiNodeBatchNormalization(
        3, comm, decay=0.0, dtype=numpy.float64)
    run_link(link, xs[comm.rank], gys[comm.rank])
    x = numpy.concatenate(xs)
    assert_close(link.avg_var, x.var(axis=0, ddof=1), 1e-12, 1e-12,
                 'avg_var')
    assert_close(link.avg_mean, x.mean(axis=0), 1e-12, 1e-12, 'avg_mean')


@parallel
@pytest.mark.parametrize('tail', SHAPES.values(), ids=SHAPES.keys())
def test_float16_input_matches_global_bn(tail):
    sizes = [3, 2, 4][:MPI.COMM_WORLD.size]
    link, _ = _check(sizes, tail, numpy.float16, seed=7)
    assert link.avg_mean.dtype == numpy.float16


@parallel
def test_mixed16_keeps_float32_statistics_and_matches_global_bn():
    sizes = [3, 2, 4][:MPI.COMM_WORLD.size]
    link, ours = _check(sizes, (4, 3, 3), numpy.float16, seed=8,
                        param_dtype=chainer.mixed16)
    assert link.avg_mean.dtype == numpy.float32
    assert link.gamma.dtype == numpy.float32
    assert ours.ggamma.dtype == numpy.float32


@parallel
@pytest.mark.parametrize('use_gamma,use_beta',
                         [(False, True), (True, False), (False, False)])
def test_without_gamma_or_beta_matches_global_bn(use_gamma, use_beta):
    sizes = [2, 5, 1][:MPI.COMM_WORLD.size]
    link, ours = _check(sizes, (3, 2, 2), numpy.float64, seed=9,
                        link_kwargs=dict(use_gamma=use_gamma,
                                         use_beta=use_beta))
    assert (link.gamma is not None) == use_gamma
    assert (link.beta is not None) == use_beta


@parallel
def test_finetune_accumulates_plain_average_of_global_statistics():
    comm = MPI.COMM_WORLD
    sizes = [3, 1, 2][:comm.size]
    link = multinode_bn.MultiNodeBatchNormalization(
        4, comm, dtype=numpy.float64)
    means, variances = [], []
    for step in range(3):
        xs, gys = make_batches(10 + step, sizes, (4,), numpy.float64,
                               loc=step, scale=step + 1)
        run_link(link, xs[comm.rank], gys[comm.rank], finetune=True)
        x = numpy.concatenate(xs)
        means.append(x.mean(axis=0))
        variances.append(x.var(axis=0, ddof=1))
    assert link.N == 3
    assert_close(link.avg_mean, numpy.mean(means, axis=0), 1e-12, 1e-12,
                 'avg_mean')
    assert_close(link.avg_var, numpy.mean(variances, axis=0), 1e-12, 1e-12,
                 'avg_var')
    link.start_finetuning()
    assert link.N == 0


@parallel
def test_float32_link_matches_float32_chainer_link():
    """The same dtype as the user's L.BatchNormalization, not float64."""
    comm = MPI.COMM_WORLD
    sizes = [4, 2, 3][:comm.size]
    xs, gys = make_batches(11, sizes, (3, 4, 4), numpy.float32)
    ref = reference(xs, gys, 3, dtype=numpy.float32)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    offset, n = split_sizes(sizes, comm.rank)
    assert_matches_reference(ours, ref, offset, n, comm.size, 1e-4, 1e-4)


@pytest.mark.parallel(nprocs=[2])
def test_one_sample_per_rank_gives_no_warning_and_global_statistics():
    comm = MPI.COMM_WORLD
    xs, gys = make_batches(3, [1] * comm.size, (3,), numpy.float64)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                    dtype=numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        ours = run_link(link, xs[comm.rank], gys[comm.rank])
    ref = reference(xs, gys, 3)
    assert_matches_reference(ours, ref, comm.rank, 1, comm.size, 1e-9, 1e-9)


@parallel
def test_replicas_keep_bit_identical_statistics_on_different_data(
        cpu_path):
    # Every process trains on its own data, whose mean jumps between steps
    # (which makes the exchange redo its sums around the new mean): the
    # running statistics must stay identical to the last bit everywhere.
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(5, comm)
    rng = numpy.random.RandomState(100 + comm.rank)
    for step, loc in enumerate([0.0, 3.0, 1e5, -7.0]):
        n = 1 + (step + comm.rank) % 4
        x = (loc + rng.standard_normal((n, 5, 3, 3)) * (1 + comm.rank)
             ).astype(numpy.float32)
        run_link(link, x, rng.standard_normal(x.shape).astype(
            numpy.float32))
        for name in ('avg_mean', 'avg_var'):
            mine = getattr(link, name).tobytes()
            everyone = comm.allgather(mine)
            assert all(b == everyone[0] for b in everyone), (step, name)


@everywhere
def test_all_empty_global_batch_leaves_statistics_untouched(cpu_path):
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(
        3, comm, initial_avg_mean=numpy.full(3, 2.5, numpy.float32),
        initial_avg_var=numpy.full(3, 4.0, numpy.float32))
    x = numpy.zeros((0, 3, 2, 2), numpy.float32)
    with pytest.warns(UserWarning, match='global batch of 0'):
        ours = run_link(link, x, x.copy())
    assert ours.y.shape == x.shape and ours.gx.shape == x.shape
    numpy.testing.assert_array_equal(link.avg_mean, 2.5)
    numpy.testing.assert_array_equal(link.avg_var, 4.0)
    # And the link goes on normally.
    rng = numpy.random.RandomState(comm.rank)
    run_link(link, rng.standard_normal((2, 3, 2, 2)).astype(numpy.float32),
             numpy.ones((2, 3, 2, 2), numpy.float32))
    assert numpy.isfinite(link.avg_mean).all()
    assert not (link.avg_mean == 2.5).any()


# --- Axes and lazy size, as L.BatchNormalization takes them ------------------

# (per-sample shape, axis, channel size as L.BN wants it)
AXES = {
    'default-4d': ((3, 4, 5), None, 3),
    'axis0-2d': ((6,), (0,), 6),
    'axis023-4d': ((3, 4, 5), (0, 2, 3), 3),
    'channels-last': ((4, 5, 3), (0, 1, 2), 3),
    'keep-c-and-w': ((3, 4, 5), (0, 2), (3, 5)),
    'keep-hw': ((3, 4, 5), (0, 1), (4, 5)),
}


@parallel
@pytest.mark.parametrize('case', AXES.values(), ids=AXES.keys())
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_axis_choices_match_global_bn_equal_and_uneven(case, dtype):
    tail, axis, size = case
    comm = MPI.COMM_WORLD
    for seed, sizes in enumerate(([3] * comm.size, [1, 4, 2][:comm.size])):
        xs, gys = make_batches(seed, sizes, tail, dtype)
        ref = reference(xs, gys, size, axis=axis, steps=2)
        link = multinode_bn.MultiNodeBatchNormalization(
            size, comm, dtype=dtype, axis=axis)
        for _ in range(2):
            ours = run_link(link, xs[comm.rank], gys[comm.rank])
        offset, n = split_sizes(sizes, comm.rank)
        assert_matches_reference(ours, ref, offset, n, comm.size,
                                 TOL[dtype], TOL[dtype])


@parallel
@pytest.mark.parametrize('case', [AXES['channels-last'], AXES['keep-c-and-w'],
                                  AXES['axis023-4d']],
                         ids=['channels-last', 'keep-c-and-w', 'axis023'])
def test_lazy_size_creates_parameters_from_first_input(case):
    tail, axis, size = case
    comm = MPI.COMM_WORLD
    sizes = [2, 3, 1][:comm.size]
    xs, gys = make_batches(7, sizes, tail, numpy.float64)
    link = multinode_bn.MultiNodeBatchNormalization(
        None, comm, dtype=numpy.float64, axis=axis)
    assert link.avg_mean is None
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    expected_shape = size if isinstance(size, tuple) else (size,)
    assert link.avg_mean.shape == expected_shape
    assert link.gamma.shape == expected_shape
    ref = reference(xs, gys, None, axis=axis)
    offset, n = split_sizes(sizes, comm.rank)
    assert_matches_reference(ours, ref, offset, n, comm.size, 1e-9, 1e-9)


def test_size_or_axis_required_like_chainer():
    with pytest.raises(RuntimeError, match='size or axis'):
        multinode_bn.MultiNodeBatchNormalization(None, MPI.COMM_SELF)


# --- Memory layouts: every one real layers produce ---------------------------

LAYOUT_CHANNELS = 4


def _conv(x):
    conv = L.Convolution2D(3, LAYOUT_CHANNELS, 3, pad=1, initialW=_weights(
        (LAYOUT_CHANNELS, 3, 3, 3)), nobias=True)
    return conv(x).array


def _deconv(x):
    deconv = L.Deconvolution2D(3, LAYOUT_CHANNELS, 3, initialW=_weights(
        (3, LAYOUT_CHANNELS, 3, 3)), nobias=True)
    return deconv(x).array


def _linear(x):
    linear = L.Linear(3 * 5 * 4, LAYOUT_CHANNELS, initialW=_weights(
        (LAYOUT_CHANNELS, 3 * 5 * 4)), nobias=True)
    return linear(x).array


def _weights(shape):
    return numpy.random.RandomState(1).standard_normal(shape).astype(
        numpy.float32) * 0.3


# name: (layer output from an (n, 3, 5, 4) float32 batch, reduced axes)
LAYOUTS = {
    'conv output (NCHW view of NHWC)': (_conv, None),
    'deconv output': (_deconv, None),
    'contiguous NCHW': (lambda x: numpy.ascontiguousarray(_conv(x)), None),
    'linear output (N, C)': (_linear, None),
    'channels last, axis (0, 1, 2)': (
        lambda x: numpy.ascontiguousarray(_conv(x).transpose(0, 2, 3, 1)),
        (0, 1, 2)),
    'negative strides': (lambda x: _conv(x)[:, :, ::-1, ::-1], None),
    'sliced (padded)': (lambda x: _conv(x)[:, :, 1:-1], None),
}


def _layer_batches(sizes, layer, dtype, seed=0):
    rng = numpy.random.RandomState(seed)
    xs, gys = [], []
    for n in sizes:
        x = layer(2.0 + rng.standard_normal((n, 3, 5, 4)).astype(
            numpy.float32))
        if dtype != numpy.float32:
            # Same memory order, other dtype.
            x = x.astype(dtype, order='K')
        xs.append(x)
        gys.append(rng.standard_normal(x.shape).astype(dtype))
    return xs, gys


def _memory_order(a):
    return [i for i in sorted(range(a.ndim), key=lambda i: -abs(a.strides[i]))
            if a.shape[i] > 1]


@everywhere
@pytest.mark.parametrize('name', sorted(LAYOUTS))
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_real_layer_layouts_match_global_bn_and_keep_memory_order(
        name, dtype, cpu_path):
    comm = MPI.COMM_WORLD
    layer, axis = LAYOUTS[name]
    sizes = [2, 3, 1][:comm.size]
    xs, gys = _layer_batches(sizes, layer, dtype)
    size = LAYOUT_CHANNELS if axis is None else None
    kwargs = {} if axis is None else {'axis': axis}
    ref = reference(xs, gys, size, **kwargs)
    link = multinode_bn.MultiNodeBatchNormalization(size, comm, dtype=dtype,
                                                    **kwargs)
    offset, n = split_sizes(sizes, comm.rank)
    x = xs[comm.rank]
    ours = run_link(link, x, gys[comm.rank])
    tol = 2e-4 if dtype == numpy.float32 else 1e-9
    assert_matches_reference(ours, ref, offset, n, comm.size, tol, tol)
    # The next layer reads y (and the previous one gx) in the order it
    # would have read x.
    assert _memory_order(ours.y) == _memory_order(
        x if x.strides[-1] > 0 else numpy.copy(x, order='K'))
    assert _memory_order(ours.gx) == _memory_order(ours.y)


@everywhere
def test_upstream_gradient_in_another_layout_matches_global_bn(cpu_path):
    comm = MPI.COMM_WORLD
    sizes = [3, 2, 2][:comm.size]
    xs, gys = _layer_batches(sizes, _conv, numpy.float32, seed=5)
    # x in NHWC memory, gy in NCHW memory (as from a convolution's
    # backward): one copy of gy, the same result.
    gys = [numpy.ascontiguousarray(g) for g in gys]
    ref = reference(xs, gys, LAYOUT_CHANNELS)
    link = multinode_bn.MultiNodeBatchNormalization(LAYOUT_CHANNELS, comm)
    offset, n = split_sizes(sizes, comm.rank)
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    assert_matches_reference(ours, ref, offset, n, comm.size, 2e-4, 2e-4)


CHANNEL_LAST = memory_layouts.CUDNN_CHANNEL_LAST_X


def run_channel_last(link, x, gy):
    """Forward and backward of ``link`` on ``x`` handed over channels last."""
    xv = chainer.Variable(x)
    y = link(xv.as_layout(CHANNEL_LAST))
    assert y.layout == CHANNEL_LAST and y.shape == x.shape
    y = y.as_layout(None)
    link.cleargrads()
    F.sum(y * gy).backward()
    return Result(y.array, xv.grad, link.gamma.grad, link.beta.grad,
                  numpy.array(link.avg_mean), numpy.array(link.avg_var))


@everywhere
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_channel_last_input_matches_global_bn_on_logical_shape(dtype):
    comm = MPI.COMM_WORLD
    sizes = [3, 1, 2][:comm.size]
    xs, gys = make_batches(0, sizes, (3, 4, 5), dtype)
    ref = reference(xs, gys, 3)
    offset, n = split_sizes(sizes, comm.rank)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm, dtype=dtype)
    ours = run_channel_last(link, xs[comm.rank], gys[comm.rank])
    tol = 1e-9 if dtype == numpy.float64 else 2e-4
    assert_matches_reference(ours, ref, offset, n, comm.size, tol, tol)


@everywhere
def test_channel_last_lazy_link_takes_channels_from_the_logical_shape():
    comm = MPI.COMM_WORLD
    x = numpy.random.RandomState(comm.rank).randn(2, 3, 4, 5).astype(
        numpy.float32)
    link = multinode_bn.MultiNodeBatchNormalization(None, comm,
                                                    axis=(0, 2, 3))
    link(chainer.Variable(x).as_layout(CHANNEL_LAST))
    assert link.avg_mean.shape == (3,)


@everywhere
def test_channel_last_evaluation_matches_chainer_link_on_standard_layout():
    # Chainer 7.8.1's own link cannot evaluate a channels-last input
    # (fixed_batch_normalization has no layout support); ours can.
    comm = MPI.COMM_WORLD
    x = numpy.random.RandomState(1).randn(2, 3, 4, 5).astype(numpy.float32)
    ours = multinode_bn.MultiNodeBatchNormalization(
        3, comm, initial_avg_mean=0.5, initial_avg_var=2.0)
    theirs = L.BatchNormalization(3, initial_avg_mean=0.5,
                                  initial_avg_var=2.0)
    xv = chainer.Variable(x)
    with chainer.using_config('train', False):
        y = ours(xv.as_layout(CHANNEL_LAST))
        expected = theirs(x).array
    assert y.layout == CHANNEL_LAST
    numpy.testing.assert_array_equal(y.as_layout(None).array, expected)
    F.sum(y.as_layout(None)).backward()
    assert xv.grad.shape == x.shape


# --- Drop-in: what code written for L.BatchNormalization relies on -----------

def test_initial_running_statistics_and_parameters_like_chainer():
    kwargs = dict(initial_gamma=2.0, initial_beta=-1.0,
                  initial_avg_mean=0.25, initial_avg_var=3.0)
    ours = multinode_bn.MultiNodeBatchNormalization(4, MPI.COMM_SELF,
                                                    **kwargs)
    theirs = L.BatchNormalization(4, **kwargs)
    for name in ('avg_mean', 'avg_var'):
        numpy.testing.assert_array_equal(getattr(ours, name),
                                         getattr(theirs, name))
    numpy.testing.assert_array_equal(ours.gamma.array, theirs.gamma.array)
    numpy.testing.assert_array_equal(ours.beta.array, theirs.beta.array)
    x = numpy.random.RandomState(0).randn(5, 4).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(ours(x).array, theirs(x).array)


def test_fresh_link_evaluates_like_chainer_before_training():
    """avg_var starts at 1 (ChainerMN starts at 0 and divides by sqrt(eps))."""
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    ref = L.BatchNormalization(3)
    assert (link.avg_var == 1).all() and (link.avg_mean == 0).all()
    x = numpy.random.RandomState(2).randn(4, 3).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(link(x).array, ref(x).array)


def test_persistents_registered_under_chainer_names():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    assert link._persistent == L.BatchNormalization(3)._persistent
    assert {n for n, _ in link.namedparams()} == {'/gamma', '/beta'}
    assert link.avg_mean.dtype == numpy.float32
    half = multinode_bn.MultiNodeBatchNormalization(
        3, MPI.COMM_SELF, dtype=chainer.mixed16)
    assert half.avg_mean.dtype == numpy.float32
    assert half.gamma.dtype == numpy.float32


def test_recomputing_leaves_statistics_and_count_unchanged():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    x = numpy.random.RandomState(1).randn(4, 3).astype(numpy.float32) + 5
    with chainer.using_config('in_recomputing', True):
        link(x, finetune=True)
        link(x)
    assert link.N == 0
    assert (link.avg_mean == 0).all() and (link.avg_var == 1).all()
    link(x, finetune=True)
    assert link.N == 1 and (link.avg_mean != 0).all()


def test_chainerx_path_falls_back_to_the_synchronized_implementation():
    """Chainer's ChainerX kernel would normalize locally: we never use it."""
    selector = fbn.MultiNodeBNImplSelector(MPI.COMM_SELF, 'mpi')
    node = fbn.MultiNodeBatchNormalizationFunction(selector)
    assert node.forward_chainerx(None) is chainer.Fallback


def test_importable_names():
    from multinode_bn.links import MultiNodeBatchNormalization
    from multinode_bn.functions.batch_normalization import (
        MultiNodeBNImplSelector, get_communication_backend)
    assert MultiNodeBatchNormalization is multinode_bn.MultiNodeBatchNormalization
    assert callable(MultiNodeBNImplSelector)
    assert callable(get_communication_backend)
    assert issubclass(MultiNodeBatchNormalization, L.BatchNormalization)


def test_constructor_signature_matches_chainermn():
    import inspect
    ours = inspect.signature(multinode_bn.MultiNodeBatchNormalization)
    theirs = inspect.signature(chainermn.links.MultiNodeBatchNormalization)
    positional = [p for p in ours.parameters.values()
                  if p.kind is not p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in theirs.parameters.values()]


@everywhere
def test_channel_mismatch_raises_chainer_invalid_type_on_every_rank():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    channels = 4 if comm.rank == 0 else 3  # only rank 0 is wrong
    x = numpy.zeros((2, channels), numpy.float32)
    with pytest.raises(type_check.InvalidType) as info:
        link(x)
    assert isinstance(info.value, multinode_bn.InconsistentInputError)
    assert 'rank(s) 0' in str(info.value)
    assert '(2, 4)' in str(info.value)
    # Chainer's own link raises the same type for the same input.
    with pytest.raises(type_check.InvalidType):
        L.BatchNormalization(3)(numpy.zeros((2, 4), numpy.float32))


@parallel
def test_channel_mismatch_after_first_call_also_raises_invalid_type():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link(numpy.ones((2, 3), numpy.float32))  # signature checked once
    channels = 4 if comm.rank == comm.size - 1 else 3
    with pytest.raises(type_check.InvalidType, match='rank\\(s\\) {}'.format(
            comm.size - 1)):
        link(numpy.ones((2, channels), numpy.float32))


@parallel
def test_disagreement_that_chainer_cannot_see_stays_plain_inconsistent():
    comm = MPI.COMM_WORLD
    # Each rank's input is valid on its own; they differ in dtype.
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    dtype = numpy.float64 if comm.rank == 0 else numpy.float32
    with pytest.raises(multinode_bn.InconsistentInputError) as info:
        link(numpy.ones((2, 3), dtype))
    assert not isinstance(info.value, type_check.InvalidType)


def zero_tensor_warnings(record):
    return [str(w.message) for w in record
            if 'zero' in str(w.message)]


@everywhere
def test_one_element_per_rank_along_non_batch_axis_warns_only_if_global():
    comm = MPI.COMM_WORLD
    xs = [numpy.random.RandomState(r).randn(1, 3, 1).astype(numpy.float64)
          for r in range(comm.size)]
    link = multinode_bn.MultiNodeBatchNormalization(
        (1, 3), comm, axis=2, dtype=numpy.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        y = link(xs[comm.rank])
    got = zero_tensor_warnings(record)
    # The reference: Chainer's link over the elements of every rank.
    ref = L.BatchNormalization((1, 3), axis=2, dtype=numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = ref(numpy.concatenate(xs, axis=2)).array
    with on_every_rank():
        assert numpy.allclose(
            y.array, expected[:, :, comm.rank:comm.rank + 1], rtol=1e-9,
            atol=1e-9)
        if comm.size == 1:
            assert len(got) == 1 and 'global batch of 1' in got[0], got
        else:
            assert not got, got


@everywhere
def test_global_batch_of_one_element_still_warns_on_every_rank():
    comm = MPI.COMM_WORLD
    width = 1 if comm.rank == 0 else 0
    link = multinode_bn.MultiNodeBatchNormalization((1, 3), comm, axis=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        link(numpy.ones((1, 3, width), numpy.float32))
    got = zero_tensor_warnings(record)
    with on_every_rank():
        assert len(got) == 1 and 'global batch of 1' in got[0], got


def test_one_local_sample_does_not_warn_when_global_batch_is_larger():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    x = numpy.ones((1, 3), numpy.float32)
    with pytest.warns(UserWarning, match='global batch of 1'):
        link(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        link(numpy.random.randn(2, 3).astype(numpy.float32))


# --- Communicators and copies ------------------------------------------------

@parallel
def test_chainermn_communicator_and_mpi4py_comm_give_the_same_result():
    world = MPI.COMM_WORLD
    sizes = [2, 3, 4][:world.size]
    xs, gys = make_batches(3, sizes, (3, 2, 2), numpy.float64)
    results = []
    for comm in (world, chainermn.create_communicator('naive')):
        link = multinode_bn.MultiNodeBatchNormalization(
            3, comm, dtype=numpy.float64)
        assert link.comm is comm
        results.append(run_link(link, xs[world.rank], gys[world.rank]))
    for name in ('y', 'gx', 'ggamma', 'gbeta', 'avg_mean', 'avg_var'):
        numpy.testing.assert_array_equal(getattr(results[0], name),
                                         getattr(results[1], name))
    ref = reference(xs, gys, 3)
    offset, n = split_sizes(sizes, world.rank)
    assert_close(results[1].y, ref.y[offset:offset + n], 1e-9, 1e-9, 'y')


@parallel
def test_split_sub_communicator_shares_statistics_within_its_group_only():
    world = MPI.COMM_WORLD
    colors = [0, 1, 0][:world.size]
    sub = world.Split(colors[world.rank], world.rank)
    sizes = [3, 2, 4][:world.size]
    xs, gys = make_batches(4, sizes, (3,), numpy.float64)
    group = [r for r in range(world.size) if colors[r] == colors[world.rank]]
    link = multinode_bn.MultiNodeBatchNormalization(
        3, sub, dtype=numpy.float64)
    ours = run_link(link, xs[world.rank], gys[world.rank])
    ref = reference([xs[r] for r in group], [gys[r] for r in group], 3)
    offset, n = split_sizes([sizes[r] for r in group], group.index(world.rank))
    assert_close(ours.y, ref.y[offset:offset + n], 1e-9, 1e-9, 'y')
    assert_close(ours.gx, ref.gx[offset:offset + n], 1e-9, 1e-9, 'gx')
    assert_close(ours.avg_var, ref.avg_var, 1e-9, 1e-9, 'avg_var')
    sub.Free()


@parallel
def test_agrees_with_chainermn_link_on_equal_batches():
    world = MPI.COMM_WORLD
    cmn_comm = chainermn.create_communicator('naive')
    sizes = [4] * world.size
    xs, gys = make_batches(5, sizes, (3, 4, 4), numpy.float32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs_link = chainermn.links.MultiNodeBatchNormalization(3, cmn_comm)
    ours_link = multinode_bn.MultiNodeBatchNormalization(3, cmn_comm)
    theirs = run_link(theirs_link, xs[world.rank], gys[world.rank])
    ours = run_link(ours_link, xs[world.rank], gys[world.rank])
    for name in ('y', 'gx', 'ggamma', 'gbeta', 'avg_mean'):
        assert_close(getattr(ours, name), getattr(theirs, name), 1e-4, 1e-4,
                     name)
    # avg_var differs on purpose: ChainerMN starts it at 0 and unbiases with
    # the local count. With its start value and the global count it agrees:
    m_local, m_global = 4 * 16, 4 * 16 * world.size
    var = (theirs.avg_var / 0.1) * (m_local - 1) / m_local
    expected_ours = 0.9 * 1.0 + 0.1 * var * m_global / (m_global - 1)
    assert_close(ours.avg_var, expected_ours, 1e-4, 1e-4, 'avg_var')


def test_deepcopy_and_copy_keep_the_same_communicator():
    comm = chainermn.create_communicator('naive')
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.avg_mean[:] = 2.0
    for copied in (copy.deepcopy(link), link.copy(mode='copy'),
                   link.copy(mode='init'), link.copy(mode='share')):
        assert copied.comm is comm
        assert copied._impl_selector.protocol.exchange.comm is comm
    deep = copy.deepcopy(link)
    assert deep.avg_mean is not link.avg_mean
    assert deep.gamma is not link.gamma
    deep.avg_mean[:] = 5.0
    assert (link.avg_mean == 2.0).all()
    chain = chainer.Chain()
    with chain.init_scope():
        chain.bn = link
    assert copy.deepcopy(chain).bn.comm is comm


# --- The functional API: gradients of first and second order -----------------

def _params(channels, seed=0):
    rng = numpy.random.RandomState(seed)
    return rng.rand(channels) + 0.5, rng.randn(channels)


@pytest.mark.parametrize('axis', [None, (0, 2), (0, 1)])
def test_check_backward_with_size_one_communicator(axis):
    rng = numpy.random.RandomState(1)
    x = rng.randn(5, 3, 4)
    shape = x.shape[1:] if axis is None else tuple(
        d for i, d in enumerate(x.shape) if i not in axis)
    gamma, beta = rng.rand(*shape) + 0.5, rng.randn(*shape)
    gy = rng.randn(*x.shape)

    def f(x, gamma, beta):
        return multi_node_batch_normalization(x, gamma, beta, MPI.COMM_SELF,
                                              axis=axis)
    gradient_check.check_backward(f, (x, gamma, beta), gy, dtype=numpy.float64,
                                  atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('axis', [None, (0, 2)])
def test_check_double_backward_with_size_one_communicator(axis):
    rng = numpy.random.RandomState(2)
    x = rng.randn(6, 3, 2)
    shape = x.shape[1:] if axis is None else (3,)
    gamma, beta = rng.rand(*shape) + 0.5, rng.randn(*shape)
    gy, ggx = rng.randn(*x.shape), rng.randn(*x.shape)
    ggamma, ggbeta = rng.randn(*shape), rng.randn(*shape)

    def f(x, gamma, beta):
        return multi_node_batch_normalization(x, gamma, beta, MPI.COMM_SELF,
                                              axis=axis)
    gradient_check.check_double_backward(
        f, (x, gamma, beta), gy, (ggx, ggamma, ggbeta), dtype=numpy.float64,
        atol=1e-5, rtol=1e-5)


def _first_and_second_order(bn, x, gamma, beta, gy, w, v, u):
    """gx, ggamma, gbeta, and the gradients of sum(gx*w + ggamma*v + gbeta*u)."""
    x, gamma, beta = (chainer.Variable(a) for a in (x, gamma, beta))
    y = bn(x, gamma, beta)
    gx, ggamma, gbeta = chainer.grad([y], [x, gamma, beta], grad_outputs=[gy],
                                     enable_double_backprop=True)
    loss2 = F.sum(gx * w) + F.sum(ggamma * v) + F.sum(gbeta * u)
    g2x, g2gamma = chainer.grad([loss2], [x, gamma])
    return [a.array for a in (gx, ggamma, gbeta, g2x, g2gamma)]


@parallel
def test_double_backward_under_mpi_matches_concatenated_reference():
    comm = MPI.COMM_WORLD
    sizes = [3, 1, 4][:comm.size]
    xs, gys = make_batches(3, sizes, (3, 2), numpy.float64)
    ws, _ = make_batches(4, sizes, (3, 2), numpy.float64)
    gamma, beta = _params(3, seed=5)
    v, u = numpy.random.RandomState(6).randn(2, 3)

    ref = _first_and_second_order(
        lambda x, g, b: F.batch_normalization(x, g, b),
        numpy.concatenate(xs), gamma, beta, numpy.concatenate(gys),
        numpy.concatenate(ws), v, u)
    ours = _first_and_second_order(
        lambda x, g, b: multi_node_batch_normalization(x, g, b, comm),
        xs[comm.rank], gamma, beta, gys[comm.rank], ws[comm.rank], v, u)
    offset, n = split_sizes(sizes, comm.rank)
    gx, ggamma, gbeta, g2x, g2gamma = ours
    assert_close(gx, ref[0][offset:offset + n], 1e-9, 1e-9, 'gx')
    assert_close(ggamma * comm.size, ref[1], 1e-9, 1e-9, 'ggamma')
    assert_close(gbeta * comm.size, ref[2], 1e-9, 1e-9, 'gbeta')
    assert_close(g2x, ref[3][offset:offset + n], 1e-8, 1e-8, 'second-order gx')
    assert_close(comm.allreduce(g2gamma), ref[4], 1e-8, 1e-8,
                 'second-order ggamma')


@parallel
def test_functional_api_matches_chainer_function_with_running_statistics():
    comm = MPI.COMM_WORLD
    sizes = [2, 5, 3][:comm.size]
    xs, _ = make_batches(8, sizes, (4, 3, 3), numpy.float64)
    gamma, beta = _params(4, seed=9)
    mean_ref, var_ref = numpy.zeros(4), numpy.ones(4)
    y_ref = F.batch_normalization(
        numpy.concatenate(xs), gamma, beta, running_mean=mean_ref,
        running_var=var_ref, decay=0.7).array
    mean, var = numpy.zeros(4), numpy.ones(4)
    counting = CountingComm()
    y = multinode_bn.multi_node_batch_normalization(
        xs[comm.rank], gamma, beta, counting, running_mean=mean,
        running_var=var, decay=0.7)
    # the functional API makes a communicator for the call, checks the
    # input (it has nowhere to remember a signature), then exchanges once
    assert counting.calls == ['Idup', 'Iallgather', 'Iallreduce']
    offset, n = split_sizes(sizes, comm.rank)
    assert_close(y.array, y_ref[offset:offset + n], 1e-9, 1e-9, 'y')
    assert_close(mean, mean_ref, 1e-9, 1e-9, 'running_mean')
    assert_close(var, var_ref, 1e-9, 1e-9, 'running_var')


def test_functional_api_rejects_train_argument_like_chainer():
    x = numpy.ones((2, 3), numpy.float32)
    g, b = numpy.ones(3, numpy.float32), numpy.zeros(3, numpy.float32)
    with pytest.raises(ValueError, match='train argument'):
        multi_node_batch_normalization(x, g, b, MPI.COMM_SELF, train=True)


# --- Fuzzed inputs against a float64 reference on the global batch -----------
#
# Every rank draws the same examples (derandomized, no shrinking) and every
# check is collective, so a failure on one rank fails all of them together
# instead of leaving the others waiting in a collective.

FUZZ_AXES = {
    2: [None, (0,)],
    3: [None, (0, 2), (0, 1)],
    4: [None, (0, 2, 3), (0, 1, 2), (0, 2)],
}
FUZZ_TOL = {numpy.float64: 1e-7, numpy.float32: 2e-3, numpy.float16: 3e-2}


@st.composite
def cases(draw, ranks):
    ndim = draw(st.sampled_from(sorted(FUZZ_AXES)))
    axis = draw(st.sampled_from(FUZZ_AXES[ndim]))
    tail = tuple(draw(st.integers(1, 4)) for _ in range(ndim - 1))
    kind = draw(st.sampled_from(['zeros', 'one-rank', 'random']))
    if kind == 'one-rank':  # all ranks but one empty
        sizes = [0] * ranks
        sizes[draw(st.integers(0, ranks - 1))] = draw(st.integers(1, 5))
    else:
        low = 0 if kind == 'zeros' else 1
        sizes = [draw(st.integers(low, 5)) for _ in range(ranks)]
        if sum(sizes) == 0:
            sizes[0] = 2
    dtype = draw(st.sampled_from([numpy.float32, numpy.float64,
                                  numpy.float16]))
    if dtype == numpy.float16:
        scale = 10.0 ** draw(st.floats(-1, 2))
        offset = scale * draw(st.floats(-4, 4))
    else:
        scale = 10.0 ** draw(st.floats(-3, 4))
        offset = draw(st.floats(-1e4, 1e4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(axis=axis, tail=tail, sizes=sizes, dtype=dtype, scale=scale,
                offset=offset, seed=seed)


def _functional_reference(x, gy, gamma, beta, axis):
    mean, var = numpy.zeros(gamma.shape), numpy.ones(gamma.shape)
    xv = chainer.Variable(x)
    y = F.batch_normalization(xv, gamma, beta, running_mean=mean,
                              running_var=var, decay=0.5, axis=axis)
    y.grad = gy
    y.backward()
    return y.array, xv.grad, mean, var


def _relative_error(ours, ref):
    ours = numpy.asarray(ours, numpy.float64)
    if ref.size == 0:
        return 0.0
    return float(numpy.abs(ours - ref).max() / max(1.0, numpy.abs(ref).max()))


def check_case(comm, case):
    rank, dtype = comm.rank, case['dtype']
    rng = numpy.random.RandomState(case['seed'])
    xs = [(case['offset'] + case['scale'] * rng.standard_normal(
        (n,) + case['tail'])).astype(dtype) for n in case['sizes']]
    gys = [rng.standard_normal((n,) + case['tail']).astype(dtype)
           for n in case['sizes']]
    ndim = len(case['tail']) + 1
    axis = case['axis'] if case['axis'] is not None else (0,) + tuple(
        range(2, ndim))
    pshape = tuple(d for i, d in enumerate((1,) + case['tail'])
                   if i not in axis)
    gamma = 0.5 + rng.rand(*pshape)
    beta = rng.randn(*pshape)
    x64 = numpy.concatenate(xs).astype(numpy.float64)
    gy64 = numpy.concatenate(gys).astype(numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        y_ref, gx_ref, mean_ref, var_ref = _functional_reference(
            x64, gy64, gamma, beta, case['axis'])

    param_dtype = numpy.float32 if dtype == numpy.float16 else dtype
    mean = numpy.zeros(pshape, param_dtype)
    var = numpy.ones(pshape, param_dtype)
    xv = chainer.Variable(xs[rank])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        y = multinode_bn.multi_node_batch_normalization(
            xv, gamma.astype(param_dtype), beta.astype(param_dtype), comm,
            running_mean=mean, running_var=var, decay=0.5, axis=case['axis'])
        y.grad = gys[rank]
        y.backward()
    start = sum(case['sizes'][:rank])
    mine = slice(start, start + case['sizes'][rank])
    errors = {
        'y': _relative_error(y.array, y_ref[mine]),
        'gx': _relative_error(xv.grad, gx_ref[mine]),
        'running_mean': _relative_error(mean / max(1.0, abs(case['offset'])),
                                        mean_ref / max(1.0,
                                                       abs(case['offset']))),
        'running_var': float(numpy.abs(var / var_ref - 1).max()),
    }
    worst = max(errors.values())
    with on_every_rank(comm):
        assert worst <= FUZZ_TOL[dtype] and numpy.isfinite(worst), (
            'rank {}: {} errors {} (tolerance {})'.format(
                rank, case, errors, FUZZ_TOL[dtype]))


FUZZ = settings(max_examples=40, derandomize=True, database=None,
                deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


@parallel
@FUZZ
@given(data=st.data())
def test_fuzzed_inputs_match_float64_reference_on_global_batch(data):
    comm = MPI.COMM_WORLD
    check_case(comm, data.draw(cases(comm.size)))


@settings(max_examples=80, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_inputs_single_process(data):
    check_case(MPI.COMM_SELF, data.draw(cases(1)))


# --- On a GPU, or where cuDNN would be used (skipped without one) ------------

def test_small_eps_trains_where_cudnn_is_available(monkeypatch):
    # Chainer's BatchNormalization node refuses eps < 1e-5 whenever cuDNN
    # is available; the synchronized node never uses cuDNN.
    from chainer.functions.normalization import batch_normalization as bn
    monkeypatch.setattr(chainer, 'should_use_cudnn',
                        lambda *a: chainer.config.use_cudnn != 'never')
    monkeypatch.setattr(bn, 'libcudnn', types.SimpleNamespace(
        CUDNN_BN_MIN_EPSILON=1e-5), raising=False)
    x = numpy.random.RandomState(0).randn(5, 3)
    gamma, beta = numpy.ones(3), numpy.zeros(3)
    with pytest.raises(RuntimeError, match='cuDNN does not allow'):
        F.batch_normalization(x, gamma, beta, eps=1e-7)  # the fake is on
    link = multinode_bn.MultiNodeBatchNormalization(
        3, MPI.COMM_SELF, eps=1e-7, dtype=numpy.float64)
    y = link(x).array
    expected = (x - x.mean(0)) / numpy.sqrt(x.var(0) + 1e-7)
    numpy.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def _real_cupy():
    cupy = pytest.importorskip(
        'cupy', reason='CuPy is not installed: GPU path not checked')
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        pytest.skip('no CUDA device: {}'.format(e))
    if count < 1:
        pytest.skip('no CUDA device')
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32,
                                   numpy.float64])
def test_gpu_link_matches_float64_reference(dtype):
    cupy = _real_cupy()
    rng = numpy.random.RandomState(0)
    x = (1e2 + rng.standard_normal((6, 8, 5, 5))).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    link = multinode_bn.MultiNodeBatchNormalization(8, MPI.COMM_SELF,
                                                    dtype=dtype)
    link.to_device('@cupy:0')
    xv = chainer.Variable(cupy.asarray(x))
    y = link(xv)
    link.cleargrads()
    y.grad = cupy.asarray(gy)
    y.backward()
    ref = L.BatchNormalization(8, dtype=numpy.float64)
    xr = chainer.Variable(x.astype(numpy.float64))
    yr = ref(xr)
    ref.cleargrads()
    yr.grad = gy.astype(numpy.float64)
    yr.backward()
    tol = 1e-2 if dtype == numpy.float16 else 1e-4
    numpy.testing.assert_allclose(cupy.asnumpy(y.array), yr.array, atol=tol)
    numpy.testing.assert_allclose(cupy.asnumpy(xv.grad), xr.grad, atol=tol)
    numpy.testing.assert_allclose(cupy.asnumpy(link.avg_var), ref.avg_var,
                                  rtol=tol)


@pytest.mark.gpu
@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize('backend_name', ['mpi', 'nccl'])
def test_gpu_link_on_two_processes_matches_the_concatenated_batch(
        backend_name):
    # Exchanges do run here (COMM_SELF above makes none): each process has
    # its own slice of the batch on its own GPU (NCCL needs one per rank).
    cupy = _real_cupy()
    world = MPI.COMM_WORLD
    devices = cupy.cuda.runtime.getDeviceCount()
    if backend_name == 'nccl' and devices < world.size:
        pytest.skip('NCCL needs a GPU per process')
    device = world.rank % devices
    cupy.cuda.Device(device).use()
    comm = (chainermn.create_communicator('pure_nccl', world)
            if backend_name == 'nccl' else world)
    sizes = [3, 5]
    rng = numpy.random.RandomState(0)
    x_all = 10 + rng.standard_normal((sum(sizes), 8, 4, 4))
    start = sum(sizes[:world.rank])
    x_mine = x_all[start:start + sizes[world.rank]]

    def step(link, x):
        xv = chainer.Variable(x)
        y = link(xv)
        link.cleargrads()
        F.sum(y * y * y).backward()  # upstream gradient depends on y
        return y.array, xv.grad, link.gamma.grad, link.avg_var

    link = multinode_bn.MultiNodeBatchNormalization(
        8, comm, dtype=numpy.float32, communication_backend=backend_name)
    link.to_device('@cupy:{}'.format(device))
    ours = [cupy.asnumpy(a) for a in step(
        link, cupy.asarray(x_mine, numpy.float32))]
    ref = step(L.BatchNormalization(8, dtype=numpy.float64), x_all)
    compared = [('y', ours[0], ref[0][start:start + len(x_mine)]),
                ('gx', ours[1], ref[1][start:start + len(x_mine)]),
                ('ggamma', world.allreduce(ours[2]), ref[2]),
                ('avg_var', ours[3], ref[3])]

    def close(name, a, b):
        assert numpy.allclose(a, b, rtol=1e-3, atol=1e-3), (
            '{}: max error {}'.format(name, numpy.abs(a - b).max()))
    with on_every_rank() as ranks:
        for name, a, b in compared:
            ranks.check(close, name, a, b)
