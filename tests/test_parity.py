"""Parity with L.BatchNormalization: axis, lazy size, initializers, modes."""

import numpy
import pytest

import chainer
import chainer.links as L
from mpi4py import MPI

import multinode_bn
from multinode_bn.functions import batch_normalization as fbn
from conftest import (assert_matches_reference, make_batches, reference,
                      run_link, split_sizes)

parallel = pytest.mark.parallel(nprocs=[2, 3])

# (per-sample shape, axis, channel size as L.BN wants it)
AXES = {
    'default-4d': ((3, 4, 5), None, 3),
    'axis0-2d': ((6,), (0,), 6),
    'axis023-4d': ((3, 4, 5), (0, 2, 3), 3),
    'channels-last': ((4, 5, 3), (0, 1, 2), 3),
    'keep-c-and-w': ((3, 4, 5), (0, 2), (3, 5)),
    'keep-hw': ((3, 4, 5), (0, 1), (4, 5)),
}
TOL = {numpy.float64: 1e-9, numpy.float32: 2e-4}


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


def test_size_or_axis_required_like_chainer():
    with pytest.raises(RuntimeError, match='size or axis'):
        multinode_bn.MultiNodeBatchNormalization(None, MPI.COMM_SELF)


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


def test_one_local_sample_does_not_warn_when_global_batch_is_larger():
    import warnings
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    x = numpy.ones((1, 3), numpy.float32)
    with pytest.warns(UserWarning, match='global batch of 1'):
        link(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        link(numpy.random.randn(2, 3).astype(numpy.float32))


@pytest.mark.parallel(nprocs=[2])
def test_one_sample_per_rank_gives_no_warning_and_global_statistics():
    import warnings
    comm = MPI.COMM_WORLD
    xs, gys = make_batches(3, [1] * comm.size, (3,), numpy.float64)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                    dtype=numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        ours = run_link(link, xs[comm.rank], gys[comm.rank])
    ref = reference(xs, gys, 3)
    assert_matches_reference(ours, ref, comm.rank, 1, comm.size, 1e-9, 1e-9)
