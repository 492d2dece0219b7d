"""Communicators and every collective of the package (docs/design.md).
``mpi4py`` is imported late: importing it initializes MPI."""

import collections
import math
import os
import sys
import threading
import time
import warnings
import weakref

import numpy

#: Seconds before a stalled exchange raises, as PyTorch's NCCL watchdog.
DEFAULT_ABORT_AFTER = 1800.0
# Never freed: collectives left in flight by a stall, with all they write to.
_ABANDONED = []


def is_nccl_communicator(comm):
    """Whether ``comm`` is ChainerMN's ``PureNcclCommunicator``."""
    from chainermn.communicators import pure_nccl_communicator
    return isinstance(comm, pure_nccl_communicator.PureNcclCommunicator)


def mpi_comm_of(comm):
    """The ``mpi4py`` communicator behind ``comm``; TypeError if none."""
    from mpi4py import MPI
    mpi_comm = getattr(comm, 'mpi_comm', comm)
    if isinstance(mpi_comm, MPI.Comm):
        return mpi_comm
    raise TypeError('comm must be a ChainerMN communicator or an mpi4py.MPI.'
                    'Comm such as MPI.COMM_WORLD; got {!r}'.format(type(comm)))


def select_backend(comm, communication_backend='auto'):
    """``'mpi'`` or ``'nccl'``, ``'auto'`` picking NCCL for ChainerMN's
    ``PureNcclCommunicator``; ValueError for a name it cannot serve."""
    backend = communication_backend
    if backend == 'auto':
        return 'nccl' if is_nccl_communicator(comm) else 'mpi'
    if backend == 'mpi' or (backend == 'nccl' and is_nccl_communicator(comm)):
        return backend
    raise ValueError("communication_backend must be 'mpi', 'auto', or 'nccl' "
                     "with ChainerMN's PureNcclCommunicator (chainermn.create_"
                     "communicator('pure_nccl')); got {!r} with {}".format(
                         backend, type(comm).__name__))


def create_exchange(comm, backend):
    """A statistics exchange for ``comm`` over ``'mpi'`` or ``'nccl'``."""
    return (NcclStatsExchange if backend == 'nccl' else MpiStatsExchange)(comm)


class StallError(RuntimeError):
    """An exchange did not complete in time; its link refuses further calls."""


class StallPolicy(collections.namedtuple(
        'StallPolicy', 'timeout action stream abort_after')):
    """When a process waiting in an exchange says so, and gives up.

    Args:
        timeout (float or None): Seconds before a waiting process prints
            one line naming the exchange; ``None`` or ``0``: never.
        action (str): At ``timeout``, ``'report'`` (print, keep waiting)
            or ``'raise'`` (print, raise :class:`StallError`).
        stream: Where the line goes (default ``sys.stderr``).
        abort_after (float or None): Seconds before :class:`StallError`
            whatever the action; ``0``: never; ``None``: the default.
    """

    def __new__(cls, timeout=60.0, action='report', stream=None,
                abort_after=None):
        if action not in ('report', 'raise'):
            raise ValueError(
                'action must be report or raise; got {!r}'.format(action))
        if abort_after is None:
            abort_after = DEFAULT_ABORT_AFTER
        return super(StallPolicy, cls).__new__(
            cls, cls._seconds('timeout', timeout), action, stream,
            cls._seconds('abort_after', abort_after))

    @staticmethod
    def _seconds(field, value):
        """``value`` in seconds, ``None`` for never (``None`` or 0)."""
        try:
            seconds = 0.0 if value is None else float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 <= seconds < math.inf:
            raise ValueError('{} must be a positive number of seconds, or 0 '
                             'or off for never; got {!r}'.format(field, value))
        return seconds or None

    @classmethod
    def from_environment(cls, environ=os.environ):
        """From ``MULTINODE_BN_STALL_TIMEOUT``, ``_ACTION`` and ``_ABORT``
        (``0`` or ``off``: never); invalid values warn and keep the default."""
        settings = {}
        for field, name in (('timeout', 'TIMEOUT'), ('action', 'ACTION'),
                            ('abort_after', 'ABORT')):
            raw = environ.get('MULTINODE_BN_STALL_' + name)
            if raw is None:
                continue
            value = raw.strip().lower()
            value = 0 if value in ('0', 'off', 'none', 'no') else value
            try:
                cls(**{field: value})
                settings[field] = value
            except ValueError as error:
                warnings.warn('MULTINODE_BN_STALL_{}={!r} is not valid ({}); '
                              'using the default.'.format(name, raw, error),
                              RuntimeWarning, stacklevel=2)
        return cls(**settings)


_stall_policy = StallPolicy.from_environment()


def set_stall_policy(timeout=60.0, action='report', stream=None,
                     abort_after=None):
    """Sets the :class:`StallPolicy`; returns the previous one."""
    global _stall_policy
    previous = _stall_policy
    _stall_policy = StallPolicy(timeout, action, stream, abort_after)
    return previous


def get_stall_policy():
    """The :class:`StallPolicy` in effect."""
    return _stall_policy


def wait(request, rank, describe, policy=None):
    """Completes a non-blocking collective, reporting a stall: spins on
    ``Test``, then yields the processor (to oversubscribed processes)."""
    for _ in range(2000):  # usually done in microseconds
        if request.Test():
            return
    policy = policy or _stall_policy
    start = time.monotonic()
    report_at = policy.timeout or math.inf
    while not request.Test():
        waited = time.monotonic() - start
        time.sleep(0.0002 if waited > 0.01 else 0)
        abort = policy.abort_after and waited > policy.abort_after
        if not abort and waited <= report_at:
            continue
        report_at = math.inf
        line = ('multinode_bn: rank {} has waited {:.0f} s in {}; the others '
                'have not joined. Likely causes: a process exited (`python -m '
                'mpi4py` would end the job); processes disagree on control '
                'flow (a link skipped, out of order, no backward); links on '
                'different communicators.'.format(rank, waited, describe()))
        if abort:
            line += ' Giving up; MULTINODE_BN_STALL_ABORT allows longer.'
        print(line, file=policy.stream or sys.stderr, flush=True)
        if abort or policy.action == 'raise':
            raise StallError(line)


class MpiStatsExchange(object):
    """A link's exchanges over MPI, all of :attr:`width` values on a
    communicator of their own: those of different links never pair, and no
    reduction meets buffers of different sizes.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``, kept as given.
    """

    def __init__(self, comm):
        self.comm = comm
        self.base_comm = mpi_comm_of(comm)
        self.size = self.base_comm.Get_size()
        self.rank = self.base_comm.Get_rank()
        self.width = None  # values per summed exchange, set by its owner
        self.stalled = None  # what stalled, once StallError was raised
        self._own = self._free = None
        self._owner = None  # a thread, not its ident, which may be reused
        self._owner_lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self  # a communicator is a process-wide resource

    def link_comm(self, describe):
        """The link's own duplicate of the communicator, made on first use."""
        if self._own is None:
            from mpi4py import MPI
            try:
                own, request = self.base_comm.Idup()
                self._wait(request, lambda: 'creation of the communicator '
                           'for the ' + describe(), own)
            except MPI.Exception as error:
                raise RuntimeError(
                    'multinode_bn: rank {}: no communicator for the {} ({}): '
                    'MPI allows a few thousand, one per live link that has '
                    'exchanged: keep fewer alive, or share one link between '
                    'copies of a model (copy.deepcopy shares it).'.format(
                        self.rank, describe(), error.Get_error_string()))
            self._own = own
            self._free = weakref.finalize(
                self, lambda: MPI.Is_finalized() or own.Free())
        return self._own

    def admit(self, describe):
        """Raises unless the calling thread may exchange: not after a stall,
        and only from the thread of the link's first call (two threads'
        exchanges would pair across processes in whatever order they come)."""
        if self.stalled:
            raise StallError('multinode_bn: rank {}: {} refused: {} stalled '
                             'and is still in flight. End the job.'.format(
                                 self.rank, describe(), self.stalled))
        thread = threading.current_thread()
        with self._owner_lock:
            self._owner = self._owner or thread
        if self._owner is not thread:
            raise RuntimeError(
                'multinode_bn: rank {}: {} called from thread {!r}; the link '
                'and its copies belong to {!r}, that of its first call. Give '
                'each thread links on a communicator of its own.'.format(
                    self.rank, describe(), thread.name, self._owner.name))

    def allreduce_sums(self, buf, tag, describe=str, proceed=None):
        """The sums over processes of ``buf`` (float64 NumPy or CuPy; like
        it) and of the host ``tag``, in one collective of :attr:`width`
        values. ``describe()`` names it in a stall report; ``proceed``, given
        the summed tag, says whether NCCL may run."""
        if self.size == 1:
            return buf, tag
        if self.width is None or len(tag) + buf.size > self.width:
            raise ValueError('exchange of {} values on a link whose exchanges '
                             'hold {}'.format(len(tag) + buf.size, self.width))
        return self._sum(buf, tag, describe, proceed)

    def _sum(self, buf, tag, describe, proceed):
        n = len(tag)
        send = numpy.concatenate([tag, to_host(buf).ravel(),
                                  numpy.zeros(self.width - n - buf.size)])
        out = self._host_sum(send, describe)
        sums = out[n:n + buf.size].reshape(buf.shape)
        if type(buf) is not numpy.ndarray:
            # Copied on the current stream, before the kernels queued after.
            import cupy
            host, sums = sums, cupy.empty(sums.shape)
            sums.set(host, stream=cupy.cuda.get_current_stream())
        return sums, out[:n]

    def allgather_record(self, record, describe=str):
        """Every process's int64 ``record``, ``(size, len(record))``; of
        one size everywhere, so it can neither truncate nor hang."""
        send = numpy.ascontiguousarray(record, dtype=numpy.int64)
        if self.size == 1:
            return send.reshape(1, -1).copy()
        out = numpy.empty((self.size, send.size), dtype=numpy.int64)
        request = self.link_comm(describe).Iallgather(send, out)
        self._wait(request, describe, send, out)
        return out

    def _host_sum(self, send, describe):
        out = numpy.empty_like(send)
        request = self.link_comm(describe).Iallreduce(send, out)
        self._wait(request, describe, send, out)
        return out

    def _wait(self, request, describe, *buffers):
        try:
            wait(request, self.rank, describe)
        except BaseException as error:
            _ABANDONED.append((request, buffers, self))
            if self._free is not None:  # not even at exit: still in use
                self._free.detach()
            self.stalled = '{} ({})'.format(describe(), type(error).__name__)
            raise


class NcclStatsExchange(MpiStatsExchange):
    """Sums statistics with NCCL on the current CUDA stream, if ``proceed``
    accepts their tags, summed over MPI first (docs/gpu.md).

    Args:
        comm: ChainerMN's ``PureNcclCommunicator``.
    """

    def __init__(self, comm):
        super(NcclStatsExchange, self).__init__(comm)
        self._buffers = {}

    def _sum(self, buf, tag, describe, proceed):
        summed_tag = self._host_sum(tag, describe)
        if proceed is not None and not proceed(summed_tag):
            return buf, summed_tag
        import cupy
        from cupy.cuda import nccl
        n = self.width - len(tag)
        stream = cupy.cuda.get_current_stream()
        # Per stream too: another stream's kernels may still read a buffer.
        key = (cupy.cuda.Device().id, stream.ptr, n)
        if key not in self._buffers:
            self._buffers[key] = cupy.empty(n, dtype=numpy.float64)
        summed = self._buffers[key]
        summed[:buf.size] = cupy.asarray(buf, dtype=numpy.float64).ravel()
        summed[buf.size:] = 0
        self.comm._init_comms()
        self.comm.nccl_comm.allReduce(summed.data.ptr, summed.data.ptr, n,
                                      nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                      stream.ptr)
        return summed[:buf.size].reshape(buf.shape).copy(), summed_tag


def to_host(a):
    """``a`` as a NumPy array, copied on the current stream once its
    kernels have run (``get()`` would not wait for a non-blocking one)."""
    if type(a) is numpy.ndarray:
        return numpy.ascontiguousarray(a)
    import cupy
    stream = cupy.cuda.get_current_stream()
    host = a.get(stream=stream)
    stream.synchronize()
    return host


def allgather_objects(comm, obj):
    """Every process's picklable ``obj`` over ``comm``, in rank order."""
    mpi_comm = mpi_comm_of(comm)
    return [obj] if mpi_comm.Get_size() == 1 else mpi_comm.allgather(obj)
