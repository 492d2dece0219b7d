"""Trainer extensions."""

import copy

from chainer.dataset import convert
from chainer.training import extension

from multinode_bn.population import update_population_statistics


class PopulationStatistics(extension.Extension):
    """Trainer extension that recomputes population statistics.

    Calls :func:`~multinode_bn.update_population_statistics` at each
    trigger, so that the evaluation and snapshot that follow use the exact
    population mean and variance of every synchronized batch normalization
    over the data of all processes, instead of the running averages of
    training. Its priority is above that of Chainer's ``Evaluator`` (and so
    of ChainerMN's ``create_multi_node_evaluator``) and of snapshots: with
    the same trigger, it runs first.

    Every process must call it at the same iterations (the same trigger and
    equally many iterations per epoch, as with
    ``chainermn.scatter_dataset``).

    Before each run the iterator is rewound with its ``reset()`` method, or
    copied if it has none (as Chainer's ``Evaluator`` does), so each run
    starts at the beginning of the shard.

    Args:
        iterator: This process's dataset iterator, usually over its shard
            of the training data. With ``n_batches=None`` it must not
            repeat.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` spanning every
            process.
        n_batches (int or None): Global batches per run; ``None`` runs
            until every process's shard is exhausted.
        target (~chainer.Link): The model; by default the target of the
            updater's ``'main'`` optimizer.
        converter: Turns a list of examples into input arrays
            (:func:`chainer.dataset.concat_examples` by default).
        device: Device the arrays are sent to.
        forward (callable): What to call instead of the model, as the
            ``eval_func`` of Chainer's ``Evaluator``.
        trigger: When to run; ``(1, 'epoch')`` by default.

    .. admonition:: Example

        >>> stats_iter = chainer.iterators.SerialIterator(
        ...     train_shard, 64, repeat=False, shuffle=False)
        >>> trainer.extend(multinode_bn.PopulationStatistics(stats_iter,
        ...                                                  comm))
        >>> trainer.extend(chainermn.create_multi_node_evaluator(
        ...     extensions.Evaluator(test_iter, model), comm))
    """

    # Above Evaluator's PRIORITY_WRITER and the snapshots' priority.
    priority = extension.PRIORITY_WRITER + 1
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
        finalize = getattr(self.iterator, 'finalize', None)
        if finalize is not None:
            finalize()
