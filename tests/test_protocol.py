"""Exchange and protocol: which collectives a link makes and on which
communicator, the exchanges' buffers (against a fake ``cupy`` and NCCL
communicator where there is no GPU), inputs and control flow that disagree
between processes (raised on every process, or a stall report that names
the link; nothing silently mixed), stalls and their policy, and random
control-flow divergences."""

import copy
import ctypes
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy
import pytest

import chainer
import chainer.functions as F
import chainermn
from mpi4py import MPI

import multinode_bn
from multinode_bn import communication, statistics, validation
from multinode_bn.functions import batch_normalization as fbn
from multinode_bn.validation import InconsistentInputError
from conftest import (CountingComm, assert_close, assert_matches_reference,
                      make_batches, on_every_rank, reference, run_link,
                      split_sizes)

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])
parallel = pytest.mark.parallel(nprocs=[2, 3])
ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))


def _x(rank, shape=(4, 3), seed=0):
    return numpy.random.RandomState(seed + rank).standard_normal(
        shape).astype(numpy.float32)


# --- Collectives: how many, and when none ------------------------------------

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


@parallel
def test_debug_mode_checks_finiteness_in_band_at_no_extra_collective():
    comm = CountingComm()
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.random.RandomState(0).randn(2, 3).astype(numpy.float32)
    link(x)
    del comm.calls[:]
    link(x)
    assert comm.calls == ['Iallreduce']
    del comm.calls[:]
    with chainer.using_config('debug', True):
        y = link(x)
        link.cleargrads()
        y.grad = numpy.ones_like(x)
        y.backward()
    assert comm.calls == ['Iallreduce', 'Iallreduce']


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


@parallel
def test_a_dropped_link_releases_its_communicator_at_once():
    import weakref
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link(_x(comm.rank))
    exchange = weakref.ref(link._impl_selector.protocol.exchange)
    assert exchange().link_comm(str) is not comm
    del link
    # No reference cycle keeps it until a garbage collection.
    assert exchange() is None


# --- Backends: MPI or NCCL ---------------------------------------------------

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


def _fake_nccl_class():
    from chainermn.communicators.pure_nccl_communicator import \
        PureNcclCommunicator

    class FakeNccl(PureNcclCommunicator):
        def __init__(self, mpi_comm, nccl_comm=None):  # no GPU needed
            self.mpi_comm = mpi_comm
            self.nccl_comm = nccl_comm
            self.init_calls = 0

        def _init_comms(self):
            self.init_calls += 1

    return FakeNccl


def test_auto_picks_nccl_for_pure_nccl_communicator():
    fake = _fake_nccl_class()(MPI.COMM_WORLD)
    assert fbn.get_communication_backend(fake, 'auto') == 'nccl'
    assert fbn.get_communication_backend(fake, 'nccl') == 'nccl'
    assert fbn.get_communication_backend(fake, 'mpi') == 'mpi'


def test_pure_nccl_communicator_gets_the_nccl_exchange():
    fake = _fake_nccl_class()(MPI.COMM_WORLD)
    assert communication.select_backend(fake, 'auto') == 'nccl'
    assert isinstance(communication.create_exchange(fake, 'nccl'),
                      communication.NcclStatsExchange)
    assert isinstance(communication.create_exchange(fake, 'mpi'),
                      communication.MpiStatsExchange)
    link = multinode_bn.MultiNodeBatchNormalization(3, fake)
    assert link.communication_backend == 'nccl'
    forced = multinode_bn.MultiNodeBatchNormalization(
        3, fake, communication_backend='mpi')
    assert forced.communication_backend == 'mpi'


def test_nccl_backend_with_host_arrays_names_the_problem():
    fake = _fake_nccl_class()(MPI.COMM_WORLD)
    link = multinode_bn.MultiNodeBatchNormalization(3, fake)
    x = numpy.zeros((4, 3), numpy.float32)
    with pytest.raises(multinode_bn.InconsistentInputError,
                       match='needs CuPy arrays on a GPU'):
        link(x)


# --- The exchanges' buffers, against a fake cupy -----------------------------
#
# The fakes record what the exchange asks of them (which buffer, which
# stream, what is returned), not what NCCL or CUDA would do.

class _FakeDeviceArray(numpy.ndarray):
    """A NumPy array that answers ``.device.id`` and ``.data.ptr``."""

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, 'device_id', _FakeCupy.current_device)

    @property
    def device(self):
        return types.SimpleNamespace(id=self.device_id)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self, stream=None):
        _FakeCupy.events.append(('get', getattr(stream, 'ptr', None)))
        return numpy.asarray(self).copy()

    def set(self, host, stream=None):
        _FakeCupy.events.append(('set', getattr(stream, 'ptr', None)))
        self[...] = host


class _FakeCupy(types.ModuleType):
    """Just what the exchanges use, with host copies and streams
    recorded."""

    current_device = 0
    #: Host copies and stream synchronizations, in order.
    events = []

    def __init__(self):
        super().__init__('cupy')
        self.host_copies = 0
        self.stream_ptr = 4242
        fake = self
        self.ndarray = _FakeDeviceArray

        class Device(object):
            def __init__(self, device=None):
                self.id = _FakeCupy.current_device if device is None \
                    else device

        class Stream(object):
            @property
            def ptr(self):
                return fake.stream_ptr

            def synchronize(self):
                _FakeCupy.events.append(('synchronize', self.ptr))

        cuda = types.ModuleType('cupy.cuda')
        cuda.Device = Device
        cuda.get_current_stream = lambda: Stream()
        nccl = types.ModuleType('cupy.cuda.nccl')
        nccl.NCCL_FLOAT64 = 7
        nccl.NCCL_SUM = 0
        cuda.nccl = nccl
        self.cuda = cuda

    def _wrap(self, a):
        return numpy.asarray(a).view(_FakeDeviceArray)

    def empty(self, shape, dtype=numpy.float64):
        return self._wrap(numpy.empty(shape, dtype))

    def zeros(self, shape, dtype=numpy.float64):
        return self._wrap(numpy.zeros(shape, dtype))

    def asarray(self, a, dtype=None):
        if isinstance(a, _FakeDeviceArray) and (
                dtype is None or a.dtype == dtype):
            return a
        return self._wrap(numpy.asarray(a, dtype=dtype))

    def asnumpy(self, a):
        self.host_copies += 1
        return numpy.asarray(a).copy()

    def stack(self, arrays, axis=0):
        return self._wrap(numpy.stack([numpy.asarray(a) for a in arrays],
                                      axis=axis))

    def concatenate(self, arrays, axis=0):
        return self._wrap(numpy.concatenate(
            [numpy.asarray(a) for a in arrays], axis=axis))

    def where(self, *args):
        return self._wrap(numpy.where(*args))

    def maximum(self, *args):
        return self._wrap(numpy.maximum(*args))


class _FakeNcclComm(object):
    """Records allReduce calls; sums over ``ranks`` identical processes."""

    def __init__(self, ranks=2):
        self.ranks = ranks
        self.calls = []

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append(dict(send=send, recv=recv, count=count,
                               dtype=dtype, op=op, stream=stream))
        buf = (ctypes.c_double * count).from_address(recv)
        src = (ctypes.c_double * count).from_address(send)
        for i in range(count):
            buf[i] = src[i] * self.ranks


class _FakeMpiComm(object):
    """Two identical processes for the host-side collectives."""

    def __init__(self, ranks=2):
        self.ranks = ranks
        self.calls = []

    def Get_size(self):
        return self.ranks

    def Get_rank(self):
        return 0

    def Iallreduce(self, send, recv, op=None):
        self.calls.append('Iallreduce')
        recv[...] = numpy.asarray(send) * self.ranks
        return types.SimpleNamespace(Test=lambda: True)

    def Iallgather(self, send, recv):
        self.calls.append('Iallgather')
        recv[...] = send
        return types.SimpleNamespace(Test=lambda: True)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, 'cupy', fake)
    monkeypatch.setitem(sys.modules, 'cupy.cuda', fake.cuda)
    monkeypatch.setitem(sys.modules, 'cupy.cuda.nccl', fake.cuda.nccl)
    monkeypatch.setattr(_FakeCupy, 'current_device', 0)
    monkeypatch.setattr(_FakeCupy, 'events', [])
    return fake


TAG = validation.exchange_tag(validation.exchange_digest('test'))


def test_host_copies_wait_for_the_current_stream(fake_cupy):
    # A user's non-blocking stream: the copy is queued on it and waited
    # for, instead of a plain get() on the default stream.
    fake_cupy.stream_ptr = 99
    device = fake_cupy.asarray(numpy.arange(3.0))
    host = communication.to_host(device)
    assert type(host) is numpy.ndarray
    numpy.testing.assert_array_equal(host, numpy.arange(3.0))
    assert _FakeCupy.events == [('get', 99), ('synchronize', 99)]


def test_mpi_exchange_of_device_sums_copies_on_the_current_stream(
        fake_cupy):
    fake_cupy.stream_ptr = 7
    exchange = communication.MpiStatsExchange(MPI.COMM_WORLD)
    exchange.size = 2
    exchange._own = _FakeMpiComm(2)
    exchange.width = validation.TAG_LEN + 1 + 2 * 2
    sums, summed = exchange.allreduce_sums(
        fake_cupy.asarray(numpy.ones(5)), TAG)
    numpy.testing.assert_array_equal(sums, numpy.full(5, 2.0))
    assert _FakeCupy.events == [('get', 7), ('synchronize', 7), ('set', 7)]


def _nccl_exchange(ranks=2, channels=4):
    fake_comm = _fake_nccl_class()(MPI.COMM_WORLD, _FakeNcclComm(ranks))
    exchange = communication.NcclStatsExchange(fake_comm)
    # Two identical processes, as far as the exchange can tell.
    exchange.size = ranks
    exchange._own = _FakeMpiComm(ranks)
    exchange.width = validation.TAG_LEN + 1 + 2 * channels
    return exchange, fake_comm


def test_nccl_sums_reuse_one_padded_buffer_on_the_current_stream(fake_cupy):
    exchange, comm = _nccl_exchange()
    sums = fake_cupy.asarray(numpy.arange(6.0).reshape(2, 3))
    first, _ = exchange.allreduce_sums(sums, TAG)
    second, _ = exchange.allreduce_sums(sums, TAG)
    calls = comm.nccl_comm.calls
    assert len(calls) == 2
    assert calls[0]['recv'] == calls[1]['recv'] == calls[0]['send']
    assert all(c['stream'] == fake_cupy.stream_ptr for c in calls)
    # Every exchange of a link has its width: 2 x 3 sums are padded to the
    # 1 + 2 C = 9 values of the forward.
    assert all(c['count'] == 9 for c in calls)
    numpy.testing.assert_array_equal(first, 2 * numpy.arange(6.0).reshape(
        2, 3))
    # The result may outlive the next exchange (AllreduceSum keeps it).
    assert first.ctypes.data != calls[0]['recv']
    numpy.testing.assert_array_equal(first, second)
    assert fake_cupy.host_copies == 0
    assert comm.init_calls == 2


def test_nccl_buffers_are_per_device(fake_cupy):
    exchange, comm = _nccl_exchange()
    exchange.allreduce_sums(fake_cupy.asarray(numpy.ones((2, 3))), TAG)
    exchange.allreduce_sums(fake_cupy.asarray(numpy.ones((2, 4))), TAG)
    ptrs = [c['recv'] for c in comm.nccl_comm.calls]
    assert ptrs[0] == ptrs[1]
    _FakeCupy.current_device = 1
    exchange.allreduce_sums(fake_cupy.asarray(numpy.ones((2, 3))), TAG)
    assert comm.nccl_comm.calls[-1]['recv'] not in ptrs


def test_exchange_larger_than_the_link_width_is_refused(fake_cupy):
    exchange, comm = _nccl_exchange(channels=2)
    with pytest.raises(ValueError, match='hold'):
        exchange.allreduce_sums(fake_cupy.asarray(numpy.ones(6)), TAG)
    assert comm.nccl_comm.calls == []


def _sums(fake_cupy, host, shift):
    return fake_cupy.asarray(
        statistics.moments_to_shifted_sums(numpy, host, shift))


def test_nccl_moments_merge_like_the_concatenated_batch(fake_cupy):
    exchange, comm = _nccl_exchange()
    rng = numpy.random.RandomState(0)
    host = numpy.stack([numpy.full(4, 5.0), rng.standard_normal(4),
                        rng.uniform(1, 2, 4)], axis=1)
    header = TAG
    shift = numpy.array([0.0, 1.0, -2.0, 0.5])
    sums, summed = exchange.allreduce_sums(_sums(fake_cupy, host, shift),
                                           header)
    merged = statistics.shifted_sums_to_moments(numpy, numpy.asarray(sums),
                                                shift)
    # Two identical batches: twice the count and m2, the same mean.
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 0], 10.0)
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 1], host[:, 1],
                                  rtol=1e-12)
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 2],
                                  2 * host[:, 2], rtol=1e-10)
    assert validation.tag_agrees(numpy.asarray(summed))
    numpy.testing.assert_array_equal(numpy.asarray(summed), 2 * header)


def test_nccl_forward_needs_no_device_to_host_copy(fake_cupy):
    exchange, comm = _nccl_exchange()
    host = numpy.tile([[5.0, 0.5, 2.0]], (4, 1))
    header = TAG
    exchange.allreduce_sums(_sums(fake_cupy, host, numpy.zeros(4)), header)
    assert fake_cupy.host_copies == 0
    assert exchange._own.calls == ['Iallreduce']
    # The NCCL buffer holds the sums only (count, then two per channel),
    # of a size fixed per link.
    assert [c['count'] for c in comm.nccl_comm.calls] == [9]


def test_nccl_disagreeing_header_skips_the_device_collective(fake_cupy):
    exchange, comm = _nccl_exchange()
    header = TAG

    class Disagreeing(_FakeMpiComm):
        def Iallreduce(self, send, recv, op=None):
            recv[...] = numpy.asarray(send) * 2
            recv[1] += 1  # another process had another signature
            return types.SimpleNamespace(Test=lambda: True)

    exchange._own = Disagreeing()
    host = numpy.tile([[5.0, 0.5, 2.0]], (4, 1))
    _, summed = exchange.allreduce_sums(
        _sums(fake_cupy, host, numpy.zeros(4)), header,
        proceed=validation.tag_agrees)
    assert not validation.tag_agrees(summed)
    assert comm.nccl_comm.calls == []


# --- Inputs that disagree between processes ----------------------------------

def _raises_everywhere(make_link, make_x, match, within=10.0):
    """Every rank raises InconsistentInputError quickly, naming ``match``."""
    comm = MPI.COMM_WORLD
    link = make_link(comm.rank)
    x = make_x(comm.rank)
    with on_every_rank():
        start = time.monotonic()
        with pytest.raises(InconsistentInputError) as info:
            link(x)
        assert time.monotonic() - start < within
        message = str(info.value)
        for r in range(comm.size):
            assert 'rank {}:'.format(r) in message
        assert match in message, message
    return link, message


@parallel
def test_channel_count_disagreement_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(
            5 if r == 1 else 4, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 5 if r == 1 else 4, 3, 3), numpy.float32),
        'disagree')
    assert '(2, 5, 3, 3)' in message and '(2, 4, 3, 3)' in message


@parallel
def test_dtype_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3), numpy.float64 if r == 0
                              else numpy.float32),
        'float64')


@parallel
def test_ndim_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3) if r == 0 else (2, 3, 4), numpy.float32),
        'disagree')


@parallel
def test_axis_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(
            None, MPI.COMM_WORLD, axis=(0, 2, 3) if r == 0 else (0, 1, 2)),
        lambda r: numpy.zeros((2, 4, 4, 4), numpy.float32),
        'axis')


@parallel
def test_integer_input_on_one_rank_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3), numpy.int32 if r == 1
                              else numpy.float32),
        'not floating point')
    assert 'rank(s) 1' in message


@parallel
def test_input_without_batch_axis_on_one_rank_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((3,) if r == 1 else (2, 3), numpy.float32),
        'no batch axis')
    assert 'rank(s) 1' in message and 'x float32 (3,)' in message
    assert 'channels do not match' not in message


@parallel
def test_wrong_channel_count_for_size_raises_clearly_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 4, 5, 5), numpy.float32),
        'channels do not match')
    assert 'params (3,)' in message


def test_single_process_bad_input_errors_are_clear():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    with pytest.raises(InconsistentInputError, match='not floating point'):
        link(numpy.zeros((2, 3), numpy.int32))
    with pytest.raises(InconsistentInputError, match='channels do not match'):
        link(numpy.zeros((2, 4), numpy.float32))
    with pytest.raises(InconsistentInputError, match='no batch axis'):
        link(numpy.zeros(3, numpy.float32))


def test_input_record_round_trip_and_local_problems():
    record = validation.InputRecord(
        '1.2.3', '/bn call 4', (2, 3, 4, 5), (0, 2, 3), (3,), 'float32',
        'float32', 'mpi', 'cpu', validation.OK, True)
    packed = record.pack()
    assert packed.shape == (validation.RECORD_LEN,)
    assert validation.InputRecord.unpack(packed) == record
    assert record.agreeing == (4, (0, 2, 3), (3,), 'float32', 'float32',
                               'mpi', 'cpu')
    garbage = validation.InputRecord.unpack(numpy.arange(
        validation.RECORD_LEN))
    assert garbage.problem == validation.UNREADABLE
    lp = validation.local_problem
    args = dict(x_shape=(2, 3), x_dtype=numpy.float32, param_shape=(3,),
                param_dtype=numpy.float32, beta_dtype=numpy.float32,
                axis=(0,), backend='mpi', x_device='cpu', param_device='cpu')
    assert lp(**args) == validation.OK
    assert lp(**dict(args, x_device='gpu')) == validation.DEVICE_MISMATCH
    assert lp(**dict(args, backend='nccl')) == validation.NCCL_NEEDS_GPU
    assert lp(**dict(args, x_dtype=numpy.int64)) == validation.NOT_FLOAT
    assert lp(**dict(args, axis=(0, 5))) == validation.BAD_AXIS
    assert lp(**dict(args, param_shape=(4,))) == validation.CHANNEL_MISMATCH
    assert lp(**dict(args, beta_dtype=numpy.float64)) == \
        validation.DTYPE_MISMATCH


@parallel
def test_parameter_problem_on_one_rank_raises_on_every_rank():
    """Chainer's own type check would raise on that rank only."""
    comm = MPI.COMM_WORLD
    selector = multinode_bn.functions.MultiNodeBNImplSelector(comm, 'auto')
    x = numpy.random.RandomState(comm.rank).randn(4, 3).astype(
        numpy.float32)
    gamma = numpy.ones(3, numpy.float32)
    good_beta = numpy.zeros(3, numpy.float32)
    multinode_bn.multi_node_batch_normalization(x, gamma, good_beta, selector)
    bad = [(gamma, numpy.zeros((1, 3), numpy.float32)),   # beta shape
           (gamma.astype(numpy.int32), good_beta.astype(numpy.int32))]
    for g, b in bad:
        mine = (g, b) if comm.rank == 1 else (gamma, good_beta)
        start = time.monotonic()
        with pytest.raises(InconsistentInputError, match='rank\\(s\\) 1'):
            multinode_bn.multi_node_batch_normalization(x, mine[0], mine[1],
                                                        selector)
        assert time.monotonic() - start < 10


@parallel
def test_functional_running_var_of_wrong_shape_raises_everywhere_first():
    comm = MPI.COMM_WORLD
    selector = multinode_bn.functions.MultiNodeBNImplSelector(comm, 'auto')
    x = _x(comm.rank)
    gamma, beta = numpy.ones(3, numpy.float32), numpy.zeros(3, numpy.float32)
    mean = numpy.zeros(3, numpy.float32)
    var = numpy.ones(4 if comm.rank == 1 else 3, numpy.float32)
    for round in range(2):  # the first call's check, then the in-band one
        with pytest.raises(InconsistentInputError,
                           match='running_mean or running_var'):
            multinode_bn.multi_node_batch_normalization(
                x, gamma, beta, selector, running_mean=mean,
                running_var=var)
        numpy.testing.assert_array_equal(mean, 0)
        numpy.testing.assert_array_equal(var, 1)
        if round == 0:
            # One good call, so that the next is checked in-band.
            multinode_bn.multi_node_batch_normalization(
                x, gamma, beta, selector, running_mean=mean.copy(),
                running_var=numpy.ones(3, numpy.float32))


@parallel
def test_failed_call_leaves_running_statistics_and_count_unchanged():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    good = numpy.random.RandomState(comm.rank).randn(4, 3).astype(
        numpy.float32)
    link(good, finetune=True)
    before = (link.avg_mean.copy(), link.avg_var.copy(), link.N)
    bad = numpy.zeros((2, 3), numpy.float64 if comm.rank == 0
                      else numpy.float32)
    for finetune in (True, False):
        with pytest.raises(InconsistentInputError):
            link(bad, finetune=finetune)
        numpy.testing.assert_array_equal(link.avg_mean, before[0])
        numpy.testing.assert_array_equal(link.avg_var, before[1])
        assert link.N == before[2]
    link(good, finetune=True)  # and the link still works afterwards
    assert link.N == before[2] + 1


@parallel
def test_failed_lazy_first_call_is_rolled_back_on_every_process():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(None, comm, axis=0)
    bad = numpy.zeros((2, 5), numpy.int32 if comm.rank == 1
                      else numpy.float32)
    with pytest.raises(InconsistentInputError, match='rank\\(s\\) 1'):
        link(bad)
    assert link.avg_mean is None and link.gamma.array is None
    xs = [_x(r, (3, 4)) for r in range(comm.size)]
    gys = [numpy.ones_like(x) for x in xs]
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    ref = reference(xs, gys, 4)
    assert_matches_reference(ours, ref, 3 * comm.rank, 3, comm.size, 2e-4,
                             2e-4)


@parallel
def test_debug_mode_nonfinite_statistics_raise_on_every_rank_naming_source():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/net/bn1'
    x = numpy.ones((2, 3), numpy.float32)
    if comm.rank == 1:
        x[0, 1] = numpy.nan
    with chainer.using_config('debug', True):
        with pytest.raises(FloatingPointError) as info:
            link(x)
    assert 'rank(s) 1' in str(info.value)
    assert '/net/bn1' in str(info.value)


@parallel
def test_processes_running_other_versions_raise_naming_the_versions(
        monkeypatch):
    # A stale install on one node: every process raises on the first
    # exchange, with each rank's version, before anything is computed.
    comm = MPI.COMM_WORLD
    if comm.rank == 1:
        monkeypatch.setattr(multinode_bn, '__version__', '0.0.1-stale')
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    try:
        link(numpy.ones((2, 3), numpy.float32))
        message = 'no error'
    except multinode_bn.InconsistentInputError as e:
        message = str(e)
    everyone = comm.allgather(message)
    with on_every_rank():
        for text in everyone:
            assert 'different versions' in text, everyone
            assert 'rank 0: multinode_bn {}'.format(
                multinode_bn.__version__ if comm.rank != 1 else '0.1.0') \
                in text
            assert 'rank 1: multinode_bn 0.0.1-stale' in text, everyone


@pytest.mark.parallel(nprocs=[2])
def test_mismatch_reports_name_every_configuration_field():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    try:  # rank 1 fine-tunes, rank 0 trains
        link(x, finetune=comm.rank == 1)
        message = 'no error'
    except multinode_bn.InconsistentInputError as e:
        message = str(e)
    # (fine-tuning averages with decay 1 - 1 / (N + 1), 0 at first)
    for rank, decay, finetune in ((0, 0.9, False), (1, 0.0, True)):
        assert ('rank {}: MultiNodeBatchNormalization #'.format(rank)
                in message), message
        assert ('eps=2e-05 decay={} use_gamma=True use_beta=True '
                'finetune={}'.format(decay, finetune)) in message, message


# --- Control flow that disagrees between processes ---------------------------

class stall_raises(object):
    """Stalls raise ``StallError`` after ``timeout`` seconds (and say so in
    ``self.stream``) inside the block."""

    def __init__(self, timeout=1.0):
        self.timeout = timeout
        self.stream = io.StringIO()

    def __enter__(self):
        self.previous = communication.set_stall_policy(
            self.timeout, 'raise', self.stream)
        return self

    def __exit__(self, *exc):
        p = self.previous
        communication.set_stall_policy(p.timeout, p.action, p.stream,
                                       p.abort_after)


def _outcome(step):
    """``step()``'s outcome on this process, and every process's."""
    try:
        step()
        mine = 'ok'
    except InconsistentInputError as e:
        mine = 'InconsistentInputError: ' + str(e)
    except communication.StallError as e:
        mine = 'StallError: ' + str(e)
    return mine, MPI.COMM_WORLD.allgather(mine.split(':')[0])


def _train(link, x):
    y = link(x)
    link.cleargrads()
    y.grad = numpy.ones_like(x)
    return y


@parallel
def test_skipped_backward_on_one_process_raises_on_every_process():
    # A process skips its update (say, after a NaN loss): its next forward
    # meets the others' backward of the same link. Before, they were summed
    # (gamma.grad of 9e6 on one process, an error blaming the wrong process
    # on the other).
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/net/bn'
    x = _x(comm.rank)
    _train(link, x).backward()
    y = _train(link, x)

    def step():
        if comm.rank == 1:
            link(x)  # next iteration's forward, backward skipped
        else:
            y.backward()
    mine, everyone = _outcome(step)
    with on_every_rank():
        assert set(everyone) == {'InconsistentInputError'}, everyone
        assert 'backward exchange' in mine and 'forward exchange' in mine, \
            mine
        assert '/net/bn call 2' in mine and '/net/bn call 3' in mine, mine
        if comm.rank != 1:
            assert link.gamma.grad is None or not numpy.any(
                numpy.abs(link.gamma.grad) > 1e3)


@parallel
def test_same_shape_links_in_swapped_order_stall_and_name_the_link():
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    a.label, b.label = '/a', '/b'
    x = _x(comm.rank)
    a(x), b(x)  # in order: both links have their communicator
    first, second = (b, a) if comm.rank == 1 else (a, b)
    with stall_raises() as policy:
        mine, everyone = _outcome(lambda: (first(x), second(x)))
    with on_every_rank():
        # Each process waits in its own link's exchange: nothing is mixed.
        assert set(everyone) == {'StallError'}, everyone
        name = first.label
        assert 'forward exchange of {} (call 2'.format(name) in mine, mine
        assert 'disagree on control flow' in policy.stream.getvalue()
        # The link refuses further calls instead of pairing again.
        with pytest.raises(communication.StallError, match='stalled'):
            first(x)


@parallel
def test_links_swapped_on_their_first_call_raise_on_every_process():
    # Before any exchange the links have no communicator of their own: the
    # first-call check names each process's link.
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    a.label, b.label = '/a', '/b'
    x = _x(comm.rank)
    first = b if comm.rank == 1 else a
    mine, everyone = _outcome(lambda: first(x))
    with on_every_rank():
        assert set(everyone) == {'InconsistentInputError'}, everyone
        assert '/a call 1' in mine and '/b call 1' in mine, mine
        assert 'different exchanges' in mine


@parallel
def test_named_links_swapped_on_their_first_call_raise_on_every_process():
    # Default labels carry the link's name in its parent, so two children
    # of one chain called in another order are told apart on the first
    # call, though both are the first synchronized call on each process.
    comm = MPI.COMM_WORLD
    net = chainer.Chain()
    with net.init_scope():
        net.bn_a = multinode_bn.MultiNodeBatchNormalization(3, comm)
        net.bn_b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    first = net.bn_b if comm.rank == 1 else net.bn_a
    mine, everyone = _outcome(lambda: first(_x(comm.rank)))
    with on_every_rank():
        assert set(everyone) == {'InconsistentInputError'}, everyone
        assert "'bn_a' #" in mine and "'bn_b' #" in mine, mine
        assert 'call 1 input check' in mine, mine


@parallel
def test_links_whose_old_digests_collided_are_told_apart():
    # 284 and 833 channels collided in the old 12-bit digests: called in
    # swapped order, buffers of different sizes met in one reduction.
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(284, comm)
    b = multinode_bn.MultiNodeBatchNormalization(833, comm)
    xa, xb = _x(comm.rank, (2, 284)), _x(comm.rank, (2, 833))
    a(xa), b(xb)
    calls = [(b, xb), (a, xa)] if comm.rank == 0 else [(a, xa), (b, xb)]
    with stall_raises():
        mine, everyone = _outcome(
            lambda: [link(x) for link, x in calls])
    assert set(everyone) == {'StallError'}, everyone


@parallel
def test_skipped_call_stalls_instead_of_pairing_with_another_link():
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = _x(comm.rank)
    a(x), b(x)
    with stall_raises():
        mine, everyone = _outcome(
            lambda: (a(x) if comm.rank != 0 else None, b(x)))
    assert set(everyone) == {'StallError'}, everyone


@parallel
def test_extra_call_of_one_link_raises_or_stalls_on_every_process():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    other = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = _x(comm.rank)
    link(x), other(x)
    with stall_raises():
        mine, everyone = _outcome(lambda: [
            link(x) for _ in range(2 if comm.rank == 1 else 1)] + [other(x)])
    assert set(everyone) == {'StallError'}, everyone


@parallel
@pytest.mark.parametrize('setting', ['eps', 'decay', 'use_gamma',
                                     'finetune'])
def test_configuration_differing_between_processes_raises_everywhere(
        setting):
    comm = MPI.COMM_WORLD
    odd = comm.rank == 1
    kwargs = {'eps': {'eps': 1e-3 if odd else 2e-5},
              'decay': {'decay': 0.5 if odd else 0.9},
              'use_gamma': {'use_gamma': not odd}}.get(setting, {})
    link = multinode_bn.MultiNodeBatchNormalization(3, comm, **kwargs)
    x = _x(comm.rank)
    call = {'finetune': lambda: link(x, finetune=odd)}.get(
        setting, lambda: link(x))
    before = (link.avg_mean.copy(), link.avg_var.copy(), link.N)
    for _ in range(2):  # on the first call and on a later one
        mine, everyone = _outcome(call)
        with on_every_rank():
            assert set(everyone) == {'InconsistentInputError'}, everyone
            assert 'different exchanges' in mine, mine
            numpy.testing.assert_array_equal(link.avg_mean, before[0])
            numpy.testing.assert_array_equal(link.avg_var, before[1])
            assert link.N == before[2]


@parallel
def test_links_on_one_process_only_do_not_shift_the_others_labels():
    # A helper link, or a functional call, on a one-process communicator
    # made on rank 0 alone must not change how the shared links are named.
    comm = MPI.COMM_WORLD
    x = _x(comm.rank)
    if comm.rank == 0:
        multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)(x)
        multinode_bn.multi_node_batch_normalization(
            x, numpy.ones(3, numpy.float32), numpy.zeros(3, numpy.float32),
            MPI.COMM_SELF)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    xs = [_x(r) for r in range(comm.size)]
    ours = run_link(link, x, numpy.ones_like(x))
    ref = reference(xs, [numpy.ones_like(v) for v in xs], 3)
    assert_matches_reference(ours, ref, 4 * comm.rank, 4, comm.size, 2e-4,
                             2e-4)


@parallel
def test_links_never_called_do_not_change_the_identity_of_others():
    # A model built on rank 0 alone (a preview, an export), never called:
    # links are numbered in the order of their first synchronized call.
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        spare = [multinode_bn.MultiNodeBatchNormalization(3, comm)
                 for _ in range(2)]
        assert spare[0].label == 'MultiNodeBatchNormalization'
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    xs = [_x(r) for r in range(comm.size)]
    gys = [numpy.ones_like(v) for v in xs]
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    assert_matches_reference(ours, reference(xs, gys, 3), 4 * comm.rank, 4,
                             comm.size, 2e-4, 2e-4)
    first = comm.allgather(link.label)
    assert len(set(first)) == 1, first


# --- Threads -----------------------------------------------------------------

def _in_thread(call):
    """``call()``'s exception in a thread of its own (``None`` if none)."""
    caught = []

    def run():
        try:
            call()
        except Exception as e:
            caught.append(e)
    thread = threading.Thread(target=run, name='second')
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), 'the second thread hangs'
    return caught[0] if caught else None


@parallel
def test_threads_taking_turns_on_one_link_raise_before_any_exchange():
    # Threads that never overlap still pair their exchanges in whatever
    # order they come: any call from a thread other than the one of the
    # link's first call raises at once, on that process, with no exchange.
    comm = MPI.COMM_WORLD
    for attempt in range(20):
        link = multinode_bn.MultiNodeBatchNormalization(3, comm)
        x = _x(comm.rank, seed=attempt)
        xs = [_x(r, seed=attempt) for r in range(comm.size)]
        gys = [numpy.ones_like(v) for v in xs]
        run_link(link, x, gys[comm.rank])  # the owning thread
        calls = link._impl_selector.protocol.calls
        error = _in_thread(lambda: link(x))
        assert isinstance(error, RuntimeError), error
        assert "thread 'second'" in str(error), error
        assert 'MainThread' in str(error), error
        assert link._impl_selector.protocol.calls == calls  # nothing counted
        # A copy shares the communicator, and so the thread.
        assert isinstance(_in_thread(lambda: copy.deepcopy(link)(x)),
                          RuntimeError)
        # The owner goes on, exact and in step with the other processes.
        ours = run_link(link, x, gys[comm.rank])
        ref = reference(xs, gys, 3, steps=2)
        assert_matches_reference(ours, ref, 4 * comm.rank, 4, comm.size,
                                 2e-4, 2e-4)


@everywhere
def test_second_thread_taking_its_turn_on_a_link_raises_before_exchanging():
    comm = CountingComm()
    x = numpy.random.RandomState(comm.rank).standard_normal((3, 3))
    for round in range(20):
        link = multinode_bn.MultiNodeBatchNormalization(3, comm)
        results = {}

        def call(name):
            try:
                link(x)
                results[name] = 'ok'
            except Exception as e:
                results[name] = '{}: {}'.format(type(e).__name__, e)
        first = threading.Thread(target=call, args=('first thread',))
        first.start()
        first.join()
        before = len(comm.calls)
        second = threading.Thread(target=call, args=('second thread',))
        second.start()
        second.join()
        # (on_every_rank talks on MPI.COMM_WORLD: comm does not count it)
        with on_every_rank():
            assert (results['first thread'] == 'ok'
                    and results['second thread'].startswith('RuntimeError')
                    and len(comm.calls) == before), (
                'round {}: {}, collectives after the second thread\'s '
                'call: {}'.format(round, results, comm.calls[before:]))


# --- Stalls and the stall policy ---------------------------------------------

@pytest.mark.parallel(nprocs=[2])
def test_stall_report_names_link_call_and_shape_then_keeps_waiting():
    comm = MPI.COMM_WORLD.Dup()
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/model/bn7'
    x = numpy.random.RandomState(comm.rank).randn(2, 3).astype(numpy.float32)
    link(x)
    stream = io.StringIO()
    previous = communication.set_stall_policy(0.5, 'report', stream)
    try:
        if comm.rank == 1:
            time.sleep(2.0)  # a late rank: rank 0 waits and reports
        y = link(x)
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream)
    assert y.shape == (2, 3)
    if comm.rank == 0:
        line = stream.getvalue()
        assert 'rank 0 has waited' in line, line
        assert '/model/bn7' in line and 'call 2' in line, line
        assert '(2, 3)' in line, line
        assert line.count('\n') == 1
    else:
        assert stream.getvalue() == ''
    comm.Free()


@pytest.mark.parallel(nprocs=[2])
def test_stall_with_raise_action_raises_instead_of_hanging():
    comm = MPI.COMM_WORLD.Dup()  # left with a pending exchange: not reused
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    previous = communication.set_stall_policy(1.0, 'raise', io.StringIO())
    try:
        if comm.rank == 0:  # a branch taken on rank 0 only
            start = time.monotonic()
            with pytest.raises(communication.StallError, match='call 2'):
                link(x)
            assert time.monotonic() - start < 10
            # Its communicator, still in use, is not freed even at exit.
            assert not link._impl_selector.protocol.exchange._free.alive
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream)


@parallel
def test_a_rank_that_skips_a_call_ends_the_others_after_the_limit():
    # The default action reports at the first limit and keeps waiting; at
    # the second the waiting processes raise, which ends the job under
    # `python -m mpi4py` instead of holding the nodes for ever.
    comm = MPI.COMM_WORLD.Dup()  # left with a pending exchange: not reused
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    stream = io.StringIO()
    previous = communication.set_stall_policy(0.3, 'report', stream,
                                              abort_after=1.5)
    try:
        if comm.rank != 1:  # rank 1 skips the call
            start = time.monotonic()
            with pytest.raises(communication.StallError, match='Giving up'):
                link(x)
            assert 1.5 < time.monotonic() - start < 10
            lines = stream.getvalue().splitlines()
            assert len(lines) == 2 and 'call 2' in lines[0], lines
            assert 'MULTINODE_BN_STALL_ABORT' in lines[1], lines
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream, previous.abort_after)


def test_stall_policy_from_environment():
    env = communication.StallPolicy.from_environment
    assert env({}).timeout == 60.0 and env({}).action == 'report'
    assert env({'MULTINODE_BN_STALL_TIMEOUT': 'off'}).timeout is None
    assert env({'MULTINODE_BN_STALL_TIMEOUT': '0'}).timeout is None
    policy = env({'MULTINODE_BN_STALL_TIMEOUT': '2.5',
                  'MULTINODE_BN_STALL_ACTION': 'raise'})
    assert policy.timeout == 2.5 and policy.action == 'raise'
    with pytest.raises(ValueError, match='action'):
        communication.StallPolicy(1, 'explode')


def test_stall_policy_gives_up_after_half_an_hour_by_default():
    env = communication.StallPolicy.from_environment
    assert env({}).abort_after == 1800.0
    assert communication.StallPolicy().abort_after == 1800.0
    assert env({'MULTINODE_BN_STALL_ABORT': '7200'}).abort_after == 7200.0
    assert env({'MULTINODE_BN_STALL_ABORT': 'off'}).abort_after is None
    assert communication.StallPolicy(abort_after=0).abort_after is None
    with pytest.warns(RuntimeWarning, match='MULTINODE_BN_STALL_ABORT'):
        assert env({'MULTINODE_BN_STALL_ABORT': '-3'}).abort_after == 1800.0
    with pytest.raises(ValueError, match='abort_after'):
        communication.StallPolicy(abort_after=float('nan'))


def test_stall_limit_is_read_from_the_environment_at_import():
    for value, expected in ((None, '1800.0'), ('7', '7.0')):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('MULTINODE_BN_STALL')
               and k != '_PYTEST_MPI_CHILD_PROCESS'}
        if value is not None:
            env['MULTINODE_BN_STALL_ABORT'] = value
        proc = subprocess.run(
            [sys.executable, '-c', 'import multinode_bn; print(getattr('
             'multinode_bn.get_stall_policy(), "abort_after", "missing"))'],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [expected], (value, proc.stdout)


def test_stall_policy_rejects_unusable_timeouts():
    for timeout in (-1, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='timeout'):
            communication.StallPolicy(timeout)
    assert repr(communication.StallPolicy(2.5, 'raise')).startswith(
        "StallPolicy(timeout=2.5, action='raise'")


def test_environment_variables_are_validated_and_never_break_the_import():
    for name, value, accepted in [
            ('MULTINODE_BN_STALL_TIMEOUT', 'abc', 'positive number'),
            ('MULTINODE_BN_STALL_TIMEOUT', '-1', 'positive number'),
            ('MULTINODE_BN_STALL_TIMEOUT', 'nan', 'positive number'),
            ('MULTINODE_BN_STALL_ACTION', 'explode', 'report or raise')]:
        env = dict(os.environ, **{name: value})
        env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
        proc = subprocess.run(
            [sys.executable, '-c', 'import multinode_bn; print('
             'multinode_bn.get_stall_policy())'],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert name in proc.stderr and accepted in proc.stderr, proc.stderr
        assert "StallPolicy(timeout=60.0, action='report'" in proc.stdout


ABORT_SCRIPT = textwrap.dedent('''
    import numpy, sys
    from mpi4py import MPI
    import multinode_bn
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.random.randn(4, 3).astype(numpy.float32)
    for step in range(5):
        if step == 2 and comm.rank == 1:
            raise RuntimeError('simulated failure on rank 1')
        y = link(x)
        link.cleargrads()
        y.grad = numpy.ones_like(x)
        y.backward()
    print('rank', comm.rank, 'finished')
''')


def test_exception_on_one_rank_aborts_the_whole_job_when_launched_via_mpi4py(
        tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(ABORT_SCRIPT)
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    env = dict(os.environ, MULTINODE_BN_STALL_TIMEOUT='off')
    env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
    start = time.monotonic()
    proc = subprocess.run(
        [mpiexec, '-n', '2', sys.executable, '-m', 'mpi4py', str(script)],
        capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert 'simulated failure on rank 1' in proc.stderr
    assert 'finished' not in proc.stdout
    assert elapsed < 60, elapsed


# --- Random control-flow divergences -----------------------------------------
#
# Each run either equals the float64 reference (no process diverged) or
# raises on every process, an InconsistentInputError or a StallError whose
# report names the link; none hangs without a report.

CHANNELS = {'a': 3, 'b': 3, 'c': 4}
MUTATIONS = ['skip a call', 'swap two links', 'extra call',
             'another link', 'skip the backward', 'extra backward']


def _scenario(seed, size):
    """The mutation and the processes it applies to (the same on every
    process): none for every fourth seed, else a non-empty proper subset."""
    rng = numpy.random.RandomState(seed)
    if seed % 4 == 0:
        return None, set()
    mutation = MUTATIONS[rng.randint(len(MUTATIONS))]
    count = rng.randint(1, size)
    return mutation, set(rng.choice(size, count, replace=False).tolist())


def _run(links, inputs, mutation, rng):
    order = ['a', 'b', 'c']
    if mutation == 'skip a call':
        order.remove(order[rng.randint(3)])
    elif mutation == 'swap two links':
        i = rng.randint(2)
        order[i], order[i + 1] = order[i + 1], order[i]
    elif mutation == 'extra call':
        order.insert(rng.randint(3), order[rng.randint(3)])
    elif mutation == 'another link':
        order[1] = 'a'
    outputs = {}
    for name in order:
        xv = chainer.Variable(inputs[name][0])
        outputs[name] = (xv, links[name](xv))
    loss = sum(F.sum(y * inputs[name][1]) for name, (_, y) in
               outputs.items())
    for link in links.values():
        link.cleargrads()
    if mutation != 'skip the backward':
        loss.backward()
    if mutation == 'extra backward':
        loss.backward()
    # The next iteration begins: every process calls this link.
    links['end'](inputs['end'][0])
    return {name: (y.array, xv.grad) for name, (xv, y) in outputs.items()}


@parallel
@pytest.mark.parametrize('seed', range(24))
def test_divergent_control_flow_raises_everywhere_or_matches_reference(
        seed):
    # A communicator of the scenario's own: a process stalled while making
    # a link's communicator leaves that collective pending on it.
    comm = MPI.COMM_WORLD.Dup()
    mutation, mutated = _scenario(seed, comm.size)
    sizes = [2 + (seed + r) % 3 for r in range(comm.size)]
    data = numpy.random.RandomState(seed)
    batches = {name: [(data.standard_normal((n, c)) * 2 + 1,
                       data.standard_normal((n, c))) for n in sizes]
               for name, c in dict(CHANNELS, end=2).items()}
    links = {}
    for name in ('a', 'b', 'c', 'end'):
        links[name] = multinode_bn.MultiNodeBatchNormalization(
            (dict(CHANNELS, end=2))[name], comm, dtype=numpy.float64)
        links[name].label = '/' + name
    inputs = {name: batches[name][comm.rank] for name in batches}
    rng = numpy.random.RandomState(1000 + seed + comm.rank)
    # A short timeout where a stall is expected; a generous one where none
    # is, so that a slow machine cannot fail the control runs.
    with stall_raises(1.0 if mutated else 30.0) as policy:
        try:
            results = _run(links, inputs,
                           mutation if comm.rank in mutated else None, rng)
            outcome = 'ok'
        except InconsistentInputError as e:
            outcome, message = 'inconsistent', str(e)
        except multinode_bn.StallError as e:
            outcome, message = 'stall', str(e)
    everyone = comm.allgather(outcome)
    if not mutated:
        assert set(everyone) == {'ok'}, everyone
        offset, n = split_sizes(sizes, comm.rank)
        for name in ('a', 'b', 'c'):
            xs = [x for x, _ in batches[name]]
            gys = [g for _, g in batches[name]]
            ref = reference(xs, gys, CHANNELS[name])
            y, gx = results[name]
            ours = type(ref)(y, gx, None, None, links[name].avg_mean,
                             links[name].avg_var)
            assert_matches_reference(ours, ref, offset, n, comm.size, 1e-9,
                                     1e-9, params=False)
        return
    # Someone diverged: every process raises, none goes on silently.
    with on_every_rank():
        assert 'ok' not in everyone, (mutation, mutated, everyone)
        if outcome == 'stall':
            assert "/" in message and 'call' in message
            assert 'waited' in policy.stream.getvalue()
