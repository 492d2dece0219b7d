"""What every process feeds one synchronized BN, and what each exchange is.

Processes that disagree on the channel count, dtype, number of dimensions,
axis or backend would either hang in a collective or mix unrelated numbers;
processes that disagree on control flow (a skipped call, links called in
another order, a skipped backward) would pair unrelated exchanges.

* **The first call of a link** exchanges a fixed-size header
  (:data:`HEADER_LEN` integers): what each process is about to do and a
  short text naming the link, the call and the kind of exchange. Headers
  have the same size whatever the input, so exchanging them can neither
  hang nor truncate; every process then checks all headers and raises the
  same error, naming each rank's input (:func:`check_headers`).
* **Every exchange** (forward, backward, double backward) carries, summed
  with the statistics in the same collective, an in-band header
  (:func:`inband_header`): a 64-bit digest of the exchange's identity (its
  kind, the link, the call number, the buffer size, the configuration that
  must agree and the input signature) and counts of processes with a local
  problem or non-finite statistics. :func:`inband_agrees` tells from the
  sums alone whether every process sent the same digest, so every process
  reaches the same verdict, and on a disagreement all of them exchange the
  full headers and raise the same detailed error.

Nothing here communicates: :mod:`multinode_bn.communication` moves the
headers.
"""

import hashlib

import numpy

from chainer.utils import type_check

#: Integers in a full header: 32 describe the input, 32 hold a text.
HEADER_LEN = 64
#: Where the text of a full header lies.
HEADER_TEXT = slice(32, 64)
#: Where the package version of a full header lies (up to 32 bytes).
HEADER_VERSION = slice(26, 30)
_MAGIC = 0x4d4e424e  # 'MNBN'
_MAX_DIMS = 8

#: Local problems a process reports in its header.
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

_DTYPES = ['float16', 'float32', 'float64', 'bfloat16', 'int8', 'int16',
           'int32', 'int64', 'uint8', 'bool', 'complex64', 'complex128']
_BACKENDS = ['mpi', 'nccl']
_DEVICES = ['cpu', 'gpu', 'other']


def _code(name, table):
    return table.index(name) if name in table else len(table)


def _name(code, table):
    return table[code] if 0 <= code < len(table) else 'other'


def local_problem(x_shape, x_dtype, param_shape, param_dtype, beta_dtype,
                  axis, backend, x_device, param_device, beta_shape=None,
                  running_shapes=()):
    """The first thing wrong with this process's input, or :data:`OK`.

    Everything Chainer's own type check would reject is caught here first,
    so that no process raises alone while the others wait in an exchange.
    ``running_shapes`` are the shapes of the running statistics to update.
    """
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


def encode_header(x_shape, x_dtype, param_shape, param_dtype, axis, backend,
                  device, problem=OK, nonfinite=False, text=''):
    """Packs one process's input description into ``HEADER_LEN`` int64,
    with ``text`` (what the exchange is; cut to 256 bytes)."""
    h = numpy.zeros(HEADER_LEN, dtype=numpy.int64)
    h[0] = _MAGIC
    h[1] = len(x_shape)
    h[2:2 + min(len(x_shape), _MAX_DIMS)] = x_shape[:_MAX_DIMS]
    h[10] = sum(1 << a for a in axis if 0 <= a < 62)
    h[11] = len(param_shape)
    h[12:12 + min(len(param_shape), _MAX_DIMS)] = tuple(
        param_shape)[:_MAX_DIMS]
    h[20] = _code(numpy.dtype(x_dtype).name, _DTYPES)
    h[21] = _code(numpy.dtype(param_dtype).name, _DTYPES)
    h[22] = _code(backend, _BACKENDS)
    h[23] = _code(device, _DEVICES)
    raw = package_version().encode('utf-8')[:8 * (
        HEADER_VERSION.stop - HEADER_VERSION.start)]
    h[HEADER_VERSION].view(numpy.uint8)[:len(raw)] = numpy.frombuffer(
        raw, numpy.uint8)
    return for_exchange(h, problem, nonfinite, text)


def package_version():
    """The version of :mod:`multinode_bn` this process runs."""
    import multinode_bn  # late: this module is imported by the package
    return str(multinode_bn.__version__)


def _text(ints):
    return bytes(numpy.ascontiguousarray(ints).view(numpy.uint8)).rstrip(
        b'\0').decode('utf-8', 'replace')


def for_exchange(header, problem=OK, nonfinite=False, text=''):
    """A copy of ``header`` with this exchange's problem, non-finite flag
    and ``text`` (what the exchange is; cut to 256 bytes)."""
    h = header.copy()
    h[24] = problem
    h[25] = int(bool(nonfinite))
    raw = text.encode('utf-8')[:8 * (HEADER_TEXT.stop - HEADER_TEXT.start)]
    h[HEADER_TEXT] = 0
    h[HEADER_TEXT].view(numpy.uint8)[:len(raw)] = numpy.frombuffer(
        raw, numpy.uint8)
    return h


def decode_header(h):
    """The dict that :func:`encode_header` packed."""
    ndim = int(h[1])
    pdim = int(h[11])
    return dict(
        shape=tuple(int(d) for d in h[2:2 + min(ndim, _MAX_DIMS)]),
        axis=tuple(i for i in range(62) if int(h[10]) >> i & 1),
        param_shape=tuple(int(d) for d in h[12:12 + min(pdim, _MAX_DIMS)]),
        dtype=_name(int(h[20]), _DTYPES),
        param_dtype=_name(int(h[21]), _DTYPES),
        backend=_name(int(h[22]), _BACKENDS),
        device=_name(int(h[23]), _DEVICES),
        problem=int(h[24]),
        nonfinite=bool(h[25]),
        valid=int(h[0]) == _MAGIC,
        text=_text(h[HEADER_TEXT]),
        version=_text(h[HEADER_VERSION]),
    )


def describe(decoded):
    """One rank's exchange and input in words."""
    text = '{}x {} {} axis {} params {} {} on {} via {}'.format(
        decoded['text'] + ': ' if decoded['text'] else '',
        decoded['dtype'], decoded['shape'], decoded['axis'],
        decoded['param_shape'], decoded['param_dtype'], decoded['device'],
        decoded['backend'])
    if decoded['problem']:
        text += ' <- ' + _PROBLEMS.get(decoded['problem'], 'invalid input')
    return text


class InconsistentInputError(ValueError):
    """Processes fed one synchronized BN inputs that cannot be combined."""


class InvalidInputTypeError(InconsistentInputError, type_check.InvalidType):
    """An input that Chainer's own type check would reject, on some rank.

    Raised on every rank alike, and an instance of both
    :class:`InconsistentInputError` and
    :class:`chainer.utils.type_check.InvalidType`, so that code catching
    either (as for :class:`chainer.links.BatchNormalization`) catches it.

    Args:
        msg (str): The message, naming each rank's input.
    """

    def __init__(self, msg):
        type_check.InvalidType.__init__(self, None, None, msg)

    def __reduce__(self):
        return (type(self), self.args)


# What Chainer's BatchNormalization type check rejects.
_TYPE_PROBLEMS = (NOT_FLOAT, CHANNEL_MISMATCH, BAD_AXIS, DTYPE_MISMATCH,
                  PARAM_MISMATCH, NO_BATCH_AXIS, RUNNING_MISMATCH)


def agreeing_part(h):
    """The part of a header that must be equal on every process."""
    # The reduced axes may differ in length between processes (batch size,
    # image size): the counts travel with the statistics. All else must
    # agree.
    d = decode_header(h)
    key = tuple(n for i, n in enumerate(d['shape']) if i not in d['axis'])
    return (len(d['shape']), d['axis'], key, d['param_shape'], d['dtype'],
            d['param_dtype'], d['backend'], d['device'])


def check_headers(headers, rank, label):
    """Raises the same :class:`InconsistentInputError` on every process.

    It is an :class:`InvalidInputTypeError` (also a Chainer
    ``InvalidType``) when some rank's input is one that Chainer's type check
    would reject.

    Args:
        headers (ndarray): ``(size, HEADER_LEN)`` headers of all processes.
        rank (int): This process's rank (named in the message).
        label (str): The link or call being checked.
    """
    decoded = [decode_header(h) for h in headers]
    versions = [d['version'] for d in decoded]
    if any(v != versions[0] for v in versions):
        # Checked first: other versions may describe inputs differently.
        raise InconsistentInputError(
            '{} (raised on rank {}): processes run different versions of '
            'multinode_bn:\n{}\nInstall the same version on every node.'
            .format(label, rank, '\n'.join(
                '  rank {}: multinode_bn {}'.format(r, v or 'unknown')
                for r, v in enumerate(versions))))
    problems = [r for r, d in enumerate(decoded)
                if d['problem'] or not d['valid']]
    parts = [agreeing_part(h) for h in headers]
    disagree = any(p != parts[0] for p in parts)
    texts = [d['text'] for d in decoded]
    exchanges_differ = any(t != texts[0] for t in texts)
    if not problems and not disagree and not exchanges_differ:
        return
    lines = ['  rank {}: {}'.format(r, describe(d))
             for r, d in enumerate(decoded)]
    if problems:
        what = 'invalid input on rank(s) {}'.format(
            ', '.join(str(r) for r in problems))
    elif exchanges_differ:
        what = ('processes are in different exchanges (each must call the '
                'same links, in the same order, the same number of times, '
                'forward and backward alike, with the same configuration)')
    else:
        what = ('processes disagree on what they feed it (channels, dtype, '
                'number of dimensions, axis, backend or device must match; '
                'only the reduced axes may differ in length)')
    error = InconsistentInputError
    if any(decoded[r]['problem'] in _TYPE_PROBLEMS for r in problems):
        error = InvalidInputTypeError
    raise error(
        '{} (raised on rank {}): {}.\n{}\nFix the input of the named rank(s);'
        ' every rank raises this same error.'.format(
            label, rank, what, '\n'.join(lines)))


#: 16-bit pieces of the 64-bit digest in an in-band header.
DIGEST_PIECES = 4
#: Numbers in an in-band header: a count, each piece and its square, the
#: number of processes with a local problem and with non-finite values,
#: and the samples per channel (forward exchanges; 0 in the others).
INBAND_LEN = 4 + 2 * DIGEST_PIECES
_PROBLEM_AT = 1 + 2 * DIGEST_PIECES


def exchange_digest(identity):
    """64-bit digest of what an exchange is, as :data:`DIGEST_PIECES`
    16-bit pieces; equal on processes with equal ``identity``."""
    raw = hashlib.blake2b(repr(identity).encode(), digest_size=8).digest()
    value = int.from_bytes(raw, 'little')
    return tuple((value >> (16 * i)) & 0xFFFF for i in range(DIGEST_PIECES))


def inband_header(digest, problem=OK, nonfinite=False, samples=0):
    """The float64 header summed inside every statistics exchange.

    ``samples`` (this process's samples per channel) sums to the global
    count on the host, whichever backend moves the statistics: the count
    is then known without reading the device.
    """
    values = [1.0]
    for d in digest:
        values += [d, d * d]
    values += [problem != OK, bool(nonfinite), samples]
    return numpy.array(values, dtype=numpy.float64)


def inband_samples(summed):
    """The global samples per channel of a summed :func:`inband_header`."""
    return float(summed[_PROBLEM_AT + 2])


def inband_agrees(summed):
    """Whether a summed :func:`inband_header` shows one digest everywhere,
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
    return values[_PROBLEM_AT] == 0 and values[_PROBLEM_AT + 1] == 0


def nonfinite_ranks(headers):
    """Ranks whose header says their local statistics were not finite."""
    return [r for r, h in enumerate(headers) if decode_header(h)['nonfinite']]
