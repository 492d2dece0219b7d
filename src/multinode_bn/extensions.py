"""The trainer extension for population statistics."""

import copy

from chainer.dataset import convert
from chainer.training import extension

from multinode_bn.population import update_population_statistics


class PopulationStatistics(extension.Extension):
    """Trainer extension that recomputes exact population statistics.

    Calls :func:`~multinode_bn.update_population_statistics` at each
    trigger, with the iterator rewound (``reset()``, else a copy), and runs
    before Chainer's ``Evaluator``, ChainerMN's multi-node evaluator and the
    snapshots at the same trigger. Every process must reach it at the same
    iterations. docs/usage.md has a complete example.

    Args:
        iterator: This process's iterator, usually over its shard of the
            training data; not repeating if ``n_batches`` is ``None``.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` of every process.
        n_batches (int or None): Global batches per run; ``None``: until
            every process's shard is exhausted.
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
        self.iterator = iterator
        self.comm = comm
        self.n_batches = n_batches
        self.target = target
        self.converter = converter
        self.device = device
        self.forward = forward
        self.trigger = trigger

    def __call__(self, trainer):
        model = self.target
        if model is None:
            model = trainer.updater.get_optimizer('main').target
        iterator = self.iterator
        if hasattr(iterator, 'reset'):
            iterator.reset()
        else:
            iterator = copy.copy(iterator)
        update_population_statistics(
            model, iterator, self.comm, self.n_batches,
            converter=self.converter, device=self.device,
            forward=self.forward)

    def finalize(self):
        """Finalizes the iterator."""
        if hasattr(self.iterator, 'finalize'):
            self.iterator.finalize()
