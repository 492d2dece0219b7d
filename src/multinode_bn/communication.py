"""The only module that knows communicators.

A communicator handed to :mod:`multinode_bn` is either a ChainerMN
communicator (``chainermn.create_communicator(...)``) or a plain
``mpi4py.MPI.Comm`` (``MPI.COMM_WORLD``, a ``Split`` sub-communicator, ...).
This module turns it into a *statistics exchange*: an object that allreduces
the small per-channel buffers of :mod:`multinode_bn.statistics` and nothing
else. Every collective call of the package is in this file.

Two exchanges exist:

* :class:`MpiStatsExchange` moves host buffers with mpi4py. Moments are
  combined by a user-defined MPI operation applying
  :func:`~multinode_bn.statistics.merge_moments` per channel, so the merge is
  numerically stable whatever the mean; CuPy buffers are staged through host
  memory (the buffers are O(channels), not O(batch)).
* :class:`NcclStatsExchange` allreduces device buffers with the NCCL
  communicator of ChainerMN's ``PureNcclCommunicator`` on the current stream,
  in buffers allocated once per link and reused.
"""

import numpy

from multinode_bn import statistics

BACKENDS = ('mpi', 'nccl', 'auto')


def _mpi():
    # Imported late: ``import multinode_bn`` must not initialize MPI.
    from mpi4py import MPI
    return MPI


def is_nccl_communicator(comm):
    """Whether ``comm`` is ChainerMN's ``PureNcclCommunicator``."""
    try:
        from chainermn.communicators.pure_nccl_communicator import \
            PureNcclCommunicator
    except ImportError:  # pragma: no cover - chainermn ships with chainer
        return False
    return isinstance(comm, PureNcclCommunicator)


def mpi_comm_of(comm):
    """The ``mpi4py`` communicator behind ``comm``.

    Raises:
        TypeError: ``comm`` is neither an ``mpi4py.MPI.Comm`` nor a ChainerMN
            communicator.
    """
    MPI = _mpi()
    if isinstance(comm, MPI.Comm):
        return comm
    inner = getattr(comm, 'mpi_comm', None)
    if isinstance(inner, MPI.Comm):
        return inner
    raise TypeError(
        'comm must be a ChainerMN communicator (chainermn.create_communicator)'
        ' or an mpi4py.MPI.Comm such as MPI.COMM_WORLD; got {!r}'.format(
            type(comm)))


def select_backend(comm, communication_backend='auto'):
    """Resolves ``'auto'`` and checks that ``comm`` supports the backend.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.

    Returns:
        str: ``'mpi'`` or ``'nccl'``.

    Raises:
        ValueError: Unknown backend name, or ``'nccl'`` with a communicator
            that has no NCCL.
    """
    if communication_backend not in BACKENDS:
        raise ValueError(
            'communication_backend must be one of {}; got {!r}'.format(
                ', '.join(repr(b) for b in BACKENDS), communication_backend))
    nccl = is_nccl_communicator(comm)
    if communication_backend == 'nccl' and not nccl:
        raise ValueError(
            "communication_backend='nccl' needs ChainerMN's "
            "PureNcclCommunicator (chainermn.create_communicator('pure_nccl'))"
            "; got {}. Use 'mpi' or 'auto'.".format(type(comm).__name__))
    if communication_backend == 'auto':
        return 'nccl' if nccl else 'mpi'
    return communication_backend


def create_exchange(comm, backend):
    """A statistics exchange for ``comm`` over ``backend`` (``'mpi'``/``'nccl'``)."""
    if backend == 'nccl':
        return NcclStatsExchange(comm)
    return MpiStatsExchange(comm)


def _merge_moments_op(inbuf, inoutbuf, datatype):
    a = numpy.frombuffer(inbuf, dtype=numpy.float64).reshape(-1, 3)
    b = numpy.frombuffer(inoutbuf, dtype=numpy.float64).reshape(-1, 3)
    statistics.merge_moments(numpy, a, b, out=b)


class _MpiHandles(object):
    """The MPI datatype and operation for moments, created on first use."""

    triple = None
    merge = None

    @classmethod
    def get(cls):
        if cls.merge is None:
            MPI = _mpi()
            # One element is a whole (count, mean, m2) triple, so MPI never
            # splits a triple when it segments a large buffer.
            cls.triple = MPI.DOUBLE.Create_contiguous(3).Commit()
            cls.merge = MPI.Op.Create(_merge_moments_op, commute=True)
        return cls.triple, cls.merge


class MpiStatsExchange(object):
    """Exchanges statistics over MPI.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``. Kept as given;
            a copy of the owning link shares it.
    """

    backend = 'mpi'

    def __init__(self, comm):
        self.comm = comm
        self.mpi_comm = mpi_comm_of(comm)
        self.size = self.mpi_comm.Get_size()
        self.rank = self.mpi_comm.Get_rank()

    def __deepcopy__(self, memo):
        # A communicator is a process-wide resource: copies share it.
        return self

    def allreduce_moments(self, moments):
        """Global ``(count, mean, m2)`` per channel, from a ``(C, 3)`` float64 array."""
        if self.size == 1:
            return moments
        host = _to_host(moments)
        triple, merge = _MpiHandles.get()
        out = numpy.empty_like(host)
        self.mpi_comm.Allreduce([host, host.shape[0], triple],
                                [out, out.shape[0], triple], op=merge)
        return _like(moments, out)

    def allreduce_sum(self, buf):
        """Elementwise sum over ranks of a float64 array."""
        if self.size == 1:
            return buf
        host = numpy.ascontiguousarray(_to_host(buf), dtype=numpy.float64)
        out = numpy.empty_like(host)
        self.mpi_comm.Allreduce(host, out, op=_mpi().SUM)
        return _like(buf, out)


class NcclStatsExchange(object):
    """Exchanges statistics with NCCL on the current CUDA stream.

    Moments travel as ``(count, sum, sum of squares)`` sums in float64
    (NCCL has no user-defined reductions); see
    :func:`~multinode_bn.statistics.moments_to_sums` for the precision this
    keeps. Device buffers are allocated once per buffer size and reused.
    """

    backend = 'nccl'

    def __init__(self, comm):
        if not is_nccl_communicator(comm):
            raise ValueError('NcclStatsExchange needs a PureNcclCommunicator')
        self.comm = comm
        self.mpi_comm = mpi_comm_of(comm)
        self.size = self.mpi_comm.Get_size()
        self.rank = self.mpi_comm.Get_rank()
        self._buffers = {}

    def __deepcopy__(self, memo):
        return self

    def _buffer(self, n):
        import cupy
        buf = self._buffers.get(n)
        if buf is None or buf.device.id != cupy.cuda.Device().id:
            buf = cupy.empty(n, dtype=numpy.float64)
            self._buffers[n] = buf
        return buf

    def _allreduce_device(self, arr):
        import cupy
        from cupy.cuda import nccl
        self.comm._init_comms()
        buf = self._buffer(arr.size)
        buf[...] = arr.ravel()
        stream = cupy.cuda.get_current_stream()
        self.comm.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                      nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                      stream.ptr)
        return buf.reshape(arr.shape).copy()

    def allreduce_moments(self, moments):
        if self.size == 1:
            return moments
        import cupy
        sums = statistics.moments_to_sums(cupy, cupy.asarray(moments))
        return statistics.sums_to_moments(cupy, self._allreduce_device(sums))

    def allreduce_sum(self, buf):
        if self.size == 1:
            return buf
        import cupy
        return self._allreduce_device(cupy.asarray(buf, dtype=numpy.float64))


def _to_host(a):
    if isinstance(a, numpy.ndarray):
        return numpy.ascontiguousarray(a)
    return a.get()


def _like(reference, host):
    if isinstance(reference, numpy.ndarray):
        return host
    import cupy
    return cupy.asarray(host)
