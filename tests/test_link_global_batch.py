"""The link equals L.BatchNormalization on the concatenated global batch."""

import numpy
import pytest

import chainer
from mpi4py import MPI

import multinode_bn
from conftest import (assert_close, assert_matches_reference, make_batches,
                      reference, run_link, split_sizes)

parallel = pytest.mark.parallel(nprocs=[2, 3])

SHAPES = {'2d': (5,), '4d': (3, 4, 5)}
TOL = {numpy.float64: (1e-9, 1e-9), numpy.float32: (2e-4, 2e-4),
       numpy.float16: (3e-2, 3e-2)}


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
    d_rtol, d_atol = TOL[dtype]
    assert_matches_reference(ours, ref, offset, n, comm.size,
                             rtol or d_rtol, atol or d_atol)
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
