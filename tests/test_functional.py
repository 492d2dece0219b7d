"""The functional API: gradients, second-order gradients, running statistics."""

import numpy
import pytest

import chainer
import chainer.functions as F
from chainer import gradient_check
from mpi4py import MPI

import multinode_bn
from multinode_bn.functions import multi_node_batch_normalization
from conftest import CountingComm, assert_close, make_batches, split_sizes

parallel = pytest.mark.parallel(nprocs=[2, 3])


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
