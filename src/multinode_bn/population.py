"""Exact population statistics ("precise BN") over all processes' data."""

import contextlib
import functools
import warnings

import numpy

import chainer
from chainer import backend
from chainer.dataset import convert
from chainer.functions.normalization import batch_normalization as _bn
import chainer.links as L

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization
from multinode_bn.validation import InconsistentInputError


def update_population_statistics(model, iterator, comm, n_batches=None,
                                 converter=convert.concat_examples,
                                 device=None, forward=None):
    """Sets every batch normalization's statistics to those of a dataset.

    Each one's ``avg_mean``, ``avg_var`` and ``N`` become the exact mean,
    unbiased variance and call count of its inputs over its communicator.

    Args:
        model (~chainer.Link): Run in training mode without backpropagation.
        iterator: This process's iterator over its shard of the data.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` of all processes.
        n_batches (int or None): Global batches to run; ``None`` runs until
            every process's iterator is exhausted (it must not repeat).
        converter, device: As for Chainer's ``Evaluator``.
        forward (callable): Called instead of ``model``, as by ``Evaluator``.

    Returns:
        int: The number of global batches run, equal on every process.
    """
    if n_batches is not None and (int(n_batches) != n_batches
                                  or n_batches < 0):
        raise ValueError('n_batches must be a non-negative int or None; got '
                         '{!r}'.format(n_batches))
    device = None if device is None else backend.get_device(device)
    # Not the subclasses: L.BatchRenormalization's statistics differ.
    targets = {link: path for path, link in model.namedlinks()
               if isinstance(link, MultiNodeBatchNormalization)
               or type(link) is L.BatchNormalization}
    recorder = _MomentRecorder(targets)
    with _persistents_kept(model), chainer.using_config('train', True), \
            chainer.using_config('enable_backprop', False):
        steps = _run_batches(model if forward is None else forward, iterator,
                             comm, n_batches, converter, device, recorder)
    merged = _merge_over_processes(targets, recorder.recorded)
    unseen = []
    for link, path in targets.items():
        moments, calls = merged.get(link, (None, 0))
        if not calls or not moments[:, 0].all():
            unseen.append(path)
            continue
        mean, var = population_mean_and_variance(moments)
        for current, value in ((link.avg_mean, mean), (link.avg_var, var)):
            current[...] = link.device.send(value.reshape(current.shape))
        link.N = calls
    if unseen:
        warnings.warn('update_population_statistics: {} received no input on '
                      'any process; statistics kept'.format(', '.join(unseen)))
    return steps


def population_mean_and_variance(moments):
    """Mean and unbiased variance ``m2 / max(count - 1, 1)`` of moments.

    Args:
        moments (numpy.ndarray): ``(C, 3)`` float64 ``(count, mean, m2)``.
    """
    count = moments[:, 0]
    return moments[:, 1].copy(), moments[:, 2] / numpy.maximum(count - 1, 1)


class _MomentRecorder(chainer.LinkHook):
    """Records ``(moments, calls)`` of each target link while entered."""

    name = 'multinode_bn.population_statistics'

    def __init__(self, targets):
        self.targets = targets
        self.recorded = {}

    def forward_postprocess(self, args):
        # After the call: the link is initialized and the call succeeded.
        link = args.link
        if link not in self.targets:
            return
        x = args.args[0] if args.args else args.kwargs['x']
        # The axes as the link sees them (channel-last memory seen as NCHW).
        x = backend.from_chx(chainer.as_variable(x).as_layout(None).array)
        axis = _bn._compute_axis(x.ndim, link.avg_mean.ndim, link.axis)
        moments = _local_moments(x, tuple(axis))
        before, calls = self.recorded.get(link, (None, 0))
        if before is not None:
            moments = statistics.merge_moments(numpy, before, moments)
        self.recorded[link] = moments, calls + 1


def _local_moments(x, axis):
    """Float64 host ``(C, 3)`` moments of ``x`` (exactness over speed)."""
    layout = statistics.Layout.of(x, axis)
    reference = statistics.ReferenceStatistics(
        backend.get_array_module(x), numpy.float64)
    return communication.to_host(reference.local_moments(layout.view(x)))


def _run_batches(forward, iterator, comm, n_batches, converter, device,
                 recorder):
    """Runs the same number of recorded forward calls on every process."""
    # Chainer's iterators would divide by zero over an empty dataset.
    dataset = getattr(iterator, 'dataset', None)
    exhausted = dataset is not None and len(dataset) == 0
    step, probed = 0, False
    while n_batches is None or step < n_batches:
        # For the others: None (no batch), zero samples like it, or an error.
        arguments = report = None
        try:
            if not exhausted and n_batches is None and getattr(
                    iterator, 'repeat', False):
                raise ValueError('n_batches=None needs an iterator that does '
                                 'not repeat; pass n_batches')
            batch = [] if exhausted else iterator.next()
            if len(batch):
                arguments = _arguments(convert._call_converter(
                    converter, batch, device))
                report = _map_arrays(_no_samples, arguments)
        except StopIteration:
            exhausted = True
        except Exception as e:
            report = '{}: {}'.format(type(e).__name__, e)
        reports = communication.allgather_objects(comm, report)
        failed = [r for r, s in enumerate(reports) if isinstance(s, str)]
        if failed:
            raise RuntimeError(
                'update_population_statistics (rank {}): batch {} failed on '
                'rank(s) {}'.format(comm.rank, step, '; '.join(
                    '{}: {}'.format(r, reports[r]) for r in failed)))
        no_data = [r for r, s in enumerate(reports) if s is None]
        if len(no_data) == len(reports):
            break
        if no_data:
            empty = next(s for s in reports if s is not None)
            if device is not None:
                empty = _map_arrays(device.send, empty)
            if not probed:
                probed = True
                _probe_empty_batch(forward, empty, step, no_data, comm.rank)
            if arguments is None:
                arguments = empty
        with recorder:
            forward(*arguments[0], **arguments[1])
        step += 1
    return step


def _arguments(in_arrays):
    """The model's arguments, unpacked as by Chainer's ``Evaluator``."""
    if isinstance(in_arrays, dict):
        return (), in_arrays
    return (in_arrays if isinstance(in_arrays, tuple) else (in_arrays,)), {}


def _map_arrays(function, arguments):
    """``function`` applied to each array in nested tuples and dicts."""
    if isinstance(arguments, tuple):
        return tuple(_map_arrays(function, a) for a in arguments)
    if isinstance(arguments, dict):
        return {k: _map_arrays(function, a) for k, a in arguments.items()}
    return function(arguments)


def _no_samples(array):
    """A host array of zero samples like ``array``, a batch's."""
    array = getattr(array, 'array', array)  # a Variable's
    if not getattr(array, 'shape', None):
        raise TypeError('the converter must return arrays with a batch '
                        'axis, not {}'.format(type(array).__name__))
    return numpy.zeros((0,) + array.shape[1:], dtype=array.dtype)


def _probe_empty_batch(forward, empty, step, no_data, rank):
    """Runs the empty batch everywhere: were only the processes without
    data to find that the model refuses it, they would raise alone while
    the others wait in a synchronized call."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # zero samples: false alarms
            forward(*empty[0], **empty[1])
    except Exception as e:
        raise RuntimeError(
            'update_population_statistics (rank {}): rank(s) {} have no data '
            'for batch {} and the model does not accept an empty batch ({}: '
            '{}); use equal shards (chainermn.scatter_dataset), or '
            'n_batches and repeating iterators'
            .format(rank, ', '.join(map(str, no_data)), step,
                    type(e).__name__, str(e).strip().split('\n')[-1]))


def _merge_over_processes(paths, recorded):
    """``recorded`` merged in rank order: the same bits on every process."""
    merge = functools.partial(statistics.merge_moments, numpy)
    groups = {}  # id(mpi4py communicator) -> (it, its links in model order)
    for link in paths:
        if isinstance(link, MultiNodeBatchNormalization):
            mpi_comm = communication.mpi_comm_of(link.comm)
            groups.setdefault(id(mpi_comm), (mpi_comm, []))[1].append(link)
    for mpi_comm, links in groups.values():
        gathered = communication.allgather_objects(mpi_comm, [
            (paths[link],) + recorded.get(link, (None, 0)) for link in links])
        seen = [[(path, calls, getattr(m, 'shape', None))
                 for path, m, calls in g] for g in gathered]
        if any(s != seen[0] for s in seen):
            raise InconsistentInputError(
                'update_population_statistics (rank {}): the processes saw '
                'different batch normalizations (path, calls, moments shape):'
                '\n{}\nEvery process must run the same model.'.format(
                    mpi_comm.rank, '\n'.join('  rank {}: {}'.format(r, s)
                                             for r, s in enumerate(seen))))
        for i, link in enumerate(links):
            if link in recorded:
                moments = functools.reduce(merge, [g[i][1] for g in gathered])
                recorded[link] = moments, recorded[link][1]
    return recorded


@contextlib.contextmanager
def _persistents_kept(model):
    """Puts every persistent of ``model`` back on exit."""
    arrays = chainer.get_array_types()
    saved = [(link, name, getattr(link, name))
             for link in model.links() for name in link._persistent]
    kept = [v.copy() if isinstance(v, arrays) else v for _, _, v in saved]
    try:
        yield
    finally:
        for (link, name, value), copy in zip(saved, kept):
            if isinstance(value, arrays) and getattr(link, name) is value:
                value[...] = copy  # in place: references stay valid
            elif value is not None:  # else initialized, as training would
                setattr(link, name, copy)
