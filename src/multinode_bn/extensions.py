"""The trainer extension for population statistics."""

import copy

from chainer.dataset import convert
from chainer.training import extension

from multinode_bn.population import update_population_statistics


class PopulationStatistics(extension.Extension):
    """Trainer extension that recomputes exact population statistics.

    Runs :func:`~multinode_bn.update_population_statistics`, on every
    process at the same iterations, before the evaluators and snapshots of
    the same trigger; the iterator is rewound (``reset()``, else copied).

    Args:
        iterator: This process's iterator (finite for ``n_batches=None``).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` of every process.
        n_batches (int or None): Global batches per run (``None``: all).
        target (~chainer.Link): Default: the ``'main'`` optimizer's target.
        converter: Turns examples into input arrays.
        device: Device the arrays are sent to.
        forward (callable): What to call instead of the model.
        trigger: When to run.
    """

    priority = extension.PRIORITY_WRITER + 1  # before Evaluator, snapshots
    default_name = 'population_statistics'

    def __init__(self, iterator, comm, n_batches=None, target=None,
                 converter=convert.concat_examples, device=None,
                 forward=None, trigger=(1, 'epoch')):
        self.iterator, self.comm, self.target = iterator, comm, target
        self.trigger = trigger
        self._options = dict(n_batches=n_batches, converter=converter,
                             device=device, forward=forward)

    def __call__(self, trainer):
        model = (self.target if self.target is not None
                 else trainer.updater.get_optimizer('main').target)
        iterator = self.iterator
        if hasattr(iterator, 'reset'):
            iterator.reset()
        else:
            iterator = copy.copy(iterator)
        update_population_statistics(model, iterator, self.comm,
                                     **self._options)

    def finalize(self):
        if hasattr(self.iterator, 'finalize'):
            self.iterator.finalize()
