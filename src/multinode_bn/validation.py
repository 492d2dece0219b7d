"""What every process feeds one synchronized BN, and what each exchange is:
processes that disagree on either would hang or pair unrelated exchanges.
"""

import collections
import hashlib
import json

import numpy

from chainer.utils import type_check

#: Local problems a process reports in its record, in words (none: ``OK``).
OK = ''
NOT_FLOAT = 'input is not floating point'
CHANNEL_MISMATCH = 'input channels do not match the parameters'
DEVICE_MISMATCH = 'input is on another device than the parameters'
NCCL_NEEDS_GPU = "the 'nccl' backend needs CuPy arrays on a GPU"
BAD_AXIS = 'axis does not fit the input'
TOO_MANY_DIMS = 'input has more than 8 dimensions'
DTYPE_MISMATCH = 'gamma and beta differ in dtype'
PARAM_MISMATCH = 'gamma and beta are not floating point of one shape'
NO_BATCH_AXIS = ('x has no batch axis: it needs one more dimension than the '
                 'parameters, e.g. x[None] for a single sample')
RUNNING_MISMATCH = 'running_mean or running_var does not match gamma'
WIDTH_CHANGED = 'the channel count changed since the first call'
UNREADABLE = 'its record does not parse'
# What Chainer's own type check rejects as well.
_TYPE_PROBLEMS = {NOT_FLOAT, CHANNEL_MISMATCH, BAD_AXIS, DTYPE_MISMATCH,
                  PARAM_MISMATCH, NO_BATCH_AXIS, RUNNING_MISMATCH}


def local_problem(x_shape, x_dtype, param_shape, param_dtype, beta_dtype,
                  axis, backend, x_device, param_device, beta_shape=None,
                  running_shapes=()):
    """The first thing wrong with this process's input, or :data:`OK`,
    found before Chainer's type check raises on this process alone."""
    kept = tuple(d for i, d in enumerate(x_shape) if i not in axis)
    checks = (
        (TOO_MANY_DIMS, len(x_shape) > 8),
        (NOT_FLOAT, numpy.dtype(x_dtype).kind != 'f'),
        (PARAM_MISMATCH, numpy.dtype(param_dtype).kind != 'f'
         or beta_shape not in (None, param_shape)),
        (DTYPE_MISMATCH, param_dtype != beta_dtype),
        (NO_BATCH_AXIS, len(x_shape) <= len(param_shape)),
        (BAD_AXIS, any(not 0 <= a < len(x_shape) for a in axis)
         or list(axis) != sorted(set(axis))),
        (CHANNEL_MISMATCH, kept != param_shape),
        (RUNNING_MISMATCH, any(s != param_shape for s in running_shapes)),
        (DEVICE_MISMATCH, x_device != param_device),
        (NCCL_NEEDS_GPU, backend == 'nccl' and x_device != 'gpu'))
    return next((problem for problem, bad in checks if bad), OK)


#: int64 slots of a packed :class:`InputRecord` (1 KiB of JSON).
RECORD_LEN = 128
# default=int: numpy integers (in an axis) as ints.
_JSON = json.JSONEncoder(default=int, ensure_ascii=False)


class InputRecord(collections.namedtuple('InputRecord', (
        'version', 'text', 'shape', 'axis', 'param_shape', 'dtype',
        'param_dtype', 'backend', 'device', 'problem', 'nonfinite'))):
    """One process's input and exchange; ``version`` comes first, so that
    any version reads it, and ``problem`` is the local one or :data:`OK`."""

    def pack(self):
        """The record as JSON in :data:`RECORD_LEN` int64, the same size on
        every process; the text is cut to fit."""
        raw = _JSON.encode(self).encode()
        excess = len(raw) - 8 * RECORD_LEN
        if excess > 0:
            # Enough: no character is shorter in JSON than in UTF-8. Only a
            # huge shape (a problem anyway) can still not fit: unreadable.
            text = self.text.encode()[:-excess].decode('utf-8', 'ignore')
            raw = _JSON.encode(self._replace(text=text)).encode()
        return numpy.frombuffer(raw[:8 * RECORD_LEN].ljust(8 * RECORD_LEN),
                                numpy.int64)

    @classmethod
    def unpack(cls, slots):
        """The record packed in ``slots``; one that does not parse reports
        the problem :data:`UNREADABLE`."""
        try:
            fields = json.loads(numpy.asarray(slots, numpy.int64).tobytes())
            return cls(*(tuple(f) if isinstance(f, list) else f
                         for f in fields))
        except (ValueError, TypeError):
            return cls(None, '', (), (), (), '', '', '', '', UNREADABLE, False)

    @property
    def agreeing(self):
        """What must be equal on every process: all but the lengths of the
        reduced axes (without a problem, the others equal the parameters')."""
        return (len(self.shape), self.axis, self.param_shape, self.dtype,
                self.param_dtype, self.backend, self.device)

    def __str__(self):
        return '{}x {} {} axis {} params {} {} on {} via {}{}'.format(
            self.text + ': ' if self.text else '', self.dtype, self.shape,
            self.axis, self.param_shape, self.param_dtype, self.device,
            self.backend, ' <- ' + self.problem if self.problem else '')


class InconsistentInputError(ValueError):
    """Processes fed one synchronized BN inputs that cannot be combined."""


class InvalidInputTypeError(InconsistentInputError, type_check.InvalidType):
    """An input Chainer's own type check would reject, on some rank: code
    catching either base (as for ``L.BatchNormalization``) catches it."""

    def __init__(self, msg):
        type_check.InvalidType.__init__(self, None, None, msg)

    def __reduce__(self):
        return (type(self), self.args)


def check_records(packed, rank, label):
    """The unpacked records of all processes (``packed``, in rank order);
    unless they agree and none has a problem, raises the same
    :class:`InconsistentInputError` on every process, naming ``rank`` and
    ``label`` (:class:`InvalidInputTypeError` for what Chainer rejects)."""
    records = lines = [InputRecord.unpack(p) for p in packed]
    problems = [r for r, rec in enumerate(records) if rec.problem]
    fix = 'Fix the input of the named rank(s)'
    if any(rec.version != records[0].version for rec in records):
        # Checked first: other versions may describe inputs differently.
        what, fix = ('processes run different versions of multinode_bn',
                     'Install the same version on every node')
        lines = ['multinode_bn ' + (rec.version or 'unknown')
                 for rec in records]
        problems = []
    elif problems:
        what = 'invalid input on rank(s) ' + ', '.join(map(str, problems))
    elif any(rec.text != records[0].text for rec in records):
        what = ('processes are in different exchanges (each must call the '
                'same links, in the same order, the same number of times, '
                'forward and backward alike, with the same configuration)')
    elif any(rec.agreeing != records[0].agreeing for rec in records):
        what = ('processes disagree on what they feed it (channels, dtype, '
                'number of dimensions, axis, backend or device must match; '
                'only the reduced axes may differ in length)')
    else:
        return records
    type_problem = any(records[r].problem in _TYPE_PROBLEMS for r in problems)
    error = InvalidInputTypeError if type_problem else InconsistentInputError
    raise error('{} (raised on rank {}): {}.\n{}\n{}; every rank raises this '
                'same error.'.format(label, rank, what, '\n'.join(
                    '  rank {}: {}'.format(r, line)
                    for r, line in enumerate(lines)), fix))


#: Numbers in a tag, in order: 1 (it counts the processes), each of the four
#: digest pieces and its square, the processes with a problem, those with
#: non-finite values, and the samples per channel (0 but in the forward).
TAG_LEN = 12


def exchange_digest(identity):
    """64-bit digest of what an exchange is, as four 16-bit pieces; equal
    on processes with equal ``identity``."""
    raw = hashlib.blake2b(repr(identity).encode(), digest_size=8).digest()
    return tuple(numpy.frombuffer(raw, '<u2').tolist())


def exchange_tag(digest, problem=OK, nonfinite=False, samples=0):
    """The float64 tag summed inside every statistics exchange; its
    ``samples`` (per channel) sum to the global count on the host."""
    pieces = [v for d in digest for v in (d, d * d)]
    return numpy.array([1.0] + pieces + [problem != OK, bool(nonfinite),
                                         samples], dtype=numpy.float64)


def tag_agrees(summed):
    """Whether a summed :func:`exchange_tag` shows one digest everywhere,
    no problem and no non-finite values. The pieces are all equal exactly
    when ``n * sum(d^2) == sum(d)^2`` (Cauchy-Schwarz): every process gets
    the same answer from the sums alone: integers below ``2**53`` for up to
    two million processes, exact in float64."""
    values = [int(v) for v in numpy.asarray(summed, numpy.float64).tolist()]
    n, pieces = values[0], values[1:-3]
    return values[-3] == values[-2] == 0 and all(
        n * squares == sums ** 2
        for sums, squares in zip(pieces[0::2], pieces[1::2]))


def tag_samples(summed):
    """The global samples per channel of a summed :func:`exchange_tag`."""
    return float(summed[-1])
