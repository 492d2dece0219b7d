"""The exchange protocol of one synchronized link: what it remembers so that
its exchanges pair up across processes, and only with each other.
"""

import collections
import functools
import itertools

import numpy

from chainer import backend
from chainer.functions.normalization import batch_normalization as _bn

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn import validation

# Each communicator's counter of first calls, by id, kept with it alive so
# that the id is never reused.
_first_calls = {}


class Call(collections.namedtuple('Call', (
        'number', 'record', 'config', 'identity'))):
    """One call of a link: its number, this process's input record (with
    the call's problem), the configuration every process must share
    (``(name, value)`` pairs), and what its exchanges share in identity."""


class LinkProtocol(object):
    """The exchanges of one synchronized link.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``.
        backend_name (str): ``'mpi'`` or ``'nccl'``.
    """

    def __init__(self, comm, backend_name):
        self.backend_name = backend_name
        self.exchange = communication.create_exchange(comm, backend_name)
        self.name = None  # the link's name in its parent, if any
        self._label = None
        self._number = None  # the order of its first synchronized call
        self.calls = 0
        self._records = {}
        self._sequence = 0  # of double backward exchanges
        # The previous global mean, shared by all processes.
        self._shift = None

    @property
    def label(self):
        """How reports and identities name the link: its path after
        :func:`~multinode_bn.create_mnbn_model` (or any label set),
        otherwise its name in its parent and its first-call number."""
        if self._label is not None:
            return self._label
        label = 'MultiNodeBatchNormalization' + (
            '' if self.name is None else " '{}'".format(self.name))
        if self._number is not None:
            label += ' #{}'.format(self._number)
        return label

    @label.setter
    def label(self, value):
        self._label = value

    def exchange_name(self, kind, call):
        """What an exchange is, in words, for stall and error reports."""
        return '{} exchange of {} (call {}, x {} {})'.format(
            kind, self.label, call.number, call.record.dtype,
            call.record.shape)

    def begin_call(self, x, gamma, beta, axis, config, running=(),
                   name=None):
        """Counts a call and checks its input (``running``: the statistics
        to update) on every process: by gathering records at the first call,
        later in the tag of its first exchange. A problem anywhere raises
        the same ``InconsistentInputError`` everywhere, before any output.
        Returns the :class:`Call` that the call's exchanges name."""
        self.exchange.admit(lambda: 'call of ' + self.label)
        self.calls += 1
        if name is not None:
            self.name = name
        arrays = [getattr(v, 'raw_array', v) for v in (x, gamma, beta)]
        # x.shape is the logical shape: a Variable in a memory layout
        # (channels last) holds its array in another axis order.
        key = ((tuple(x.shape), axis)
               + tuple((a.shape, a.dtype, type(a)) for a in arrays)
               + tuple(getattr(r, 'shape', None) for r in running))
        if key not in self._records:
            if len(self._records) > 64:
                self._records.clear()
            self._records[key] = self._record(tuple(x.shape), arrays, axis,
                                              running)
        record, agreeing = self._records[key]
        width = validation.TAG_LEN + 1 + 2 * arrays[1].size
        agreed = self.exchange.width is not None
        if agreed and not record.problem and width != self.exchange.width:
            record = record._replace(problem=validation.WIDTH_CHANGED)
        if self._number is None and not agreed and self.exchange.size > 1:
            mpi_comm = self.exchange.base_comm
            self._number = next(_first_calls.setdefault(
                id(mpi_comm), (mpi_comm, itertools.count(1)))[1])
        call = Call(self.calls, record, config, '{!r} {}'.format(
            (self.label, self._number, self.calls, width, config), agreeing))
        if not agreed:
            self._check_records('input check', call)
            self.exchange.width = width
        elif record.problem:
            # Take part in this call's exchange all the same, so that every
            # process learns of the problem in one collective.
            xp = backend.get_array_module(arrays[1])
            self.exchange_moments(call, xp.zeros(
                ((self.exchange.width - validation.TAG_LEN - 1) // 2, 3),
                statistics.MOMENTS_DTYPE), 0)
        return call

    def _record(self, x_shape, arrays, axis, running):
        """This process's record, and its part every process must share."""
        import multinode_bn  # late: the package imports this module
        x, gamma, beta = arrays
        if isinstance(axis, int):
            axis = (axis,)
        axis = tuple(_bn._compute_axis(len(x_shape), gamma.ndim, axis))
        x_device, p_device = _device_kind(x), _device_kind(gamma)
        problem = validation.local_problem(
            x_shape, x.dtype, gamma.shape, gamma.dtype, beta.dtype, axis,
            self.backend_name, x_device, p_device, beta_shape=beta.shape,
            running_shapes=[r.shape for r in running if r is not None])
        record = validation.InputRecord(
            str(multinode_bn.__version__), '', x_shape, axis, gamma.shape,
            x.dtype.name, gamma.dtype.name, self.backend_name, x_device,
            problem, False)
        return record, repr(record.agreeing)

    def _check_records(self, kind, call, nonfinite=False):
        text = '{} call {} {} exchange, {}'.format(
            self.label, call.number, kind, ' '.join(
                '{}={}'.format(name, value) for name, value in call.config))
        record = call.record._replace(nonfinite=nonfinite, text=text)
        packed = self.exchange.allgather_record(
            record.pack(), lambda: self.exchange_name(kind, call))
        return validation.check_records(packed, self.exchange.rank,
                                        self.label)

    def _exchange(self, call, kind, buf, nonfinite=False, samples=0):
        # buf (float64) summed over processes, and the summed tag.
        tag = validation.exchange_tag(
            validation.exchange_digest((kind, call.identity)),
            call.record.problem, nonfinite, samples)
        describe = functools.partial(self.exchange_name, kind, call)
        self.exchange.admit(describe)
        sums, summed = self.exchange.allreduce_sums(
            buf, tag, describe, proceed=validation.tag_agrees)
        if validation.tag_agrees(summed):
            return sums, summed
        # Every process is here together (they read the same sums).
        records = self._check_records(kind, call, nonfinite)
        bad = [r for r, record in enumerate(records) if record.nonfinite]
        if bad:
            raise FloatingPointError(
                '{}: non-finite {} statistics from rank(s) {} (call {}, '
                'raised on rank {}). Check the input of those ranks.'.format(
                    self.label, kind, ', '.join(map(str, bad)), call.number,
                    self.exchange.rank))
        raise validation.InconsistentInputError(
            '{} (raised on rank {}): processes disagree on the {} exchange '
            'of call {}.'.format(self.label, self.exchange.rank, kind,
                                 call.number))

    def exchange_sums(self, call, kind, buf, nonfinite=False):
        """Sums ``buf`` (float64) over processes, as exchange ``kind`` of
        ``call``; raises on every process if any process is in another
        exchange, had a problem or (debug mode) non-finite values."""
        return self._exchange(call, kind, buf, nonfinite)[0]

    def exchange_pieces(self, call, buf):
        """:meth:`exchange_sums` for a buffer of any length, in pieces of
        the link's width: ``double backward`` exchanges numbered in the
        order processes make them."""
        piece = self.exchange.width - validation.TAG_LEN
        parts = []
        for start in range(0, buf.size, piece):
            self._sequence += 1
            parts.append(self.exchange_sums(
                call, 'double backward #{}'.format(self._sequence),
                buf[start:start + piece]))
        return backend.get_array_module(buf).concatenate(parts)

    def exchange_moments(self, call, moments, samples, eps=0.0,
                         nonfinite=False):
        """Global ``(count, mean, m2)`` from local ones, and the global
        count as a host number (``samples``: the local count). The sums go
        around the link's previous global mean, and once more around the new
        one if that lies far from it (every process decides alike)."""
        xp = backend.get_array_module(moments)
        shift = self._shift
        if (shift is None or shift.shape[0] != moments.shape[0]
                or backend.get_device_from_array(shift)
                != backend.get_device_from_array(moments)):
            shift = xp.zeros(moments.shape[0], statistics.MOMENTS_DTYPE)
        sums, summed = self._exchange(
            call, 'forward',
            statistics.moments_to_shifted_sums(xp, moments, shift),
            nonfinite, samples)
        count = validation.tag_samples(summed)
        if self.exchange.size == 1:
            return moments, count
        merged = statistics.shifted_sums_to_moments(xp, sums, shift)
        if statistics.shift_too_far(merged, shift, eps):
            shift = merged[:, 1]
            sums = self.exchange_sums(
                call, 'forward again',
                statistics.moments_to_shifted_sums(xp, moments, shift))
            merged = statistics.shifted_sums_to_moments(xp, sums, shift)
        mean = merged[:, 1]
        self._shift = xp.where(xp.isfinite(mean), mean, shift)
        return merged, count


def _device_kind(a):
    if isinstance(a, numpy.ndarray):
        return 'cpu'
    return 'gpu' if type(a).__module__.startswith('cupy') else 'other'

