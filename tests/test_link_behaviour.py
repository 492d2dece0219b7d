"""Communication pattern, communicators, copies, checkpoints and backends."""

import copy
import os
import tempfile
import warnings

import numpy
import pytest

import chainer
import chainer.links as L
import chainermn
from mpi4py import MPI

import multinode_bn
from multinode_bn.functions import batch_normalization as fbn
from conftest import (CountingComm, assert_close, make_batches, reference,
                      run_link, split_sizes)

parallel = pytest.mark.parallel(nprocs=[2, 3])


@parallel
def test_exactly_one_collective_in_forward_and_one_in_backward():
    comm = CountingComm()
    link = multinode_bn.MultiNodeBatchNormalization(4, comm)
    x = numpy.random.RandomState(comm.rank).randn(3, 4, 2, 2).astype(
        numpy.float32)
    for step in range(3):
        del comm.calls[:]
        y = link(x)
        forward_calls = list(comm.calls)
        link.cleargrads()
        y.grad = numpy.ones_like(x)
        y.backward()
        backward_calls = comm.calls[len(forward_calls):]
        # The first call of a link makes its own communicator and checks
        # the input across ranks with one small fixed-size exchange.
        expected = ['Idup', 'Iallgather', 'Iallreduce'] if step == 0 else [
            'Iallreduce']
        assert forward_calls == expected, forward_calls
        assert backward_calls == ['Iallreduce'], backward_calls


@parallel
def test_evaluation_mode_uses_no_communication_and_may_run_on_one_rank():
    comm = CountingComm()
    link = multinode_bn.MultiNodeBatchNormalization(
        3, comm, initial_avg_mean=0.5, initial_avg_var=4.0)
    x = numpy.random.RandomState(1).randn(2, 3).astype(numpy.float32)
    if comm.rank == 0:  # only one rank evaluates: would hang if it talked
        with chainer.using_config('train', False):
            y = link(x)
        assert comm.calls == []
        assert_close(y.array, (x - 0.5) / numpy.sqrt(4.0 + 2e-5), 1e-6, 1e-6,
                     'eval output')
    MPI.COMM_WORLD.Barrier()


def test_size_one_communicator_uses_no_communication():
    comm = CountingComm(MPI.COMM_SELF)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    xs, gys = make_batches(0, [5], (3, 2), numpy.float32)
    ours = run_link(link, xs[0], gys[0])
    assert comm.calls == []
    ref = reference(xs, gys, 3)
    assert_close(ours.y, ref.y, 1e-5, 1e-5, 'y')
    assert_close(ours.gx, ref.gx, 1e-5, 1e-5, 'gx')


def test_fresh_link_evaluates_like_chainer_before_training():
    """avg_var starts at 1 (ChainerMN starts at 0 and divides by sqrt(eps))."""
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    ref = L.BatchNormalization(3)
    assert (link.avg_var == 1).all() and (link.avg_mean == 0).all()
    x = numpy.random.RandomState(2).randn(4, 3).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(link(x).array, ref(x).array)


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


def test_checkpoint_interchanges_with_chainer_batch_normalization():
    rng = numpy.random.RandomState(6)
    ours = multinode_bn.MultiNodeBatchNormalization(4, MPI.COMM_SELF)
    theirs = L.BatchNormalization(4)
    ours.gamma.array[:] = rng.rand(4)
    ours.beta.array[:] = rng.rand(4)
    ours.avg_mean[:] = rng.rand(4)
    ours.avg_var[:] = rng.rand(4) + 1
    ours.N = 7
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'bn.npz')
        chainer.serializers.save_npz(path, ours)
        chainer.serializers.load_npz(path, theirs)
        for name in ('avg_mean', 'avg_var'):
            numpy.testing.assert_array_equal(getattr(theirs, name),
                                             getattr(ours, name))
        numpy.testing.assert_array_equal(theirs.gamma.array, ours.gamma.array)
        numpy.testing.assert_array_equal(theirs.beta.array, ours.beta.array)
        assert int(theirs.N) == 7
        back = multinode_bn.MultiNodeBatchNormalization(4, MPI.COMM_SELF)
        theirs.avg_mean *= 3
        chainer.serializers.save_npz(path, theirs)
        chainer.serializers.load_npz(path, back)
        numpy.testing.assert_array_equal(back.avg_mean, theirs.avg_mean)
        numpy.testing.assert_array_equal(back.gamma.array, theirs.gamma.array)
    x = rng.randn(3, 4).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(back(x).array, theirs(x).array)


def test_persistents_registered_under_chainer_names():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    assert link._persistent == L.BatchNormalization(3)._persistent
    assert {n for n, _ in link.namedparams()} == {'/gamma', '/beta'}
    assert link.avg_mean.dtype == numpy.float32
    half = multinode_bn.MultiNodeBatchNormalization(
        3, MPI.COMM_SELF, dtype=chainer.mixed16)
    assert half.avg_mean.dtype == numpy.float32
    assert half.gamma.dtype == numpy.float32


def test_backend_selection_and_errors():
    comm = chainermn.create_communicator('naive')
    assert fbn.get_communication_backend(comm) == 'mpi'
    assert fbn.get_communication_backend(comm, 'auto') == 'mpi'
    assert fbn.get_communication_backend(comm, 'mpi') == 'mpi'
    assert fbn.get_communication_backend(MPI.COMM_WORLD) == 'mpi'
    with pytest.raises(ValueError, match='communication_backend'):
        fbn.get_communication_backend(comm, 'gloo')
    with pytest.raises(ValueError, match='PureNcclCommunicator'):
        fbn.get_communication_backend(comm, 'nccl')
    with pytest.raises(ValueError, match='PureNcclCommunicator'):
        multinode_bn.MultiNodeBatchNormalization(
            3, MPI.COMM_WORLD, communication_backend='nccl')
    with pytest.raises(TypeError, match='mpi4py'):
        multinode_bn.MultiNodeBatchNormalization(3, object())
    selector = fbn.MultiNodeBNImplSelector(comm, 'mpi')
    assert selector.communication_backend_name == 'mpi'
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    assert link.communication_backend == 'mpi'


def test_auto_picks_nccl_for_pure_nccl_communicator():
    from chainermn.communicators.pure_nccl_communicator import \
        PureNcclCommunicator

    class FakeNccl(PureNcclCommunicator):
        def __init__(self, mpi_comm):  # no GPU needed to check selection
            self.mpi_comm = mpi_comm

    fake = FakeNccl(MPI.COMM_WORLD)
    assert fbn.get_communication_backend(fake, 'auto') == 'nccl'
    assert fbn.get_communication_backend(fake, 'nccl') == 'nccl'
    assert fbn.get_communication_backend(fake, 'mpi') == 'mpi'


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
