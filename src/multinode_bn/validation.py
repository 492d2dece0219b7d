"""What every process feeds one synchronized BN, and what each exchange is.

Processes that disagree on their input or on control flow would hang in a
collective or pair unrelated exchanges. Each process's :class:`InputRecord`
is checked by all at a link's first call; the tag summed inside every
exchange tells them from the sums alone whether they agree. Nothing here
communicates (``docs/reliability.md`` explains the design).
"""

import collections
import hashlib

import numpy

from chainer.utils import type_check

#: Local problems a process reports in its record.
OK = 0
NOT_FLOAT = 1
CHANNEL_MISMATCH = 2
DEVICE_MISMATCH = 3
NCCL_NEEDS_GPU = 4
BAD_AXIS = 5
TOO_MANY_DIMS = 6
DTYPE_MISMATCH = 7
PARAM_MISMATCH = 8
NO_BATCH_AXIS = 9
RUNNING_MISMATCH = 10
WIDTH_CHANGED = 11

# Each problem in words, and whether Chainer's own type check rejects it.
_PROBLEMS = {
    NOT_FLOAT: ('input is not floating point', True),
    CHANNEL_MISMATCH: ('input channels do not match the parameters', True),
    DEVICE_MISMATCH: ('input is on another device than the parameters',
                      False),
    NCCL_NEEDS_GPU: ("the 'nccl' backend needs CuPy arrays on a GPU", False),
    BAD_AXIS: ('axis does not fit the input', True),
    TOO_MANY_DIMS: ('input has more than 8 dimensions', False),
    DTYPE_MISMATCH: ('gamma and beta differ in dtype', True),
    PARAM_MISMATCH: ('gamma and beta are not floating point of one shape',
                     True),
    NO_BATCH_AXIS: ('x has no batch axis: it needs one more dimension than '
                    'the parameters, e.g. x[None] for a single sample', True),
    RUNNING_MISMATCH: ('running_mean or running_var does not match gamma',
                       True),
    WIDTH_CHANGED: ('the channel count changed since the first call', False),
}
_UNKNOWN_PROBLEM = ('invalid input', False)

_MAX_DIMS = 8
_DTYPES = ['float16', 'float32', 'float64', 'bfloat16', 'int8', 'int16',
           'int32', 'int64', 'uint8', 'bool', 'complex64', 'complex128']
_BACKENDS = ['mpi', 'nccl']
_DEVICES = ['cpu', 'gpu', 'other']


def local_problem(x_shape, x_dtype, param_shape, param_dtype, beta_dtype,
                  axis, backend, x_device, param_device, beta_shape=None,
                  running_shapes=()):
    """The first thing wrong with this process's input, or :data:`OK`:
    what Chainer's type check would reject, found before it raises on one
    process alone while the others wait in an exchange."""
    if len(x_shape) > _MAX_DIMS:
        return TOO_MANY_DIMS
    if numpy.dtype(x_dtype).kind != 'f':
        return NOT_FLOAT
    if numpy.dtype(param_dtype).kind != 'f' or (
            beta_shape is not None
            and tuple(beta_shape) != tuple(param_shape)):
        return PARAM_MISMATCH
    if param_dtype != beta_dtype:
        return DTYPE_MISMATCH
    if len(x_shape) <= len(param_shape):
        return NO_BATCH_AXIS
    if any(not 0 <= a < len(x_shape) for a in axis) or \
            list(axis) != sorted(set(axis)):
        return BAD_AXIS
    kept = tuple(d for i, d in enumerate(x_shape) if i not in axis)
    if kept != tuple(param_shape):
        return CHANNEL_MISMATCH
    if any(tuple(s) != tuple(param_shape) for s in running_shapes):
        return RUNNING_MISMATCH
    if x_device != param_device:
        return DEVICE_MISMATCH
    if backend == 'nccl' and x_device != 'gpu':
        return NCCL_NEEDS_GPU
    return OK


# The fields of a packed InputRecord in order: their int64 slots and how
# each is written ('valid' as a magic number; a name as its index in a
# list; text as UTF-8 bytes, cut to fit; a number as itself).
_LAYOUT = (('valid', 1, 'magic'), ('shape', 1 + _MAX_DIMS, 'dims'),
           ('axis', 1, 'bits'), ('param_shape', 1 + _MAX_DIMS, 'dims'),
           ('dtype', 1, _DTYPES), ('param_dtype', 1, _DTYPES),
           ('backend', 1, _BACKENDS), ('device', 1, _DEVICES),
           ('problem', 1, int), ('nonfinite', 1, bool),
           ('version', 4, 'text'), ('text', 32, 'text'))
#: int64 slots of a packed :class:`InputRecord`.
RECORD_LEN = sum(width for _, width, _ in _LAYOUT)
_MAGIC = 0x4d4e424e  # 'MNBN'
_MAX_AXIS = 62  # the axis bits fit one int64


def _encode(kind, value, width):
    if kind == 'magic':
        return [_MAGIC]
    if kind == 'dims':
        return (len(value),) + tuple(value)[:width - 1]
    if kind == 'bits':
        return [sum(1 << a for a in value if 0 <= a < _MAX_AXIS)]
    if kind == 'text':
        raw = value.encode('utf-8')[:8 * width]
        return numpy.frombuffer(raw.ljust(8 * width, b'\0'), numpy.int64)
    if isinstance(kind, list):
        return [kind.index(value) if value in kind else len(kind)]
    return [int(kind(value))]


def _decode(kind, part):
    first = int(part[0])
    if kind == 'magic':
        return first == _MAGIC
    if kind == 'dims':
        return tuple(int(d) for d in part[1:1 + min(first, _MAX_DIMS)])
    if kind == 'bits':
        return tuple(i for i in range(_MAX_AXIS) if first >> i & 1)
    if kind == 'text':
        return part.tobytes().rstrip(b'\0').decode('utf-8', 'replace')
    if isinstance(kind, list):
        return kind[first] if 0 <= first < len(kind) else 'other'
    return kind(first)


class InputRecord(collections.namedtuple('InputRecord', (
        'shape', 'axis', 'param_shape', 'dtype', 'param_dtype', 'backend',
        'device', 'problem', 'nonfinite', 'version', 'text', 'valid'))):
    """One process's input and exchange: ``text`` names the exchange (at
    most 256 bytes), ``version`` the package's (32). :meth:`pack` gives
    :data:`RECORD_LEN` int64, the same size on every process."""

    def pack(self):
        slots = numpy.zeros(RECORD_LEN, dtype=numpy.int64)
        start = 0
        for field, width, kind in _LAYOUT:
            values = _encode(kind, getattr(self, field), width)
            slots[start:start + len(values)] = values
            start += width
        return slots

    @classmethod
    def unpack(cls, slots):
        fields, start = {}, 0
        for field, width, kind in _LAYOUT:
            fields[field] = _decode(kind, slots[start:start + width])
            start += width
        return cls(**fields)

    @property
    def agreeing(self):
        """What must be equal on every process: all but the lengths of the
        reduced axes (batch and image sizes may differ)."""
        kept = tuple(n for i, n in enumerate(self.shape)
                     if i not in self.axis)
        return (len(self.shape), self.axis, kept, self.param_shape,
                self.dtype, self.param_dtype, self.backend, self.device)

    def __str__(self):
        words = '{}x {} {} axis {} params {} {} on {} via {}'.format(
            self.text + ': ' if self.text else '', self.dtype, self.shape,
            self.axis, self.param_shape, self.param_dtype, self.device,
            self.backend)
        if self.problem:
            text, _ = _PROBLEMS.get(self.problem, _UNKNOWN_PROBLEM)
            words += ' <- ' + text
        return words


def input_record(x_shape, x_dtype, param_shape, param_dtype, axis, backend,
                 device, problem=OK, version=''):
    """This process's :class:`InputRecord` (no text yet)."""
    return InputRecord(
        shape=tuple(x_shape), axis=tuple(axis),
        param_shape=tuple(param_shape), dtype=numpy.dtype(x_dtype).name,
        param_dtype=numpy.dtype(param_dtype).name, backend=backend,
        device=device, problem=problem, nonfinite=False, version=version,
        text='', valid=True)


class InconsistentInputError(ValueError):
    """Processes fed one synchronized BN inputs that cannot be combined."""


class InvalidInputTypeError(InconsistentInputError, type_check.InvalidType):
    """An input that Chainer's own type check would reject, on some rank:
    code catching either base (as for ``L.BatchNormalization``) catches it.
    """

    def __init__(self, msg):
        type_check.InvalidType.__init__(self, None, None, msg)

    def __reduce__(self):
        return (type(self), self.args)


def check_records(packed, rank, label):
    """The unpacked records of all processes (``packed``: ``(size,
    RECORD_LEN)``, in rank order); unless they agree and none reports a
    problem, raises the same :class:`InconsistentInputError` on every
    process, naming ``rank`` and ``label`` (an
    :class:`InvalidInputTypeError` for what Chainer's type check rejects).
    """
    records = [InputRecord.unpack(p) for p in packed]
    if any(rec.version != records[0].version for rec in records):
        # Checked first: other versions may describe inputs differently.
        raise InconsistentInputError(
            '{} (raised on rank {}): processes run different versions of '
            'multinode_bn:\n{}\nInstall the same version on every node.'
            .format(label, rank, _by_rank(
                'multinode_bn ' + (rec.version or 'unknown')
                for rec in records)))
    problems = [r for r, rec in enumerate(records)
                if rec.problem or not rec.valid]
    if problems:
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
    type_problem = any(_PROBLEMS.get(records[r].problem, _UNKNOWN_PROBLEM)[1]
                       for r in problems)
    error = InvalidInputTypeError if type_problem else InconsistentInputError
    raise error(
        '{} (raised on rank {}): {}.\n{}\nFix the input of the named rank(s);'
        ' every rank raises this same error.'.format(
            label, rank, what, _by_rank(records)))


def _by_rank(lines):
    return '\n'.join('  rank {}: {}'.format(r, line)
                     for r, line in enumerate(lines))


#: 16-bit pieces of the 64-bit digest in a tag.
DIGEST_PIECES = 4
#: Numbers in a tag, in order: 1 (it counts the processes), each digest
#: piece and its square, the processes with a problem, those with
#: non-finite values, and the samples per channel (0 but in the forward).
TAG_LEN = 1 + 2 * DIGEST_PIECES + 3


def exchange_digest(identity):
    """64-bit digest of what an exchange is, as :data:`DIGEST_PIECES`
    16-bit pieces; equal on processes with equal ``identity``."""
    raw = hashlib.blake2b(repr(identity).encode(), digest_size=8).digest()
    value = int.from_bytes(raw, 'little')
    return tuple((value >> (16 * i)) & 0xFFFF for i in range(DIGEST_PIECES))


def exchange_tag(digest, problem=OK, nonfinite=False, samples=0):
    """The float64 tag summed inside every statistics exchange. Its
    ``samples`` (this process's samples per channel) sum to the global
    count on the host, whichever backend moves the statistics."""
    values = [1.0]
    for d in digest:
        values += [d, d * d]
    values += [problem != OK, bool(nonfinite), samples]
    return numpy.array(values, dtype=numpy.float64)


def tag_agrees(summed):
    """Whether a summed :func:`exchange_tag` shows one digest everywhere,
    no problem and no non-finite values.

    The pieces are all equal exactly when ``n * sum(d^2) == sum(d)^2``
    (Cauchy-Schwarz): a test of the sums alone, so every process reaches
    the same answer. The sums are integers below ``2**53`` for up to two
    million processes, exact in float64, compared as Python integers.
    """
    values = [int(v) for v in numpy.asarray(summed, numpy.float64).tolist()]
    n, pieces = values[0], values[1:1 + 2 * DIGEST_PIECES]
    if any(n * squares != sums ** 2
           for sums, squares in zip(pieces[0::2], pieces[1::2])):
        return False
    problems, nonfinite = values[-3], values[-2]
    return problems == 0 and nonfinite == 0


def tag_samples(summed):
    """The global samples per channel of a summed :func:`exchange_tag`."""
    return float(summed[-1])
