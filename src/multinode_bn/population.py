"""Exact population statistics ("precise BN") over the data of all processes.

Running averages over small batches are noisy estimates of the statistics a
model sees at evaluation time; :func:`update_population_statistics`
recomputes them with the parameters fixed. A link hook records the moments
of every call, merged in float64; at the end each process gathers every
process's merged moments once and merges them in rank order, so that all
processes end with the same bits.
"""

import warnings

import numpy

import chainer
from chainer import backend
from chainer.dataset import convert
from chainer.functions.normalization import batch_normalization as _bn
import chainer.links as L
from chainer import memory_layouts
import chainerx

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization
from multinode_bn.validation import InconsistentInputError


def update_population_statistics(model, iterator, comm, n_batches=None,
                                 converter=convert.concat_examples,
                                 device=None, forward=None):
    """Sets every batch normalization's statistics to those of a dataset.

    Runs the model in training mode without backpropagation over
    ``n_batches`` global batches, each process drawing from its own
    ``iterator``, and sets ``avg_mean`` and ``avg_var`` of every
    :class:`~multinode_bn.MultiNodeBatchNormalization` to the exact mean and
    unbiased variance of all the inputs it received on all processes of its
    communicator (bit-identical on every process), and ``N`` to the number
    of its calls. A plain :class:`chainer.links.BatchNormalization` gets the
    statistics of its own process's inputs. Parameters, gradients and other
    persistent values are left as they were.

    Every process makes the same synchronized calls: one whose data ran out
    runs the model on an empty batch, and a failure on one process (reading
    a batch, or a model that refuses an empty batch) raises the same
    ``RuntimeError`` on every process. The iterator is advanced, not
    rewound.

    Args:
        model (~chainer.Link): The model whose batch normalizations are
            updated.
        iterator: This process's iterator over its shard of the data.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` spanning every
            process that runs the model.
        n_batches (int or None): Number of global batches; ``None`` runs
            until every process's iterator is exhausted (it must not
            repeat).
        converter: Turns a list of examples into input arrays, as for
            Chainer's ``Evaluator``.
        device: Device the converter sends the arrays to.
        forward (callable): What to call instead of ``model``, as
            ``forward(*in_arrays)``, ``forward(**in_arrays)`` or
            ``forward(in_arrays)`` for a tuple, a dict or an array.

    Returns:
        int: The number of global batches run (equal on every process).

    .. admonition:: Example

        >>> it = chainer.iterators.SerialIterator(train_shard, 64,
        ...                                       repeat=False, shuffle=False)
        >>> multinode_bn.update_population_statistics(model, it, comm)
    """
    if n_batches is not None and (int(n_batches) != n_batches
                                  or n_batches < 0):
        raise ValueError('n_batches must be a non-negative int or None; got '
                         '{!r}'.format(n_batches))
    mpi_comm = communication.mpi_comm_of(comm)
    if device is not None:
        device = backend.get_device(device)
    forward = model if forward is None else forward
    targets, seen = [], set()
    for path, link in model.namedlinks():
        # A link shared under several names is updated once.
        if _gets_population_statistics(link) and id(link) not in seen:
            seen.add(id(link))
            targets.append((path, link))
    saved = _save_persistents(model)
    recorder = _MomentRecorder()
    for _, link in targets:
        link.add_hook(recorder, name=_HOOK_NAME)
    try:
        with chainer.using_config('train', True), \
                chainer.using_config('enable_backprop', False):
            steps = _run_batches(forward, iterator, mpi_comm, n_batches,
                                 converter, device, recorder)
        merged = _merge_over_processes(targets, recorder)
    except BaseException:
        _restore_persistents(saved)
        raise
    finally:
        for _, link in targets:
            link.delete_hook(_HOOK_NAME)
    _restore_persistents(saved)
    unseen = []
    for path, link in targets:
        moments, calls = merged[id(link)]
        if moments is None or not (moments[:, 0] > 0).all():
            unseen.append(path)
            continue
        _set_statistics(link, population_mean_and_variance(moments), calls)
    if unseen:
        warnings.warn(
            'update_population_statistics: {} received no input on any '
            'process during {} batch(es) and kept its statistics.'.format(
                ', '.join(unseen), steps), UserWarning)
    return steps


def population_mean_and_variance(moments):
    """Mean and unbiased variance from merged ``(count, mean, m2)`` triples.

    Args:
        moments (numpy.ndarray): ``(C, 3)`` float64 moments.

    Returns:
        tuple: ``(mean, var)``, float64 ``(C,)``; ``var = m2 / (count - 1)``
        (``0`` for a single sample, as Chainer's running variance).
    """
    count = moments[:, 0]
    return moments[:, 1].copy(), moments[:, 2] / numpy.maximum(count - 1, 1)


_HOOK_NAME = 'multinode_bn.population_statistics'


def _gets_population_statistics(link):
    return (isinstance(link, MultiNodeBatchNormalization)
            or type(link) is L.BatchNormalization)


class _MomentRecorder(chainer.LinkHook):
    """Merges the local moments of every call of the hooked links."""

    name = _HOOK_NAME

    def __init__(self):
        self.moments = {}  # id(link) -> float64 (C, 3) moments
        self.calls = {}    # id(link) -> number of calls
        self.paused = False

    def forward_postprocess(self, args):
        # After the call: the link is initialized and the call succeeded.
        if self.paused:
            return
        link = args.link
        x = args.args[0] if args.args else args.kwargs['x']
        layout = None
        if isinstance(x, chainer.Variable):
            layout = x.layout
            x = x.raw_array
        if backend.get_array_module(x) is chainerx:
            x = backend.from_chx(x)
        # The logical layout (a view): axes as the link sees them.
        x = memory_layouts._transpose_array(x, layout, None)
        axis = tuple(_bn._compute_axis(x.ndim, link.avg_mean.ndim,
                                       link.axis))
        moments = _local_moments(x, axis)
        key = id(link)
        if key in self.moments:
            moments = statistics.merge_moments(numpy, self.moments[key],
                                               moments)
        self.moments[key] = moments
        self.calls[key] = self.calls.get(key, 0) + 1


def _local_moments(x, axis):
    """Host float64 ``(C, 3)`` ``(count, mean, m2)`` of one input, channels
    in the order of the kept axes (that of ``avg_mean``)."""
    layout = statistics.Layout.of(x, axis)
    if layout.shape3[0] * layout.shape3[2] == 0:
        # The statistics layer needs a sample; an empty batch (a process
        # whose data ran out) adds nothing but its call.
        return numpy.zeros((layout.shape3[1], 3), dtype=numpy.float64)
    # Computed in float64 whatever the input's dtype: this pass runs once
    # before an evaluation and favours exactness over speed.
    reference = statistics.ReferenceStatistics(
        backend.get_array_module(x), numpy.float64)
    return communication.to_host(reference.local_moments(layout.view(x)))


def _run_batches(forward, iterator, mpi_comm, n_batches, converter, device,
                 recorder):
    """Runs the same number of forward calls on every process."""
    # Chainer's iterators cannot iterate over an empty dataset (the epoch
    # detail divides by its length): such a process has no data at all.
    dataset = getattr(iterator, 'dataset', None)
    exhausted = dataset is not None and len(dataset) == 0
    step = 0
    probed = False
    while n_batches is None or step < n_batches:
        in_arrays, report = None, None
        if not exhausted:
            try:
                if n_batches is None and getattr(iterator, 'repeat', False):
                    raise ValueError(
                        'n_batches=None needs an iterator that does not '
                        'repeat')
                batch = iterator.next()
                if len(batch):
                    in_arrays = convert._call_converter(converter, batch,
                                                        device)
                    report = _batch_signature(in_arrays)
            except StopIteration:
                exhausted = True
            except Exception as e:
                report = ('error', '{}: {}'.format(type(e).__name__, e))
        reports = communication.allgather_objects(mpi_comm, report)
        errors = [(r, s[1]) for r, s in enumerate(reports)
                  if s is not None and s[0] == 'error']
        if errors:
            raise RuntimeError(
                'update_population_statistics (raised on rank {}): reading '
                'batch {} failed on rank(s) {}:\n{}'.format(
                    mpi_comm.rank, step, ', '.join(str(r) for r, _ in errors),
                    '\n'.join('  rank {}: {}'.format(r, m)
                              for r, m in errors)))
        template = next((s for s in reports if s is not None), None)
        if template is None:
            break  # no process has data left
        if not probed and None in reports:
            probed = True
            _probe_empty_batch(forward, template, device, recorder, step,
                               reports, mpi_comm.rank)
        if in_arrays is None:
            in_arrays = _empty_batch(template, device)
        _call_forward(forward, in_arrays)
        step += 1
    return step


def _call_forward(forward, in_arrays):
    if isinstance(in_arrays, tuple):
        return forward(*in_arrays)
    if isinstance(in_arrays, dict):
        return forward(**in_arrays)
    return forward(in_arrays)


def _probe_empty_batch(forward, template, device, recorder, step, reports,
                       rank):
    """Runs the model on an empty batch on *every* process, unrecorded.

    Not every model takes an empty batch (max pooling, for one, refuses
    it). Were only the processes without data to find out, they would raise
    alone while the others wait in a synchronized call; with the same empty
    input everywhere, every process takes the same path and fails, if at
    all, at the same place.
    """
    recorder.paused = True
    try:
        with warnings.catch_warnings():
            # An empty probe normalizes nothing: the warnings that a batch
            # gives a zero output would be false.
            for message in _ZERO_OUTPUT_WARNINGS:
                warnings.filterwarnings('ignore', message=message)
            _call_forward(forward, _empty_batch(template, device))
    except Exception as e:
        empty = [r for r, s in enumerate(reports) if s is None]
        raise RuntimeError(
            'update_population_statistics (raised on rank {}): rank(s) {} '
            'have no data for batch {}, and the model does not accept an '
            'empty batch ({}: {}). Give every process data for every batch: '
            'equal shards (chainermn.scatter_dataset), or n_batches with '
            'repeating iterators.'.format(
                rank, ', '.join(map(str, empty)), step, type(e).__name__,
                str(e).strip().splitlines()[-1] if str(e).strip() else ''))
    finally:
        recorder.paused = False


_ZERO_OUTPUT_WARNINGS = (
    'MultiNodeBatchNormalization received a global batch',
    'A batch with no more than one sample',
    'F.batch_normalization received a batch with single')


def _batch_signature(in_arrays):
    """What an empty batch must copy of converted arrays: their structure
    (tuple, dict or array), sample shapes and dtypes."""
    if isinstance(in_arrays, tuple):
        return ('tuple', [_batch_signature(a) for a in in_arrays])
    if isinstance(in_arrays, dict):
        return ('dict', {k: _batch_signature(a)
                         for k, a in in_arrays.items()})
    if isinstance(in_arrays, chainer.Variable):
        in_arrays = in_arrays.array
    shape = getattr(in_arrays, 'shape', None)
    dtype = getattr(in_arrays, 'dtype', None)
    if shape is None or dtype is None or not shape:
        raise TypeError(
            'the converter must return arrays with a batch axis (or a tuple '
            'or dict of them) to run processes without data on an empty '
            'batch; got {}'.format(type(in_arrays).__name__))
    return ('array', tuple(shape[1:]), numpy.dtype(dtype).str)


def _empty_batch(signature, device):
    kind = signature[0]
    if kind == 'tuple':
        return tuple(_empty_batch(d, device) for d in signature[1])
    if kind == 'dict':
        return {k: _empty_batch(d, device) for k, d in signature[1].items()}
    _, sample_shape, dtype = signature
    empty = numpy.zeros((0,) + tuple(sample_shape), dtype=dtype)
    return empty if device is None else device.send(empty)


def _merge_over_processes(targets, recorder):
    """Per link ``(moments, calls)``; synchronized links merged over their
    communicator (one exchange per communicator), plain links local."""
    merged = {}
    groups = []  # [(mpi_comm, [(path, link), ...])], in model order
    for path, link in targets:
        moments = recorder.moments.get(id(link))
        calls = recorder.calls.get(id(link), 0)
        if isinstance(link, MultiNodeBatchNormalization):
            mpi_comm = communication.mpi_comm_of(link.comm)
            for group_comm, members in groups:
                if group_comm is mpi_comm:
                    members.append((path, link))
                    break
            else:
                groups.append((mpi_comm, [(path, link)]))
        merged[id(link)] = (moments, calls)
    for mpi_comm, members in groups:
        local = [(path, merged[id(link)][1], merged[id(link)][0])
                 for path, link in members]
        gathered = communication.allgather_objects(mpi_comm, local)
        layouts = [[(p, c, None if m is None else m.shape)
                    for p, c, m in per_rank] for per_rank in gathered]
        if any(layout != layouts[0] for layout in layouts):
            raise InconsistentInputError(
                'update_population_statistics (raised on rank {}): processes '
                'saw different batch normalizations (path, calls, moments '
                'shape):\n{}\nEvery process must run the same model.'.format(
                    mpi_comm.rank, '\n'.join(
                        '  rank {}: {}'.format(r, layout)
                        for r, layout in enumerate(layouts))))
        for i, (path, link) in enumerate(members):
            total = None
            # Merged in rank order on every process: identical results.
            for per_rank in gathered:
                moments = per_rank[i][2]
                if moments is None:
                    continue
                total = moments if total is None else \
                    statistics.merge_moments(numpy, total, moments)
            merged[id(link)] = (total, gathered[0][i][1])
    return merged


def _set_statistics(link, mean_var, calls):
    mean, var = mean_var
    for name, value in (('avg_mean', mean), ('avg_var', var)):
        current = getattr(link, name)
        # Sent to the persistent's own device, which need not be the
        # current one.
        current[...] = backend.get_device_from_array(current).send(
            value.reshape(current.shape).astype(current.dtype))
    link.N = calls


def _save_persistents(model):
    saved = []
    for link in model.links():
        for name in link._persistent:
            value = link.__dict__[name]
            copy = value.copy() if hasattr(value, 'copy') else value
            saved.append((link, name, value, copy))
    return saved


def _restore_persistents(saved):
    for link, name, value, copy in saved:
        current = link.__dict__.get(name)
        if value is None and current is not None:
            continue  # initialized by its first call, as training would
        if (current is value and hasattr(value, 'shape')
                and getattr(copy, 'shape', None) == value.shape):
            current[...] = copy  # in place: references stay valid
        else:
            setattr(link, name, copy)
