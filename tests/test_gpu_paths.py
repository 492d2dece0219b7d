"""The GPU code paths, checked as far as a machine without a GPU allows.

What runs here, and what it shows:

* imports: ``multinode_bn`` and ``multinode_bn.cuda_kernels`` import without
  CuPy, and the statistics layer without Chainer;
* backend selection with a ``PureNcclCommunicator`` subclass that needs no
  GPU;
* the NCCL exchange's buffer handling, against a fake ``cupy`` module and a
  fake NCCL communicator that record what the exchange asks of them (this
  checks the exchange's bookkeeping: which buffer, which stream, what is
  returned; not NCCL or CUDA);
* the CUDA source: compiled with ``nvcc`` for every dtype pair (when nvcc is
  installed), and *executed on the CPU*: the same source text is compiled
  with g++ with one OS thread per CUDA thread and a barrier for
  ``__syncthreads``, behind a fake ``cupy`` module, so that the Python
  wrappers, their launch configurations and argument types, the kernels'
  indexing and reductions are all run and compared with float64 NumPy (by
  the checks of ``benchmarks/gpu_check.py``). What this cannot show: warp
  scheduling, the memory model of a real GPU, the PTX float16 conversions
  (the emulation uses the source's host fallbacks), NVRTC itself, speed.
* ``benchmarks/gpu_check.py`` without a GPU says so and exits with its own
  status.

Tests that need CuPy and a GPU are skipped here, with the reason.
"""

import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import numpy
import pytest

from multinode_bn import communication
from multinode_bn import cuda_kernels
from multinode_bn import statistics
from multinode_bn import validation

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
GPU_CHECK = os.path.join(ROOT, 'benchmarks', 'gpu_check.py')

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


def _run_python(code, blocked, env=None, args=()):
    script = BLOCK_IMPORTS.format(names=tuple(blocked)) + code
    environ = dict(os.environ)
    environ['PYTHONPATH'] = os.path.join(ROOT, 'src') + os.pathsep + \
        environ.get('PYTHONPATH', '')
    environ.update(env or {})
    return subprocess.run([sys.executable, '-c', script] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=environ, cwd=ROOT,
                          timeout=120)


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------
# Imports


def test_package_and_kernels_import_without_cupy():
    proc = _run_python(
        'import multinode_bn, multinode_bn.cuda_kernels as ck\n'
        'import multinode_bn.statistics, multinode_bn.communication\n'
        'assert "cupy" not in sys.modules\n'
        'assert ck.enabled()\n'
        'print("ok")\n', blocked=['cupy'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')


def test_statistics_layer_imports_without_chainer():
    # The package __init__ imports Chainer; gpu_check loads the two
    # Chainer-free modules without it, as on a GPU machine without Chainer.
    proc = _run_python(
        'sys.path.insert(0, "benchmarks")\n'
        'import gpu_check\n'
        'st, ck = gpu_check.load_statistics_layer()\n'
        'assert "chainer" not in sys.modules and "cupy" not in sys.modules\n'
        'assert st.reduced_view and ck.local_moments\n'
        'print("ok")\n', blocked=['chainer', 'chainermn', 'cupy'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')


def test_gpu_check_without_gpu_exits_with_its_own_status():
    proc = _run_python(
        'sys.argv = ["gpu_check.py"]\n'
        'sys.path.insert(0, "benchmarks")\n'
        'import gpu_check\n'
        'sys.exit(gpu_check.main())\n', blocked=['cupy', 'chainer'])
    assert proc.returncode == 3, proc.stdout
    assert 'No GPU available' in proc.stdout
    assert 'cupy' in proc.stdout.lower()


def test_kernels_disabled_by_environment(monkeypatch):
    monkeypatch.setenv('MULTINODE_BN_CUDA_KERNELS', '0')
    assert not cuda_kernels.enabled()
    monkeypatch.setenv('MULTINODE_BN_CUDA_KERNELS', '1')
    assert cuda_kernels.enabled()


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


class _FakeCupy(types.ModuleType):
    """Just what ``NcclStatsExchange`` uses, with every device allocation,
    host copy and stream recorded."""

    current_device = 0

    def __init__(self):
        super().__init__('cupy')
        self.allocations = []
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
        a = self._wrap(numpy.empty(shape, dtype))
        self.allocations.append(a)
        return a

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
    return fake


def _nccl_exchange(ranks=2):
    from mpi4py import MPI
    fake_comm = _fake_nccl_class()(MPI.COMM_WORLD, _FakeNcclComm(ranks))
    exchange = communication.NcclStatsExchange(fake_comm)
    # Two identical processes, as far as the exchange can tell.
    exchange.size = ranks
    exchange.mpi_comm = _FakeMpiComm(ranks)
    return exchange, fake_comm


def test_nccl_sum_reuses_one_buffer_on_the_current_stream(fake_cupy):
    exchange, comm = _nccl_exchange()
    sums = fake_cupy.asarray(numpy.arange(6.0).reshape(2, 3))
    first = exchange.allreduce_sum(sums)
    allocated = len(fake_cupy.allocations)
    second = exchange.allreduce_sum(sums)
    calls = comm.nccl_comm.calls
    assert len(calls) == 2
    assert calls[0]['recv'] == calls[1]['recv'] == calls[0]['send']
    assert all(c['stream'] == fake_cupy.stream_ptr for c in calls)
    assert all(c['count'] == 6 for c in calls)
    assert len(fake_cupy.allocations) == allocated  # nothing new
    numpy.testing.assert_array_equal(first, 2 * numpy.arange(6.0).reshape(
        2, 3))
    # The result may outlive the next exchange (AllreduceSum keeps it).
    assert first.ctypes.data != calls[0]['recv']
    numpy.testing.assert_array_equal(first, second)
    assert fake_cupy.host_copies == 0
    assert comm.init_calls == 2


def test_nccl_buffers_are_per_size_and_per_device(fake_cupy):
    exchange, comm = _nccl_exchange()
    exchange.allreduce_sum(fake_cupy.asarray(numpy.ones((2, 3))))
    exchange.allreduce_sum(fake_cupy.asarray(numpy.ones((2, 5))))
    ptrs = [c['recv'] for c in comm.nccl_comm.calls]
    assert ptrs[0] != ptrs[1]
    _FakeCupy.current_device = 1
    exchange.allreduce_sum(fake_cupy.asarray(numpy.ones((2, 3))))
    assert comm.nccl_comm.calls[-1]['recv'] not in ptrs
    assert len(fake_cupy.allocations) == 3


def test_nccl_moments_merge_like_the_concatenated_batch(fake_cupy):
    exchange, comm = _nccl_exchange()
    rng = numpy.random.RandomState(0)
    host = numpy.stack([numpy.full(4, 5.0), rng.standard_normal(4),
                        rng.uniform(1, 2, 4)], axis=1)
    header = validation.inband_header((11, 22), validation.OK)
    merged, summed = exchange.allreduce_moments(fake_cupy.asarray(host),
                                                header)
    # Two identical batches: twice the count and m2, the same mean.
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 0], 10.0)
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 1], host[:, 1],
                                  rtol=1e-12)
    numpy.testing.assert_allclose(numpy.asarray(merged)[:, 2],
                                  2 * host[:, 2], rtol=1e-10)
    assert validation.inband_agrees(numpy.asarray(summed))
    numpy.testing.assert_array_equal(numpy.asarray(summed), 2 * header)


def test_nccl_forward_needs_no_device_to_host_copy(fake_cupy):
    exchange, comm = _nccl_exchange()
    host = numpy.tile([[5.0, 0.5, 2.0]], (4, 1))
    header = validation.inband_header((11, 22), validation.OK)
    exchange.allreduce_moments(fake_cupy.asarray(host), header)
    assert fake_cupy.host_copies == 0
    assert exchange.mpi_comm.calls == ['Iallreduce']
    # The NCCL buffer holds the moments only, of a size fixed per link.
    assert [c['count'] for c in comm.nccl_comm.calls] == [12]


def test_nccl_disagreeing_header_skips_the_device_collective(fake_cupy):
    exchange, comm = _nccl_exchange()
    header = validation.inband_header((11, 22), validation.OK)

    class Disagreeing(_FakeMpiComm):
        def Iallreduce(self, send, recv, op=None):
            recv[...] = numpy.asarray(send) * 2
            recv[1] += 1  # another process had another signature
            return types.SimpleNamespace(Test=lambda: True)

    exchange.mpi_comm = Disagreeing()
    host = numpy.tile([[5.0, 0.5, 2.0]], (4, 1))
    _, summed = exchange.allreduce_moments(fake_cupy.asarray(host), header)
    assert not validation.inband_agrees(summed)
    assert comm.nccl_comm.calls == []


# --------------------------------------------------------------------------
# The CUDA source: nvcc


DTYPE_PAIRS = [('float16', 'float32'), ('float32', 'float32'),
               ('float64', 'float64'), ('float16', 'float64'),
               ('float32', 'float64')]


@pytest.mark.skipif(shutil.which('nvcc') is None,
                    reason='nvcc is not installed: the CUDA source is not '
                    'compiled here')
def test_cuda_source_compiles_with_nvcc(tmp_path):
    procs = []
    for in_dtype, acc_dtype in DTYPE_PAIRS:
        src = tmp_path / 'k_{}_{}.cu'.format(in_dtype, acc_dtype)
        src.write_text(cuda_kernels.source_for(in_dtype, acc_dtype))
        procs.append((src, subprocess.Popen(
            ['nvcc', '-c', '-arch=sm_80', '-Werror', 'all-warnings',
             str(src), '-o', str(src.with_suffix('.o'))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)))
    for src, proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, '{}:\n{}'.format(src.name, out)


def test_source_declares_every_kernel_the_wrappers_launch():
    text = cuda_kernels.source_for('float32', 'float32')
    declared = set(re.findall(r'extern "C" __global__ void (\w+)\(', text))
    assert declared == set(cuda_kernels.KERNEL_NAMES)


def test_source_rejects_float16_accumulation():
    with pytest.raises(ValueError):
        cuda_kernels.source_for('float16', 'float16')


# --------------------------------------------------------------------------
# The CUDA source, executed on the CPU


EMULATION_HEADER = r'''
// CPU emulation of the CUDA features the kernels use: one OS thread per
// CUDA thread of a block, blocks one after another, __syncthreads() a
// barrier of the block's threads, __shared__ a static (one block at a time).
#include <barrier>
#include <thread>
#include <vector>
struct dim3 { unsigned int x, y, z; };
static thread_local dim3 threadIdx;
static thread_local dim3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;
static std::barrier<>* mnbn_emu_barrier;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() mnbn_emu_barrier->arrive_and_wait()

template <class F>
static void mnbn_emu_run(unsigned gx, unsigned gy, unsigned bx, F f) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    std::barrier<> bar(bx);
    mnbn_emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < bx; ++t) {
        threads.emplace_back([&, t]() {
            threadIdx = {t, 0, 0};
            for (unsigned y = 0; y < gy; ++y) {
                for (unsigned x = 0; x < gx; ++x) {
                    blockIdx = {x, y, 0};
                    f();
                    bar.arrive_and_wait();
                }
            }
        });
    }
    for (auto& th : threads) {
        th.join();
    }
}
'''

_KERNEL_DECL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')
_TYPEDEF = re.compile(r'typedef (\w+) (in_t|acc_t);')
_C_TO_DTYPE = {'half_t': 'float16', 'float': 'float32', 'double': 'float64',
               'Triple': 'float64', 'Pair': 'float64'}


def _parse_params(params):
    out = []
    for p in params.split(','):
        p = ' '.join(p.split())
        name = re.findall(r'(\w+)$', p)[0]
        out.append(p[:-len(name)].strip())
    return out


def _compile_emulation(code, cache_dir):
    decls = [(name, _parse_params(params))
             for name, params in _KERNEL_DECL.findall(code)]
    trampolines = []
    for name, types_ in decls:
        args = ', '.join('*({}*)args[{}]'.format(t, i)
                         for i, t in enumerate(types_))
        trampolines.append(
            'extern "C" void emu_{0}(unsigned gx, unsigned gy, unsigned bx,'
            ' void** args) {{\n    mnbn_emu_run(gx, gy, bx, [&]() {{ {0}({1});'
            ' }});\n}}\n'.format(name, args))
    text = EMULATION_HEADER + code + '\n' + '\n'.join(trampolines)
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    lib = os.path.join(cache_dir, 'emu_{}.so'.format(digest))
    if not os.path.exists(lib):
        src = os.path.join(cache_dir, 'emu_{}.cpp'.format(digest))
        with open(src, 'w') as f:
            f.write(text)
        proc = subprocess.run(
            ['g++', '-std=c++20', '-O1', '-g', '-shared', '-fPIC',
             '-pthread', '-Wall', '-Werror', '-Wno-unused-function',
             '-Wno-unused-parameter', src, '-o', lib],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
        assert proc.returncode == 0, proc.stdout
    typedefs = dict((k, v) for v, k in _TYPEDEF.findall(code))
    return ctypes.CDLL(lib), dict(decls), typedefs


class _EmulatedKernel(object):
    """A ``cupy.RawKernel`` whose launch runs the emulated kernel.

    Checks what CuPy cannot: every argument's C type against the kernel's
    declaration (arrays for pointers, of the declared dtype and C-contiguous;
    ``numpy.int64`` for ``long long``, ``numpy.int32`` for ``int``), and
    guards every array with NaN-filled bytes on both sides that must be
    unchanged after the launch (no write out of bounds; an out-of-bounds
    read sees NaN and spoils the result).
    """

    GUARD = 512

    def __init__(self, lib, name, params, typedefs, launches):
        self.fn = getattr(lib, 'emu_' + name)
        self.fn.restype = None
        self.name = name
        self.params = params
        self.typedefs = typedefs
        self.launches = launches

    def _dtype(self, ctype):
        base = ctype.replace('const', '').replace('*', '').strip()
        base = self.typedefs.get(base, base)
        return numpy.dtype(_C_TO_DTYPE[base])

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        assert len(args) == len(self.params), (self.name, args)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert len(block) == 1 and grid[2] == 1
        assert 0 < grid[0] < 2 ** 31 and 0 < grid[1] < 65536, grid
        assert 0 < block[0] <= 1024
        self.launches.append((self.name, grid[:2], block[0]))
        holders, guarded = [], []
        for value, ctype in zip(args, self.params):
            if '*' in ctype:
                assert isinstance(value, numpy.ndarray), (self.name, ctype)
                assert value.dtype == self._dtype(ctype), (
                    self.name, ctype, value.dtype)
                assert value.flags.c_contiguous, (self.name, ctype)
                raw = numpy.full(value.nbytes + 2 * self.GUARD, 0xFF,
                                 numpy.uint8)
                raw[self.GUARD:self.GUARD + value.nbytes] = \
                    value.reshape(-1).view(numpy.uint8)
                guarded.append((value, raw))
                holders.append(ctypes.c_void_p(raw.ctypes.data + self.GUARD))
            elif ctype == 'long long':
                assert type(value) is numpy.int64, (self.name, ctype, value)
                holders.append(ctypes.c_longlong(int(value)))
            elif ctype == 'int':
                assert type(value) is numpy.int32, (self.name, ctype, value)
                holders.append(ctypes.c_int(int(value)))
            else:
                raise AssertionError('unexpected parameter type ' + ctype)
        pointers = (ctypes.c_void_p * len(holders))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p)
              for h in holders])
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]),
                ctypes.c_uint(block[0]), pointers)
        for value, raw in guarded:
            assert (raw[:self.GUARD] == 0xFF).all() and \
                (raw[-self.GUARD:] == 0xFF).all(), (
                    '{} wrote out of bounds'.format(self.name))
            value.reshape(-1).view(numpy.uint8)[...] = \
                raw[self.GUARD:self.GUARD + value.nbytes]


class _EmulatedCupy(types.ModuleType):
    """CuPy as far as ``cuda_kernels`` and ``gpu_check``'s kernel checks
    use it, over NumPy arrays, with ``RawModule`` compiled for the CPU."""

    def __init__(self, cache_dir, sm_count=1):
        super().__init__('cupy')
        self.launches = []
        self.sources = []
        fake = self

        class Device(object):
            id = 0
            attributes = {'MultiProcessorCount': sm_count}

            def synchronize(self):
                pass

        class RawModule(object):
            def __init__(self, code, options=(), **kwargs):
                fake.sources.append(code)
                self.lib, self.decls, self.typedefs = _compile_emulation(
                    code, cache_dir)

            def get_function(self, name):
                return _EmulatedKernel(self.lib, name, self.decls[name],
                                       self.typedefs, fake.launches)

        self.cuda = types.SimpleNamespace(Device=Device)
        self.RawModule = RawModule

    def __getattr__(self, name):
        return getattr(numpy, name)

    def asnumpy(self, a):
        return numpy.asarray(a)


_EMULATION_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cxx20_barrier_available():
    if shutil.which('g++') is None:
        return False
    probe = '#include <barrier>\nint main() { std::barrier<> b(1); ' \
            'b.arrive_and_wait(); }\n'
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, 'probe.cpp')
        with open(src, 'w') as f:
            f.write(probe)
        proc = subprocess.run(['g++', '-std=c++20', '-pthread', src, '-o',
                               os.path.join(d, 'probe')],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return proc.returncode == 0


@pytest.fixture(scope='module')
def emulation_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cuda_emulation'))


@pytest.fixture
def emulated(monkeypatch, emulation_dir):
    """``cuda_kernels`` running on the emulated device."""
    if not _cxx20_barrier_available():
        pytest.skip('no g++ with C++20 <barrier>: the CUDA source cannot be '
                    'run on the CPU here')

    def make(sm_count=1):
        fake = _EmulatedCupy(emulation_dir, sm_count)
        monkeypatch.setattr(cuda_kernels, '_cupy', lambda: fake)
        monkeypatch.setattr(cuda_kernels, '_modules', {})
        monkeypatch.setattr(cuda_kernels, '_sm_counts', {})
        return fake
    return make


def test_emulated_kernels_pass_every_gpu_check(emulated):
    """The kernel section of ``benchmarks/gpu_check.py``, on the emulator:
    four kernels for every layout and dtype pair against float64 NumPy,
    the ``1e4 + N(0, 1)`` stability case, an outlier first value, NaN,
    empty and non-contiguous inputs, bit-reproducibility."""
    fake = emulated(sm_count=1)
    gpu_check = _load_gpu_check()
    report = gpu_check.Report()
    with _EMULATION_LOCK:
        gpu_check.kernel_checks(fake, cuda_kernels, statistics, report,
                                quick=False, timing=False)
    table = report.table()
    assert not report.failed(), table
    assert len(report.rows) >= 40, table
    launched = set(name for name, _, _ in fake.launches)
    assert launched == set(cuda_kernels.KERNEL_NAMES)


@pytest.mark.parametrize('sm_count', [1, 3, 40])
@pytest.mark.parametrize('shape,axis', [
    ((3, 5, 1000), (0, 2)),     # wide, several blocks per channel
    ((2000, 7), (0,)),          # narrow, many row blocks
    ((40, 300, 2), (0, 2)),     # narrow, two column tiles
    ((1, 2, 4097), (0, 2)),     # wide, one sample
])
def test_emulated_grids_do_not_change_the_result(emulated, sm_count, shape,
                                                 axis):
    """Other device sizes give other grids (blocks per channel, row
    splits); every grid must give the reference moments and sums."""
    fake = emulated(sm_count=sm_count)
    rng = numpy.random.RandomState(sm_count)
    x = (3.0 + rng.standard_normal(shape)).astype(numpy.float32)
    gy = rng.standard_normal(shape).astype(numpy.float32)
    x3 = statistics.reduced_view(x, axis)
    gy3 = statistics.reduced_view(gy, axis)
    with _EMULATION_LOCK:
        moments, _, _ = cuda_kernels.local_moments(x3, numpy.float32)
        mean = moments[:, 1]
        sums, _, _ = cuda_kernels.backward_sums(gy3, x3, mean,
                                                numpy.float32)
    x64 = x3.astype(numpy.float64)
    ref_mean = x64.mean(axis=(0, 2))
    ref_m2 = ((x64 - ref_mean[None, :, None]) ** 2).sum(axis=(0, 2))
    numpy.testing.assert_array_equal(moments[:, 0], x3.shape[0] * x3.shape[2])
    numpy.testing.assert_allclose(moments[:, 1], ref_mean, rtol=0, atol=1e-5)
    numpy.testing.assert_allclose(moments[:, 2], ref_m2, rtol=2e-5)
    gy64 = gy3.astype(numpy.float64)
    numpy.testing.assert_allclose(sums[0], gy64.sum(axis=(0, 2)), rtol=0,
                                  atol=1e-5 * numpy.abs(gy64).sum())
    ref_gyd = (gy64 * (x64 - mean[None, :, None])).sum(axis=(0, 2))
    numpy.testing.assert_allclose(sums[1], ref_gyd, rtol=0,
                                  atol=2e-5 * numpy.abs(gy64 * x64).sum())
    grids = set(grid for name, grid, _ in fake.launches
                if name.endswith(('_wide', '_narrow')))
    assert grids, fake.launches


@pytest.mark.parametrize('chunk', [1, 3])
def test_emulated_short_runs_keep_the_statistics(emulated, monkeypatch,
                                                 chunk):
    """Runs much shorter than a thread's share of values: every thread
    folds many runs (each with its own shift) into its float64 moments,
    the path long batches take. A large mean and an outlier first value
    must still give float64-reference moments."""
    monkeypatch.setattr(cuda_kernels, 'CHUNK', chunk)
    fake = emulated(sm_count=1)
    rng = numpy.random.RandomState(chunk)
    for shape, axis in (((8, 3, 256), (0, 2)), ((600, 3), (0,))):
        x = (1e4 + rng.standard_normal(shape)).astype(numpy.float32)
        gy = rng.standard_normal(shape).astype(numpy.float32)
        x3 = statistics.reduced_view(x, axis)
        gy3 = statistics.reduced_view(gy, axis)
        x3[0, 0, 0] = -3e4
        with _EMULATION_LOCK:
            moments, _, _ = cuda_kernels.local_moments(x3, numpy.float32)
            sums, _, _ = cuda_kernels.backward_sums(gy3, x3, moments[:, 1],
                                                    numpy.float32)
        x64 = x3.astype(numpy.float64)
        mean = x64.mean(axis=(0, 2))
        m2 = ((x64 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
        std = numpy.sqrt(m2 / (x3.shape[0] * x3.shape[2]))
        numpy.testing.assert_allclose(moments[:, 1], mean, rtol=0,
                                      atol=1e-6 * std.max())
        numpy.testing.assert_allclose(moments[:, 2], m2, rtol=1e-6)
        gyd = (gy3.astype(numpy.float64)
               * (x64 - moments[None, :, 1, None])).sum(axis=(0, 2))
        numpy.testing.assert_allclose(
            sums[1], gyd, rtol=0,
            atol=1e-6 * numpy.abs(gy3 * (x64 - mean[None, :, None])).sum())
    assert all('#define MNBN_CHUNK {}\n'.format(chunk) in src
               for src in fake.sources)


def test_emulated_float16_output_rounds_to_nearest(emulated):
    """The host fallback of the float16 store (the GPU uses ``cvt.rn``)
    rounds like NumPy, subnormals and overflow included."""
    emulated()
    values = numpy.array([0.0, -0.0, 1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11,
                          65504.0, 65520.0, 1e6, 2 ** -24, 2 ** -25,
                          3 * 2 ** -26, 6e-8, -2.5e-5, 0.1, -3.14159,
                          numpy.inf, -numpy.inf], numpy.float32)
    shift = numpy.zeros(1, numpy.float32)
    exact = values.astype(numpy.float16)
    centred = cuda_kernels.ShiftedInput(exact.reshape(-1, 1, 1), shift)
    with _EMULATION_LOCK:
        y = cuda_kernels.normalize_into(
            centred, shift, numpy.zeros(1), numpy.ones(1), numpy.ones(1),
            numpy.zeros(1))
    numpy.testing.assert_array_equal(y.ravel(), exact)
    # Scaling by 1 + 2**-12 makes values fall between float16 neighbours.
    scale = 1.0 + 2.0 ** -12
    with _EMULATION_LOCK:
        y = cuda_kernels.normalize_into(
            centred, shift, numpy.zeros(1), numpy.full(1, scale),
            numpy.ones(1), numpy.zeros(1))
    expected = (exact.astype(numpy.float32)
                * numpy.float32(scale)).astype(numpy.float16)
    numpy.testing.assert_array_equal(y.ravel(), expected)


# --------------------------------------------------------------------------
# On a real GPU (skipped here)


def _real_cupy():
    cupy = pytest.importorskip(
        'cupy', reason='CuPy is not installed: GPU kernels not checked')
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        pytest.skip('no CUDA device: {}'.format(e))
    if count < 1:
        pytest.skip('no CUDA device')
    return cupy


def test_gpu_kernels_pass_every_gpu_check():
    cupy = _real_cupy()
    gpu_check = _load_gpu_check()
    report = gpu_check.Report()
    gpu_check.kernel_checks(cupy, cuda_kernels, statistics, report,
                            quick=True, timing=False)
    assert not report.failed(), report.table()


def test_gpu_link_matches_float64_reference():
    cupy = _real_cupy()
    import chainer
    import chainer.links as L
    from mpi4py import MPI
    import multinode_bn
    rng = numpy.random.RandomState(0)
    x = (1e4 + rng.standard_normal((6, 8, 5, 5))).astype(numpy.float32)
    gy = rng.standard_normal(x.shape).astype(numpy.float32)
    link = multinode_bn.MultiNodeBatchNormalization(8, MPI.COMM_SELF)
    link.to_device('@cupy:0')
    xv = chainer.Variable(cupy.asarray(x))
    y = link(xv)
    y.grad = cupy.asarray(gy)
    y.backward()
    ref = L.BatchNormalization(8, dtype=numpy.float64)
    xr = chainer.Variable(x.astype(numpy.float64))
    yr = ref(xr)
    yr.grad = gy.astype(numpy.float64)
    yr.backward()
    numpy.testing.assert_allclose(cupy.asnumpy(y.array), yr.array,
                                  atol=1e-3)
    numpy.testing.assert_allclose(cupy.asnumpy(xv.grad), xr.grad, atol=1e-3)
    numpy.testing.assert_allclose(cupy.asnumpy(link.avg_var), ref.avg_var,
                                  rtol=1e-2)
