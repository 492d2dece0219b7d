"""The GPU code paths: on a GPU where there is one, as far as a CPU allows
elsewhere.

Without a GPU this checks that the package imports without CuPy, the backend
selection with a ``PureNcclCommunicator`` subclass that needs no GPU, and
the NCCL exchange's buffer handling against a fake ``cupy`` module and a
fake NCCL communicator that record what the exchange asks of them (which
buffer, which stream, what is returned; not NCCL or CUDA). The statistics on
CuPy are checked by ``tests/test_statistics.py`` (marked ``gpu``) and the
link on a GPU below; both are skipped without CuPy and a device.
"""

import ctypes
import os
import subprocess
import sys
import types

import numpy
import pytest

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn import validation

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))

BLOCK_IMPORTS = r'''
import sys
class _Block(object):
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block({names!r}))
'''


def _run_python(code, blocked):
    script = BLOCK_IMPORTS.format(names=tuple(blocked)) + code
    environ = dict(os.environ)
    environ['PYTHONPATH'] = os.path.join(ROOT, 'src') + os.pathsep + \
        environ.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, '-c', script],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=environ, cwd=ROOT,
                          timeout=120)


def test_package_imports_without_cupy():
    proc = _run_python(
        'import multinode_bn\n'
        'import multinode_bn.statistics, multinode_bn.communication\n'
        'assert "cupy" not in sys.modules\n'
        'print("ok")\n', blocked=['cupy'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')


def test_statistics_layer_imports_without_chainer_or_mpi():
    # The statistics math and its CPU fast path know neither Chainer nor
    # MPI: they can be checked on a machine with CuPy but no Chainer.
    proc = _run_python(
        'import importlib.util, os\n'
        'spec = importlib.util.spec_from_file_location("multinode_bn", '
        'os.path.join("src", "multinode_bn", "__init__.py"), '
        'submodule_search_locations=[os.path.join("src", "multinode_bn")])\n'
        'pkg = importlib.util.module_from_spec(spec)\n'
        'sys.modules["multinode_bn"] = pkg\n'
        'import multinode_bn.statistics, multinode_bn.cpu_kernels\n'
        'assert not {"chainer", "mpi4py", "cupy"} & set(sys.modules)\n'
        'print("ok")\n', blocked=['chainer', 'chainermn', 'cupy', 'mpi4py'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')


# --------------------------------------------------------------------------
# Backend selection


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


def test_pure_nccl_communicator_gets_the_nccl_exchange():
    from mpi4py import MPI
    import multinode_bn
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
    from mpi4py import MPI
    import multinode_bn
    fake = _fake_nccl_class()(MPI.COMM_WORLD)
    link = multinode_bn.MultiNodeBatchNormalization(3, fake)
    x = numpy.zeros((4, 3), numpy.float32)
    with pytest.raises(multinode_bn.InconsistentInputError,
                       match='needs CuPy arrays on a GPU'):
        link(x)


def test_small_eps_trains_where_cudnn_is_available(monkeypatch):
    # Chainer's BatchNormalization node refuses eps < 1e-5 whenever cuDNN
    # is available; the synchronized node never uses cuDNN.
    import chainer
    import chainer.functions as F
    from chainer.functions.normalization import batch_normalization as bn
    from mpi4py import MPI
    import multinode_bn
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


# --------------------------------------------------------------------------
# The NCCL exchange's buffers, against a fake cupy


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


def test_host_copies_wait_for_the_current_stream(fake_cupy):
    # A user's non-blocking stream: the copy is queued on it and waited
    # for, instead of a plain get() on the default stream.
    fake_cupy.stream_ptr = 99
    device = fake_cupy.asarray(numpy.arange(3.0))
    host = communication.to_host(device)
    assert type(host) is numpy.ndarray
    numpy.testing.assert_array_equal(host, numpy.arange(3.0))
    assert _FakeCupy.events == [('get', 99), ('synchronize', 99)]
    back = communication._like(device, host * 2)
    numpy.testing.assert_array_equal(back, 2 * numpy.arange(3.0))
    assert _FakeCupy.events[-1] == ('set', 99)


def test_mpi_exchange_of_device_sums_copies_on_the_current_stream(
        fake_cupy):
    from mpi4py import MPI
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
    from mpi4py import MPI
    fake_comm = _fake_nccl_class()(MPI.COMM_WORLD, _FakeNcclComm(ranks))
    exchange = communication.NcclStatsExchange(fake_comm)
    # Two identical processes, as far as the exchange can tell.
    exchange.size = ranks
    exchange._own = _FakeMpiComm(ranks)
    exchange.width = validation.TAG_LEN + 1 + 2 * channels
    return exchange, fake_comm


TAG = validation.exchange_tag(validation.exchange_digest('test'))


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


# --------------------------------------------------------------------------
# On a real GPU (skipped elsewhere)


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
    import chainer
    import chainer.links as L
    from mpi4py import MPI
    import multinode_bn
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
    import chainer
    import chainer.functions as F
    import chainer.links as L
    import chainermn
    from mpi4py import MPI
    import multinode_bn
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
    problems = []
    for name, a, b in [('y', ours[0], ref[0][start:start + len(x_mine)]),
                       ('gx', ours[1], ref[1][start:start + len(x_mine)]),
                       ('ggamma', world.allreduce(ours[2]), ref[2]),
                       ('avg_var', ours[3], ref[3])]:
        if not numpy.allclose(a, b, rtol=1e-3, atol=1e-3):
            problems.append('{}: max error {}'.format(
                name, numpy.abs(a - b).max()))
    everyone = world.allgather(problems)
    assert not any(everyone), everyone
