"""Inputs in every memory layout real layers produce, against the global
float64 reference, on 1, 2 and 3 processes; outputs keep the input's memory
order. Also: replicas stay bit-identical, and an all-empty global batch
changes nothing."""

import numpy
import pytest

import chainer
import chainer.links as L
from mpi4py import MPI

import multinode_bn
from conftest import (CountingComm, assert_matches_reference, reference,
                      run_link, split_sizes)

parallel = pytest.mark.parallel(nprocs=[1, 2, 3])
CHANNELS = 4


def _conv(x):
    conv = L.Convolution2D(3, CHANNELS, 3, pad=1, initialW=_weights(
        (CHANNELS, 3, 3, 3)), nobias=True)
    return conv(x).array


def _deconv(x):
    deconv = L.Deconvolution2D(3, CHANNELS, 3, initialW=_weights(
        (3, CHANNELS, 3, 3)), nobias=True)
    return deconv(x).array


def _linear(x):
    linear = L.Linear(3 * 5 * 4, CHANNELS, initialW=_weights(
        (CHANNELS, 3 * 5 * 4)), nobias=True)
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


def _batches(sizes, layer, dtype, seed=0):
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


@parallel
@pytest.mark.parametrize('name', sorted(LAYOUTS))
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_real_layer_layouts_match_global_bn_and_keep_memory_order(
        name, dtype, cpu_path):
    comm = MPI.COMM_WORLD
    layer, axis = LAYOUTS[name]
    sizes = [2, 3, 1][:comm.size]
    xs, gys = _batches(sizes, layer, dtype)
    size = CHANNELS if axis is None else None
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


@parallel
def test_upstream_gradient_in_another_layout_matches_global_bn(cpu_path):
    comm = MPI.COMM_WORLD
    sizes = [3, 2, 2][:comm.size]
    xs, gys = _batches(sizes, _conv, numpy.float32, seed=5)
    # x in NHWC memory, gy in NCHW memory (as from a convolution's
    # backward): one copy of gy, the same result.
    gys = [numpy.ascontiguousarray(g) for g in gys]
    ref = reference(xs, gys, CHANNELS)
    link = multinode_bn.MultiNodeBatchNormalization(CHANNELS, comm)
    offset, n = split_sizes(sizes, comm.rank)
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    assert_matches_reference(ours, ref, offset, n, comm.size, 2e-4, 2e-4)


@pytest.mark.parallel(nprocs=[2, 3])
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


@parallel
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


@pytest.mark.parallel(nprocs=[2, 3])
def test_mean_far_from_the_shift_is_exchanged_again_then_once_per_call():
    # float64 inputs 1e6 + N(0, 1): sums around the first call's zero shift
    # would lose most digits of the variance; the exchange redoes them
    # around the mean (a second collective), and later calls, around the
    # previous mean, need one.
    comm = CountingComm()
    sizes = [3, 1, 4][:comm.size]
    rng = numpy.random.RandomState(7)
    xs = [1e6 + rng.standard_normal((n, 3, 2, 2)) for n in sizes]
    gys = [rng.standard_normal(x.shape) for x in xs]
    ref = reference(xs, gys, 3, steps=2)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                    dtype=numpy.float64)
    offset, n = split_sizes(sizes, comm.rank)
    forward_calls = []
    for step in range(2):
        del comm.calls[:]
        with chainer.using_config('enable_backprop', True):
            ours = run_link(link, xs[comm.rank], gys[comm.rank])
        forward_calls.append(comm.calls[:-1])  # the last is the backward
    assert forward_calls == [['Idup', 'Iallgather', 'Iallreduce',
                              'Iallreduce'],
                             ['Iallreduce']], forward_calls
    assert_matches_reference(ours, ref, offset, n, comm.size, 1e-9, 1e-9)
