"""What every process feeds one synchronized BN, and what each exchange is.

Processes that disagree on the input (channels, dtype, axis, backend) would
hang in a collective or mix unrelated numbers; processes that disagree on
control flow (a skipped call, links in another order, a skipped backward)
would pair unrelated exchanges. Two records prevent both:

* an :class:`InputRecord` of each process, gathered once at a link's first
  call (fixed size, so gathering cannot hang or truncate) and checked by
  every process alike (:func:`check_records`);
* a *tag* summed inside every exchange (:func:`exchange_tag`): a digest of
  the exchange's identity, the counts of processes with a problem or
  non-finite values, and the local samples. :func:`tag_agrees` tells from
  the sums alone whether all processes sent the same digest, so all reach
  the same verdict with no extra collective.

Nothing here communicates.
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

_PROBLEMS = {
    NOT_FLOAT: 'input is not floating point',
    CHANNEL_MISMATCH: 'input channels do not match the parameters',
    DEVICE_MISMATCH: 'input is on another device than the parameters',
    NCCL_NEEDS_GPU: "the 'nccl' backend needs CuPy arrays on a GPU",
    BAD_AXIS: 'axis does not fit the input',
    TOO_MANY_DIMS: 'input has more than 8 dimensions',
    DTYPE_MISMATCH: 'gamma and beta differ in dtype',
    PARAM_MISMATCH: 'gamma and beta are not floating point of one shape',
    NO_BATCH_AXIS: ('x has no batch axis: it needs one more dimension than '
                    'the parameters, e.g. x[None] for a single sample'),
    RUNNING_MISMATCH: 'running_mean or running_var does not match gamma',
    WIDTH_CHANGED: 'the channel count changed since the first call',
}
# What Chainer's BatchNormalization type check rejects.
_TYPE_PROBLEMS = (NOT_FLOAT, CHANNEL_MISMATCH, BAD_AXIS, DTYPE_MISMATCH,
                  PARAM_MISMATCH, NO_BATCH_AXIS, RUNNING_MISMATCH)

_MAX_DIMS = 8
_DTYPES = ['float16', 'float32', 'float64', 'bfloat16', 'int8', 'int16',
           'int32', 'int64', 'uint8', 'bool', 'complex64', 'complex128']
_BACKENDS = ['mpi', 'nccl']
_DEVICES = ['cpu', 'gpu', 'other']


def local_problem(x_shape, x_dtype, param_shape, param_dtype, beta_dtype,
                  axis, backend, x_device, param_device, beta_shape=None,
                  running_shapes=()):
    """The first thing wrong with this process's input, or :data:`OK`:
    all that Chainer's type check would reject, caught before it raises on
    one process alone while the others wait in an exchange."""
    if len(x_shape) > _MAX_DIMS:
        return TOO_MANY_DIMS
    if numpy.dtype(x_dtype).kind != 'f':
        return NOT_FLOAT
    if numpy.dtype(param_dtype).kind != 'f' or (
            beta_shape is not None and tuple(beta_shape) != tuple(
                param_shape)):
        return PARAM_MISMATCH
    if param_dtype != beta_dtype:
        return DTYPE_MISMATCH
    if len(x_shape) <= len(param_shape):
        return NO_BATCH_AXIS
    if any(not 0 <= a < len(x_shape) for a in axis) or \
            list(axis) != sorted(set(axis)):
        return BAD_AXIS
    key = tuple(d for i, d in enumerate(x_shape) if i not in axis)
    if key != tuple(param_shape):
        return CHANNEL_MISMATCH
    if any(tuple(s) != tuple(param_shape) for s in running_shapes):
        return RUNNING_MISMATCH
    if x_device != param_device:
        return DEVICE_MISMATCH
    if backend == 'nccl' and x_device != 'gpu':
        return NCCL_NEEDS_GPU
    return OK


# Where each field of a packed InputRecord lies, in int64 slots.
_SLOTS = collections.OrderedDict()
for _field, _width in (('magic', 1), ('shape', 1 + _MAX_DIMS), ('axis', 1),
                       ('param_shape', 1 + _MAX_DIMS), ('dtype', 1),
                       ('param_dtype', 1), ('backend', 1), ('device', 1),
                       ('problem', 1), ('nonfinite', 1), ('version', 4),
                       ('text', 32)):
    _start = sum(s.stop - s.start for s in _SLOTS.values())
    _SLOTS[_field] = slice(_start, _start + _width)
#: int64 slots of a packed :class:`InputRecord`.
RECORD_LEN = _SLOTS['text'].stop
_MAGIC = 0x4d4e424e  # 'MNBN'


class InputRecord(collections.namedtuple('InputRecord', (
        'shape', 'axis', 'param_shape', 'dtype', 'param_dtype', 'backend',
        'device', 'problem', 'nonfinite', 'version', 'text', 'valid'))):
    """One process's input and exchange, checked by every process at a
    link's first call (and on any disagreement later).

    ``text`` names the exchange (link, call, kind, configuration; at most
    256 bytes), ``version`` the package's (at most 32 bytes). :meth:`pack`
    gives :data:`RECORD_LEN` int64, the same size on every process.
    """

    def pack(self):
        slots = numpy.zeros(RECORD_LEN, dtype=numpy.int64)

        def put(field, values):
            part = slots[_SLOTS[field]]
            part[:len(values)] = values

        put('magic', [_MAGIC])
        for field in ('shape', 'param_shape'):
            dims = tuple(getattr(self, field))
            put(field, (len(dims),) + dims[:_MAX_DIMS])
        put('axis', [sum(1 << a for a in self.axis if 0 <= a < 62)])
        put('dtype', [_code(self.dtype, _DTYPES)])
        put('param_dtype', [_code(self.param_dtype, _DTYPES)])
        put('backend', [_code(self.backend, _BACKENDS)])
        put('device', [_code(self.device, _DEVICES)])
        put('problem', [self.problem])
        put('nonfinite', [int(bool(self.nonfinite))])
        for field in ('version', 'text'):
            part = slots[_SLOTS[field]]
            raw = getattr(self, field).encode('utf-8')[:8 * part.size]
            part.view(numpy.uint8)[:len(raw)] = numpy.frombuffer(
                raw, numpy.uint8)
        return slots

    @classmethod
    def unpack(cls, slots):
        def get(field):
            return slots[_SLOTS[field]]

        def dims(field):
            part = get(field)
            return tuple(int(d) for d in part[1:1 + min(int(part[0]),
                                                        _MAX_DIMS)])

        def text(field):
            return bytes(numpy.ascontiguousarray(get(field)).view(
                numpy.uint8)).rstrip(b'\0').decode('utf-8', 'replace')

        axis_bits = int(get('axis')[0])
        return cls(
            shape=dims('shape'), param_shape=dims('param_shape'),
            axis=tuple(i for i in range(62) if axis_bits >> i & 1),
            dtype=_name(int(get('dtype')[0]), _DTYPES),
            param_dtype=_name(int(get('param_dtype')[0]), _DTYPES),
            backend=_name(int(get('backend')[0]), _BACKENDS),
            device=_name(int(get('device')[0]), _DEVICES),
            problem=int(get('problem')[0]),
            nonfinite=bool(get('nonfinite')[0]),
            version=text('version'), text=text('text'),
            valid=int(get('magic')[0]) == _MAGIC)

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
            words += ' <- ' + _PROBLEMS.get(self.problem, 'invalid input')
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


def _code(name, table):
    return table.index(name) if name in table else len(table)


def _name(code, table):
    return table[code] if 0 <= code < len(table) else 'other'


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
    RECORD_LEN)``, in rank order); raises the same
    :class:`InconsistentInputError` on every process, naming ``rank`` and
    ``label``, unless they agree and none reports a problem (an
    :class:`InvalidInputTypeError` for what Chainer's type check rejects).
    """
    records = [InputRecord.unpack(p) for p in packed]
    versions = [r.version for r in records]
    if any(v != versions[0] for v in versions):
        # Checked first: other versions may describe inputs differently.
        raise InconsistentInputError(
            '{} (raised on rank {}): processes run different versions of '
            'multinode_bn:\n{}\nInstall the same version on every node.'
            .format(label, rank, '\n'.join(
                '  rank {}: multinode_bn {}'.format(r, v or 'unknown')
                for r, v in enumerate(versions))))
    problems = [r for r, rec in enumerate(records)
                if rec.problem or not rec.valid]
    if problems:
        what = 'invalid input on rank(s) {}'.format(
            ', '.join(str(r) for r in problems))
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
    error = InconsistentInputError
    if any(records[r].problem in _TYPE_PROBLEMS for r in problems):
        error = InvalidInputTypeError
    raise error(
        '{} (raised on rank {}): {}.\n{}\nFix the input of the named rank(s);'
        ' every rank raises this same error.'.format(
            label, rank, what, '\n'.join(
                '  rank {}: {}'.format(r, rec)
                for r, rec in enumerate(records))))


#: 16-bit pieces of the 64-bit digest in a tag.
DIGEST_PIECES = 4
# Where the numbers after the digest lie in a tag.
_PROBLEMS_AT = 1 + 2 * DIGEST_PIECES
_NONFINITE_AT = _PROBLEMS_AT + 1
_SAMPLES_AT = _PROBLEMS_AT + 2
#: Numbers in a tag: 1 (it counts the processes), each digest piece and its
#: square, the processes with a problem, those with non-finite values, and
#: the samples per channel (forward exchanges; 0 in the others).
TAG_LEN = _SAMPLES_AT + 1


def exchange_digest(identity):
    """64-bit digest of what an exchange is, as :data:`DIGEST_PIECES`
    16-bit pieces; equal on processes with equal ``identity``."""
    raw = hashlib.blake2b(repr(identity).encode(), digest_size=8).digest()
    value = int.from_bytes(raw, 'little')
    return tuple((value >> (16 * i)) & 0xFFFF for i in range(DIGEST_PIECES))


def exchange_tag(digest, problem=OK, nonfinite=False, samples=0):
    """The float64 tag summed inside every statistics exchange.

    ``samples`` (this process's samples per channel) sums to the global
    count on the host, whichever backend moves the statistics: the count
    is then known without reading the device.
    """
    values = [1.0]
    for d in digest:
        values += [d, d * d]
    values += [problem != OK, bool(nonfinite), samples]
    return numpy.array(values, dtype=numpy.float64)


def tag_agrees(summed):
    """Whether a summed :func:`exchange_tag` shows one digest everywhere,
    no problem and no non-finite values.

    The pieces are all equal exactly when ``n * sum(d^2) == sum(d)^2``
    (Cauchy-Schwarz); the sums are integers below ``2**53`` for up to two
    million processes, so they are exact in float64 and compared as Python
    integers. The test reads only the sums: every process reaches the same
    answer.
    """
    values = [int(v) for v in numpy.asarray(summed, numpy.float64).tolist()]
    n = values[0]
    for i in range(DIGEST_PIECES):
        if n * values[2 + 2 * i] != values[1 + 2 * i] ** 2:
            return False
    return values[_PROBLEMS_AT] == 0 and values[_NONFINITE_AT] == 0


def tag_samples(summed):
    """The global samples per channel of a summed :func:`exchange_tag`."""
    return float(summed[_SAMPLES_AT])
