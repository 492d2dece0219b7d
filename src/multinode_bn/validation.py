"""What every process feeds one synchronized BN, as a fixed-size header.

Processes that disagree on the channel count, dtype, number of dimensions,
axis or backend would either hang in a collective or mix unrelated numbers.
On the first call of a link (and on every call in debug mode), each process
packs what it is about to do into a header of :data:`HEADER_LEN` integers.
Headers have the same size whatever the input, so exchanging them can
neither hang nor truncate; every process then checks all headers and raises
the same error, naming each rank's input. Later calls carry digests of the
header inside the statistics exchange (:func:`inband_header`) and exchange
the full headers again only when those disagree.

Nothing here communicates: :mod:`multinode_bn.communication` moves the
headers.
"""

import zlib

import numpy

HEADER_LEN = 32
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
                  axis, backend, x_device, param_device, beta_shape=None):
    """The first thing wrong with this process's input, or :data:`OK`.

    Everything Chainer's own type check would reject is caught here first,
    so that no process raises alone while the others wait in an exchange.
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
    if x_device != param_device:
        return DEVICE_MISMATCH
    if backend == 'nccl' and x_device != 'gpu':
        return NCCL_NEEDS_GPU
    return OK


def encode_header(x_shape, x_dtype, param_shape, param_dtype, axis, backend,
                  device, problem=OK, nonfinite=False):
    """Packs one process's input description into ``HEADER_LEN`` int64."""
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
    h[24] = problem
    h[25] = int(bool(nonfinite))
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
    )


def describe(decoded):
    """One rank's input in words."""
    text = 'x {} {} axis {} params {} {} on {} via {}'.format(
        decoded['dtype'], decoded['shape'], decoded['axis'],
        decoded['param_shape'], decoded['param_dtype'], decoded['device'],
        decoded['backend'])
    if decoded['problem']:
        text += ' <- ' + _PROBLEMS.get(decoded['problem'], 'invalid input')
    return text


class InconsistentInputError(ValueError):
    """Processes fed one synchronized BN inputs that cannot be combined."""


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

    Args:
        headers (ndarray): ``(size, HEADER_LEN)`` headers of all processes.
        rank (int): This process's rank (named in the message).
        label (str): The link or call being checked.
    """
    decoded = [decode_header(h) for h in headers]
    problems = [r for r, d in enumerate(decoded)
                if d['problem'] or not d['valid']]
    parts = [agreeing_part(h) for h in headers]
    disagree = any(p != parts[0] for p in parts)
    if not problems and not disagree:
        return
    lines = ['  rank {}: {}'.format(r, describe(d))
             for r, d in enumerate(decoded)]
    if problems:
        what = 'invalid input on rank(s) {}'.format(
            ', '.join(str(r) for r in problems))
    else:
        what = ('processes disagree on what they feed it (channels, dtype, '
                'number of dimensions, axis, backend or device must match; '
                'only the reduced axes may differ in length)')
    raise InconsistentInputError(
        '{} (raised on rank {}): {}.\n{}\nFix the input of the named rank(s);'
        ' every rank raises this same error.'.format(
            label, rank, what, '\n'.join(lines)))


def signature_digests(signature):
    """Two 12-bit digests of an input signature, equal on every process.

    Small enough that over up to 16,384 processes the sums of digests and of
    their squares, and the products checked by :func:`inband_agrees`, stay
    exact in float64.
    """
    text = repr(signature).encode()
    return zlib.crc32(text) & 0xFFF, zlib.adler32(text) & 0xFFF


def inband_header(digests, problem):
    """The float64 header summed inside every statistics exchange."""
    d1, d2 = (float(d) for d in digests)
    return numpy.array([1.0, d1, d1 * d1, d2, d2 * d2, float(problem > 0)])


def inband_agrees(summed):
    """Whether a summed :func:`inband_header` shows one signature, no problem.

    Digests are all equal exactly when ``n * sum(d^2) == sum(d)^2``; the
    test reads only the sums, so every process reaches the same answer.
    """
    n, d1, q1, d2, q2, problems = (float(v) for v in summed)
    return problems == 0 and n * q1 == d1 * d1 and n * q2 == d2 * d2


def nonfinite_ranks(headers):
    """Ranks whose header says their local statistics were not finite."""
    return [r for r, h in enumerate(headers) if decode_header(h)['nonfinite']]
