"""Train a small convolutional network with local or synchronized batch norm.

The data are scikit-learn's bundled handwritten digits
(:func:`sklearn.datasets.load_digits`: 1,797 grayscale 8x8 images of the
digits 0-9, shipped inside the scikit-learn package, no download).

Launch on several processes (``-m mpi4py`` makes an exception on one rank
abort the whole job instead of leaving the others waiting in a collective)::

    mpiexec -n 4 python -m mpi4py examples/train.py --bn multinode
    mpiexec -n 4 python -m mpi4py examples/train.py --bn local

or on one process, the reference the synchronized run should match::

    python examples/train.py --bn local --batchsize 8

``--batchsize`` is per process (default 2), so the three commands all train on
global batches of 8 images and run the same number of iterations per epoch.
The model is written with plain ``L.BatchNormalization``; ``--bn multinode``
converts it with :func:`multinode_bn.create_mnbn_model`. On one process
there is nothing to synchronize with, and the script says so.

Only rank 0 prints, so that lines of different processes never interleave:
every rank's mean training loss once per epoch (gathered), Chainer's log
line per epoch as it happens (each line in one write). Rank 0 also writes
``accuracy.json`` (validation accuracy per epoch, read by ``run_demo.py``),
the ``log`` of ``LogReport`` and the trained model, with local batch
normalization again, as ``model.npz``.

Validation accuracy is measured twice after every epoch: with the running
averages of the batch normalization statistics (``validation/main/...``, as
Chainer's ``Evaluator`` does), and with exact population statistics of the
training images computed by :func:`multinode_bn.update_population_statistics`
(``population/main/...``), after which the running averages are restored.
"""

import argparse
import json
import os
import sys

import numpy as np

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import training
from chainer.training import extensions
import chainermn

import multinode_bn

N_CLASS = 10
N_TEST = 597        # of the 1,797 digits; the other 1,200 are for training
DATA_SEED = 0


def load_digits_split():
    """scikit-learn's handwritten digits, split into training and validation.

    The split is fixed (``DATA_SEED``), the same on every process and for
    every ``--seed``.

    Returns:
        tuple: ``(train, test)``, two :class:`chainer.datasets.TupleDataset`
        of float32 images of shape ``(1, 8, 8)`` scaled to ``[0, 1]`` and
        int32 labels in ``[0, 10)``: 1,200 and 597 pairs.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(DATA_SEED).permutation(len(labels))
    test, train = order[:N_TEST], order[N_TEST:]
    return (chainer.datasets.TupleDataset(images[train], labels[train]),
            chainer.datasets.TupleDataset(images[test], labels[test]))


class ConvNet(chainer.Chain):
    """Three convolution blocks with batch norm and a linear classifier.

    Batch normalization follows every convolution, as in the detection and
    segmentation backbones where per-process batches are small; the
    classifier on the globally pooled features has none. The convolutions
    have no bias (the normalization supplies it). Over a batch of two
    images, ``bn1`` and ``bn2`` see 128 values per channel (8x8 maps),
    ``bn3`` sees 32 (4x4).

    Args:
        n_class (int): Number of classes.
    """

    def __init__(self, n_class=N_CLASS):
        super(ConvNet, self).__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 16, 3, pad=1, nobias=True)
            self.bn1 = L.BatchNormalization(16)
            self.conv2 = L.Convolution2D(16, 32, 3, pad=1, nobias=True)
            self.bn2 = L.BatchNormalization(32)
            self.conv3 = L.Convolution2D(32, 64, 3, pad=1, nobias=True)
            self.bn3 = L.BatchNormalization(64)
            self.fc = L.Linear(64, n_class)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))                          # 8x8
        h = F.max_pooling_2d(F.relu(self.bn2(self.conv2(h))), 2)     # 4x4
        h = F.relu(self.bn3(self.conv3(h)))
        return self.fc(F.average(h, axis=(2, 3)))


class WholeLines(object):
    """A stream that passes on only whole lines, each batch in one write.

    Chainer's ``PrintReport`` writes a row in pieces; through this, a row
    reaches mpiexec's merged output in one piece.

    Args:
        stream: Where the lines go (``sys.stdout``).
    """

    def __init__(self, stream):
        self.stream = stream
        self.pending = ''

    def write(self, text):
        self.pending += text
        end = self.pending.rfind('\n') + 1
        if end:
            self.stream.write(self.pending[:end])
            self.stream.flush()
            self.pending = self.pending[end:]

    def flush(self):
        pass   # a partial line waits for its end


def print_on_rank_0(comm, line):
    """Rank 0 prints every rank's ``line``, in rank order, in one write.

    Only rank 0 writes, so lines of different processes cannot interleave
    in mpiexec's merged output. Collective over ``comm``.
    """
    lines = comm.gather_obj(line, root=0)
    if comm.rank == 0:
        sys.stdout.write(''.join(text + '\n' for text in lines))
        sys.stdout.flush()


class RankLossReport(training.Extension):
    """Prints every rank's mean training loss at the end of every epoch.

    Runs on every process (its gather is collective) and rank 0 prints the
    lines of all ranks, so the output shows that each rank trains (and,
    with local batch normalization, how their losses differ).
    """

    trigger = 1, 'iteration'
    priority = training.PRIORITY_READER

    def __init__(self, comm, key='main/loss'):
        self.comm = comm
        self.key = key
        self.summary = chainer.reporter.DictSummary()

    def __call__(self, trainer):
        self.summary.add({self.key: trainer.observation[self.key]})
        if trainer.updater.is_new_epoch:
            loss = self.summary.compute_mean()[self.key]
            print_on_rank_0(self.comm, 'rank {} epoch {} loss {:.4f}'.format(
                self.comm.rank, trainer.updater.epoch, float(loss)))
            self.summary = chainer.reporter.DictSummary()


class PopulationStatisticsEvaluator(extensions.Evaluator):
    """Evaluates with exact population statistics instead of running averages.

    Before each evaluation, :func:`multinode_bn.update_population_statistics`
    runs this process's training images through the model (training mode, no
    backpropagation, batches of ``batchsize``) and sets every batch
    normalization's ``avg_mean`` and ``avg_var`` to the exact mean and
    variance of its inputs: over all processes for the synchronized link,
    over this process's images for ``L.BatchNormalization``. After the
    evaluation the running averages are put back, so training goes on as if
    this extension were not there. Reported as ``population/main/...``.

    Args:
        iterator: Validation iterator, as for ``extensions.Evaluator``.
        target (~chainer.links.Classifier): The classifier to evaluate.
        train (dataset): This process's training images.
        comm: The communicator of the processes.
        batchsize (int): Images per process and forward pass.
    """

    default_name = 'population'

    def __init__(self, iterator, target, train, comm, batchsize=100):
        super(PopulationStatisticsEvaluator, self).__init__(iterator, target)
        self.train, self.comm, self.batchsize = train, comm, batchsize

    def evaluate(self):
        predictor = self.get_target('main').predictor
        links = [link for link in predictor.links()
                 if isinstance(link, L.BatchNormalization)]
        saved = [(link.avg_mean.copy(), link.avg_var.copy(), link.N)
                 for link in links]
        images = chainer.iterators.SerialIterator(
            self.train, self.batchsize, repeat=False, shuffle=False)
        try:
            multinode_bn.update_population_statistics(
                predictor, images, self.comm,
                forward=lambda x, t: predictor(x))
            return super(PopulationStatisticsEvaluator, self).evaluate()
        finally:
            for link, (mean, var, n) in zip(links, saved):
                link.avg_mean[...] = mean
                link.avg_var[...] = var
                link.N = n


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--bn', choices=('local', 'multinode'),
                        default='multinode',
                        help='local: L.BatchNormalization, statistics of '
                             'this process only; multinode: statistics of '
                             'all processes')
    parser.add_argument('--batchsize', type=int, default=2,
                        help='images per process and iteration')
    parser.add_argument('--epoch', type=int, default=4)
    parser.add_argument('--out', default='result/train',
                        help='output directory (written by rank 0)')
    parser.add_argument('--seed', type=int, default=1,
                        help='seed of initial weights and data order')
    parser.add_argument('--alpha', type=float, default=1e-3,
                        help='Adam step size (a tenth for the last epoch)')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (for logs)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import sklearn  # NOQA
    except ImportError:
        # On every rank, before any collective, so that all ranks stop.
        sys.exit('examples/train.py needs scikit-learn for its data (the '
                 'digits ship inside it): pip install scikit-learn, or '
                 'make demo, which installs it into .venv')
    comm = chainermn.create_communicator('naive')
    rank = comm.rank

    # Same seed on every rank: equal initial weights (the multi-node
    # optimizer broadcasts rank 0's anyway) and an equal dataset.
    np.random.seed(args.seed)
    model = ConvNet()
    if args.bn == 'multinode':
        model = multinode_bn.create_mnbn_model(model, comm)
    classifier = L.Classifier(model)

    optimizer = chainermn.create_multi_node_optimizer(
        chainer.optimizers.Adam(alpha=args.alpha), comm)
    optimizer.setup(classifier)

    # The split is fixed (DATA_SEED); --seed only changes the weights,
    # which images each rank gets and in which order it sees them.
    if rank == 0:
        train, test = load_digits_split()
    else:
        train = test = None
    train = chainermn.scatter_dataset(train, comm, shuffle=True,
                                      seed=args.seed)
    test = chainermn.scatter_dataset(test, comm)

    order = chainer.iterators.ShuffleOrderSampler(
        np.random.RandomState(args.seed * 1000 + rank))
    train_iter = chainer.iterators.SerialIterator(
        train, args.batchsize, order_sampler=order)
    test_iter = chainer.iterators.SerialIterator(
        test, 128, repeat=False, shuffle=False)

    if comm.size == 1:
        sys.stdout.write(
            'note: 1 process, so batch normalization is not synchronized '
            '(statistics of this process\'s {} images only); for N processes '
            'run: mpiexec -n N python -m mpi4py {}\n'.format(
                args.batchsize, os.path.relpath(__file__)))
    bn_links = sorted({type(link).__name__ for link in model.links()
                       if isinstance(link, L.BatchNormalization)})
    print_on_rank_0(comm, 'rank {} of {}: {}, {} training images, {} per '
                    'iteration'.format(rank, comm.size, ', '.join(bn_links),
                                       len(train), args.batchsize))

    updater = training.StandardUpdater(train_iter, optimizer)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    # Evaluation runs with chainer.config.train == False: batch normalization
    # uses its running statistics, global for the synchronized link, this
    # rank's own for the local one. Accuracies are averaged over ranks.
    evaluator = extensions.Evaluator(test_iter, classifier)
    trainer.extend(chainermn.create_multi_node_evaluator(evaluator, comm))
    # The same evaluation with exact population statistics of the training
    # images instead of the running averages.
    population = PopulationStatisticsEvaluator(
        chainer.iterators.SerialIterator(test, 128, repeat=False,
                                         shuffle=False),
        classifier, train, comm)
    trainer.extend(chainermn.create_multi_node_evaluator(population, comm))
    trainer.extend(RankLossReport(comm))
    # A tenth of the step size for the last epoch settles the weights, so
    # the final accuracy depends less on where the last step happened to land.
    trainer.extend(extensions.ExponentialShift('alpha', 0.1),
                   trigger=training.triggers.ManualScheduleTrigger(
                       [args.epoch - 1], 'epoch'))
    if rank == 0:
        trainer.extend(extensions.LogReport())
        trainer.extend(extensions.PrintReport(
            ['epoch', 'main/loss', 'main/accuracy',
             'validation/main/accuracy', 'population/main/accuracy',
             'elapsed_time'], out=WholeLines(sys.stdout)))
        if not args.no_progress:
            trainer.extend(extensions.ProgressBar(update_interval=50))

    trainer.run()

    if rank == 0:
        log = trainer.get_extension('LogReport').log
        result = {
            'bn': args.bn,
            'processes': comm.size,
            'batchsize_per_process': args.batchsize,
            'seed': args.seed,
            'epoch': [entry['epoch'] for entry in log],
            'validation_accuracy': [
                float(entry['validation/main/accuracy']) for entry in log],
            'validation_loss': [
                float(entry['validation/main/loss']) for entry in log],
            # The same, with exact population statistics of the training
            # images instead of the running averages.
            'population_accuracy': [
                float(entry['population/main/accuracy']) for entry in log],
            # Rank 0's own batches, normalized with batch statistics.
            'train_accuracy_rank0': [
                float(entry['main/accuracy']) for entry in log],
        }
        with open(os.path.join(args.out, 'accuracy.json'), 'w') as f:
            json.dump(result, f, indent=1)
        # For single-process use the model needs no communicator.
        chainer.serializers.save_npz(
            os.path.join(args.out, 'model.npz'),
            multinode_bn.revert_mnbn_model(model))


if __name__ == '__main__':
    sys.exit(main())
