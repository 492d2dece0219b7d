"""Exact population statistics ("precise BN") over the data of all processes.

A link hook merges the float64 moments of every call of every batch
normalization; at the end the processes exchange their merged moments once
and merge them in rank order, so that all end with the same bits.
"""

import contextlib
import warnings

import numpy

import chainer
from chainer import backend
from chainer.dataset import convert
from chainer.functions.normalization import batch_normalization as _bn
import chainer.links as L
from chainer import memory_layouts

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization
from multinode_bn.validation import InconsistentInputError


def update_population_statistics(model, iterator, comm, n_batches=None,
                                 converter=convert.concat_examples,
                                 device=None, forward=None):
    """Sets every batch normalization's statistics to those of a dataset.

    Runs ``model`` in training mode without backpropagation over the
    batches of ``iterator`` (each process its own shard) and sets
    ``avg_mean``, ``avg_var`` and ``N`` of every
    :class:`~multinode_bn.MultiNodeBatchNormalization` to the exact mean,
    unbiased variance and number of calls of its inputs on all processes
    of its communicator (a plain ``L.BatchNormalization``: of its own
    process). Nothing else of the model changes. A process out of data
    runs an empty batch; a failure on one raises on all (docs/usage.md).

    Args:
        model (~chainer.Link): The model.
        iterator: This process's iterator over its shard of the data.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` spanning every
            process that runs the model.
        n_batches (int or None): Global batches to run; ``None`` runs until
            every process's iterator is exhausted (it must not repeat).
        converter: As for Chainer's ``Evaluator``.
        device: As for Chainer's ``Evaluator``.
        forward (callable): What to call instead of ``model`` with the
            converted arrays (unpacked from a tuple or a dict).

    Returns:
        int: The number of global batches run, equal on every process.
    """
    if n_batches is not None and (int(n_batches) != n_batches
                                  or n_batches < 0):
        raise ValueError('n_batches must be a non-negative int or None; got '
                         '{!r}'.format(n_batches))
    mpi_comm = communication.mpi_comm_of(comm)
    if device is not None:
        device = backend.get_device(device)
    forward = model if forward is None else forward
    targets = {}  # id -> (path, link): a link shared under two names once
    for path, link in model.namedlinks():
        # Other subclasses of L.BatchNormalization (L.BatchRenormalization)
        # mean something else by their statistics.
        if (isinstance(link, MultiNodeBatchNormalization)
                or type(link) is L.BatchNormalization):
            targets.setdefault(id(link), (path, link))
    recorder = _MomentRecorder(targets)
    with _persistents_kept(model), chainer.using_config('train', True), \
            chainer.using_config('enable_backprop', False):
        steps = _run_batches(forward, iterator, mpi_comm, n_batches,
                             converter, device, recorder)
    merged = _merge_over_processes(targets, recorder.recorded)
    unseen = []
    for path, link in targets.values():
        moments, calls = merged[id(link)]
        if moments is None or not (moments[:, 0] > 0).all():
            unseen.append(path)
            continue
        mean, var = population_mean_and_variance(moments)
        for current, value in ((link.avg_mean, mean), (link.avg_var, var)):
            # To the persistent's own device, not necessarily the current.
            current[...] = backend.get_device_from_array(current).send(
                value.reshape(current.shape).astype(current.dtype))
        link.N = calls
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
        tuple: Float64 ``(C,)`` ``mean`` and ``var = m2 / max(count - 1, 1)``.
    """
    count = moments[:, 0]
    return moments[:, 1].copy(), moments[:, 2] / numpy.maximum(count - 1, 1)


class _MomentRecorder(chainer.LinkHook):
    """Merges the moments of every input of the target links, while it is
    entered (``with recorder:``)."""

    name = 'multinode_bn.population_statistics'

    def __init__(self, targets):
        self.targets = targets
        self.recorded = {}  # id(link) -> (merged moments, number of calls)

    def forward_postprocess(self, args):
        # After the call: the link is initialized and the call succeeded.
        link = args.link
        if id(link) not in self.targets:
            return
        x = chainer.as_variable(args.args[0] if args.args
                                else args.kwargs['x'])
        # The axes as the link sees them (a view of channel-last memory).
        x = backend.from_chx(memory_layouts._transpose_array(
            x.raw_array, x.layout, None))
        axis = _bn._compute_axis(x.ndim, link.avg_mean.ndim, link.axis)
        moments, calls = self.recorded.get(id(link), (None, 0))
        self.recorded[id(link)] = (
            _merge_in_order([moments, _local_moments(x, tuple(axis))]),
            calls + 1)


def _local_moments(x, axis):
    """Host ``(C, 3)`` moments of one input, channels as in ``avg_mean``;
    float64 whatever its dtype: this pass favours exactness over speed."""
    layout = statistics.Layout.of(x, axis)
    if layout.shape3[0] * layout.shape3[2] == 0:
        # The statistics layer needs a sample; an empty batch adds nothing.
        return numpy.zeros((layout.shape3[1], 3), dtype=numpy.float64)
    reference = statistics.ReferenceStatistics(
        backend.get_array_module(x), numpy.float64)
    return communication.to_host(reference.local_moments(layout.view(x)))


def _merge_in_order(moments_list):
    """The merge of ``(C, 3)`` moments (``None``: nothing) from left to
    right: the same order gives the same bits on every process."""
    total = None
    for moments in moments_list:
        if moments is not None:
            total = moments if total is None else \
                statistics.merge_moments(numpy, total, moments)
    return total


def _run_batches(forward, iterator, mpi_comm, n_batches, converter, device,
                 recorder):
    """Runs the same number of forward calls on every process, recorded by
    ``recorder`` (not the probe)."""
    # Chainer's iterators cannot iterate over an empty dataset (the epoch
    # detail divides by its length): such a process has no data at all.
    dataset = getattr(iterator, 'dataset', None)
    exhausted = dataset is not None and len(dataset) == 0
    step, probed = 0, False
    while n_batches is None or step < n_batches:
        # What this process tells the others: None (no batch), its batch
        # with zero samples, or an error message.
        in_arrays, report = None, None
        if not exhausted:
            try:
                if n_batches is None and getattr(iterator, 'repeat', False):
                    raise ValueError('n_batches=None needs an iterator that '
                                     'does not repeat; pass n_batches')
                batch = iterator.next()
                if len(batch):
                    in_arrays = convert._call_converter(converter, batch,
                                                        device)
                    report = _map_arrays(_no_samples, in_arrays)
            except StopIteration:
                exhausted = True
            except Exception as e:
                report = '{}: {}'.format(type(e).__name__, e)
        reports = communication.allgather_objects(mpi_comm, report)
        failed = [r for r, s in enumerate(reports) if isinstance(s, str)]
        if failed:
            raise RuntimeError(
                'update_population_statistics (raised on rank {}): reading '
                'batch {} failed on rank(s) {}:\n{}'.format(
                    mpi_comm.rank, step, ', '.join(map(str, failed)),
                    '\n'.join('  rank {}: {}'.format(r, reports[r])
                              for r in failed)))
        without_data = [r for r, s in enumerate(reports) if s is None]
        if len(without_data) == len(reports):
            break  # no process has data left
        if without_data:
            empty = next(s for s in reports if s is not None)
            if device is not None:
                empty = _map_arrays(device.send, empty)
            if not probed:
                probed = True
                _probe_empty_batch(forward, empty, step, without_data,
                                   mpi_comm.rank)
            if in_arrays is None:
                in_arrays = empty
        with recorder:
            _call_forward(forward, in_arrays)
        step += 1
    return step


def _call_forward(forward, in_arrays):
    if isinstance(in_arrays, tuple):
        return forward(*in_arrays)
    if isinstance(in_arrays, dict):
        return forward(**in_arrays)
    return forward(in_arrays)


def _probe_empty_batch(forward, empty, step, without_data, rank):
    """Runs the model on an empty batch on *every* process, unrecorded:
    were only the processes without data to find out that the model
    refuses it (max pooling does), they would raise alone while the others
    wait in a synchronized call."""
    try:
        with warnings.catch_warnings():
            # The probe only asks whether the model raises: its warnings are
            # false (zero samples normalize nothing) or come again later.
            warnings.simplefilter('ignore')
            _call_forward(forward, empty)
    except Exception as e:
        message = str(e).strip()
        raise RuntimeError(
            'update_population_statistics (raised on rank {}): rank(s) {} '
            'have no data for batch {}, and the model does not accept an '
            'empty batch ({}: {}). Give every process data for every batch: '
            'equal shards (chainermn.scatter_dataset), or n_batches with '
            'repeating iterators.'.format(
                rank, ', '.join(map(str, without_data)), step,
                type(e).__name__,
                message.splitlines()[-1] if message else ''))


def _map_arrays(function, in_arrays):
    """``function`` applied to each array of a batch (or tuple or dict)."""
    if isinstance(in_arrays, tuple):
        return tuple(_map_arrays(function, a) for a in in_arrays)
    if isinstance(in_arrays, dict):
        return {k: _map_arrays(function, a) for k, a in in_arrays.items()}
    return function(in_arrays)


def _no_samples(array):
    """A host array of zero samples like ``array``'s (shape and dtype)."""
    if isinstance(array, chainer.Variable):
        array = array.array
    shape = getattr(array, 'shape', None)
    if not shape or getattr(array, 'dtype', None) is None:
        raise TypeError(
            'the converter must return arrays with a batch axis (or a tuple '
            'or dict of them) to run processes without data on an empty '
            'batch; got {}'.format(type(array).__name__))
    return numpy.zeros((0,) + tuple(shape[1:]), dtype=array.dtype)


def _merge_over_processes(targets, recorded):
    """Per link, ``(moments, calls)`` over the processes of its communicator
    (one exchange per communicator); a plain link's own."""
    merged = {key: recorded.get(key, (None, 0)) for key in targets}
    groups = {}  # id(mpi4py communicator) -> (it, its links in model order)
    for path, link in targets.values():
        if isinstance(link, MultiNodeBatchNormalization):
            mpi_comm = communication.mpi_comm_of(link.comm)
            groups.setdefault(id(mpi_comm), (mpi_comm, []))[1].append(
                (path, link))
    for mpi_comm, members in groups.values():
        gathered = communication.allgather_objects(
            mpi_comm, [(path,) + merged[id(link)] for path, link in members])
        seen = [[(path, calls, None if m is None else m.shape)
                 for path, m, calls in per_rank] for per_rank in gathered]
        if any(links != seen[0] for links in seen):
            raise InconsistentInputError(
                'update_population_statistics (raised on rank {}): processes '
                'saw different batch normalizations (path, calls, moments '
                'shape):\n{}\nEvery process must run the same model.'.format(
                    mpi_comm.rank, '\n'.join('  rank {}: {}'.format(r, links)
                                             for r, links in enumerate(seen))))
        for i, (_, link) in enumerate(members):
            merged[id(link)] = (_merge_in_order(g[i][1] for g in gathered),
                                gathered[0][i][2])
    return merged


@contextlib.contextmanager
def _persistents_kept(model):
    """Puts every persistent value of ``model`` back on exit (the forward
    passes in training mode update the running statistics)."""
    saved = []
    for link in model.links():
        for name in link._persistent:
            value = link.__dict__[name]
            saved.append((link, name, value,
                          value.copy() if hasattr(value, 'copy') else value))
    try:
        yield
    finally:
        for link, name, value, copy in saved:
            current = link.__dict__.get(name)
            if value is None and current is not None:
                continue  # initialized by its first call, as training would
            if (current is value and hasattr(value, 'shape')
                    and getattr(copy, 'shape', None) == value.shape):
                current[...] = copy  # in place: references stay valid
            else:
                setattr(link, name, copy)
