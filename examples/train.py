"""Train a small convolutional network with local or synchronized batch norm.

Launch on several processes (``-m mpi4py`` makes an exception on one rank
abort the whole job instead of leaving the others waiting in a collective)::

    mpiexec -n 4 python -m mpi4py examples/train.py --bn multinode
    mpiexec -n 4 python -m mpi4py examples/train.py --bn local

or on one process, the reference the synchronized run should match::

    python examples/train.py --bn local --batchsize 8

``--batchsize`` is per process (default 2), so the three commands all train on
global batches of 8 images and run the same number of iterations per epoch.
The model is written with plain ``L.BatchNormalization``; ``--bn multinode``
converts it with :func:`multinode_bn.create_mnbn_model`.

Every rank prints its own mean training loss once per epoch; rank 0 also
shows Chainer's usual log and progress bar and writes ``accuracy.json``
(validation accuracy per epoch, read by ``run_demo.py``), the ``log`` of
``LogReport`` and the trained model, with local batch normalization again,
as ``model.npz``.
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

N_CLASS = 4
IMAGE_SIZE = 16
PATCH_SIZE = 8
DATA_SEED = 0


def make_dataset(n, seed):
    """Synthetic oriented-texture images; the same on every process.

    Each 1x16x16 image holds an 8x8 patch of stripes at a random position
    on a background of pixel noise. The class is the orientation of the
    stripes: about 0, 45, 90 or 135 degrees (their period and phase vary).
    Every image then gets its own brightness offset and contrast gain, the
    gain spread over an order of magnitude, so the statistics of a batch of
    two images swing widely from batch to batch.

    Args:
        n (int): Number of images.
        seed (int): Seed of the generator; equal seeds give equal sets.

    Returns:
        chainer.datasets.TupleDataset: ``(image, label)`` pairs, float32
        images of shape ``(1, 16, 16)`` and int32 labels in ``[0, 4)``.
    """
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, N_CLASS, size=n).astype(np.int32)
    angle = labels * (np.pi / N_CLASS) + rng.uniform(-0.15, 0.15, size=n)
    period = rng.uniform(3.0, 5.0, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    yy, xx = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE].astype(np.float64)
    proj = (np.cos(angle)[:, None, None] * xx
            + np.sin(angle)[:, None, None] * yy)
    patches = np.sin(2 * np.pi * proj / period[:, None, None]
                     + phase[:, None, None])

    images = rng.normal(0, 0.6, size=(n, IMAGE_SIZE, IMAGE_SIZE))
    top = rng.randint(0, IMAGE_SIZE - PATCH_SIZE + 1, size=n)
    left = rng.randint(0, IMAGE_SIZE - PATCH_SIZE + 1, size=n)
    for i in range(n):
        images[i, top[i]:top[i] + PATCH_SIZE,
               left[i]:left[i] + PATCH_SIZE] += patches[i]

    gain = np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=n))
    offset = rng.normal(0, 2.0, size=n)
    images = images * gain[:, None, None] + offset[:, None, None]
    images = images[:, None].astype(np.float32)
    return chainer.datasets.TupleDataset(images, labels)


class ConvNet(chainer.Chain):
    """Four convolution blocks and a two-layer classifier, all with batch norm.

    Every hidden layer is followed by ``L.BatchNormalization`` and there is
    no path around one (no residual shortcut; the layers before a
    normalization have no bias, the normalization supplies it). ``bn5``
    normalizes globally pooled features, one value per image and channel:
    over a batch of two images it sees two values per channel, while
    ``bn4`` (4x4 maps) sees 32.

    Args:
        n_class (int): Number of classes.
        fc_bn (bool): If ``False``, no ``bn5``; ``fc1`` gets a bias instead.
    """

    def __init__(self, n_class=N_CLASS, fc_bn=True):
        super(ConvNet, self).__init__()
        self.fc_bn = fc_bn
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 16, 3, pad=1, nobias=True)
            self.bn1 = L.BatchNormalization(16)
            self.conv2 = L.Convolution2D(16, 32, 3, pad=1, nobias=True)
            self.bn2 = L.BatchNormalization(32)
            self.conv3 = L.Convolution2D(32, 32, 3, pad=1, nobias=True)
            self.bn3 = L.BatchNormalization(32)
            self.conv4 = L.Convolution2D(32, 64, 3, pad=1, nobias=True)
            self.bn4 = L.BatchNormalization(64)
            self.fc1 = L.Linear(64, 64, nobias=fc_bn)
            if fc_bn:
                self.bn5 = L.BatchNormalization(64)
            self.fc2 = L.Linear(64, n_class)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))                          # 16x16
        h = F.max_pooling_2d(F.relu(self.bn2(self.conv2(h))), 2)     # 8x8
        h = F.max_pooling_2d(F.relu(self.bn3(self.conv3(h))), 2)     # 4x4
        h = F.relu(self.bn4(self.conv4(h)))
        h = self.fc1(F.average(h, axis=(2, 3)))
        if self.fc_bn:
            h = self.bn5(h)
        h = F.relu(h)
        return self.fc2(h)


class RankLossReport(training.Extension):
    """Prints this rank's mean training loss at the end of every epoch.

    Runs on every process, so the output shows that each rank trains (and,
    with local batch normalization, how their losses differ).
    """

    trigger = 1, 'iteration'
    priority = training.PRIORITY_READER

    def __init__(self, rank, key='main/loss'):
        self.rank = rank
        self.key = key
        self.summary = chainer.reporter.DictSummary()

    def __call__(self, trainer):
        self.summary.add({self.key: trainer.observation[self.key]})
        if trainer.updater.is_new_epoch:
            loss = self.summary.compute_mean()[self.key]
            # One write per line, so lines of different ranks do not
            # interleave in mpiexec's merged output.
            sys.stdout.write('rank {} epoch {} loss {:.4f}\n'.format(
                self.rank, trainer.updater.epoch, float(loss)))
            sys.stdout.flush()
            self.summary = chainer.reporter.DictSummary()


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
    parser.add_argument('--n-train', type=int, default=1024,
                        help='training images (all processes together)')
    parser.add_argument('--n-test', type=int, default=1024,
                        help='validation images (all processes together)')
    parser.add_argument('--alpha', type=float, default=1e-3,
                        help='Adam step size (a tenth for the last epoch)')
    parser.add_argument('--no-fc-bn', action='store_true',
                        help='leave out bn5, the batch normalization of '
                             'pooled features (see docs/usage.md)')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (for logs)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    comm = chainermn.create_communicator('naive')
    rank = comm.rank

    # Same seed on every rank: equal initial weights (the multi-node
    # optimizer broadcasts rank 0's anyway) and an equal dataset.
    np.random.seed(args.seed)
    model = ConvNet(fc_bn=not args.no_fc_bn)
    if args.bn == 'multinode':
        model = multinode_bn.create_mnbn_model(model, comm)
    classifier = L.Classifier(model)

    optimizer = chainermn.create_multi_node_optimizer(
        chainer.optimizers.Adam(alpha=args.alpha), comm)
    optimizer.setup(classifier)

    # The data set is fixed (DATA_SEED); --seed only changes the weights,
    # which images each rank gets and in which order it sees them.
    if rank == 0:
        train = make_dataset(args.n_train, DATA_SEED)
        test = make_dataset(args.n_test, DATA_SEED + 1)
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

    bn_links = sorted({type(link).__name__ for link in model.links()
                       if isinstance(link, L.BatchNormalization)})
    sys.stdout.write('rank {} of {}: {}, {} training images, {} per '
                     'iteration\n'.format(rank, comm.size, ', '.join(bn_links),
                                           len(train), args.batchsize))
    sys.stdout.flush()

    updater = training.StandardUpdater(train_iter, optimizer)
    trainer = training.Trainer(updater, (args.epoch, 'epoch'), out=args.out)

    # Evaluation runs with chainer.config.train == False: batch normalization
    # uses its running statistics, global for the synchronized link, this
    # rank's own for the local one. Accuracies are averaged over ranks.
    evaluator = extensions.Evaluator(test_iter, classifier)
    trainer.extend(chainermn.create_multi_node_evaluator(evaluator, comm))
    trainer.extend(RankLossReport(rank))
    # A tenth of the step size for the last epoch settles the weights, so
    # the final accuracy depends less on where the last step happened to land.
    trainer.extend(extensions.ExponentialShift('alpha', 0.1),
                   trigger=training.triggers.ManualScheduleTrigger(
                       [args.epoch - 1], 'epoch'))
    if rank == 0:
        trainer.extend(extensions.LogReport())
        trainer.extend(extensions.PrintReport(
            ['epoch', 'main/loss', 'validation/main/loss',
             'main/accuracy', 'validation/main/accuracy', 'elapsed_time']))
        if not args.no_progress:
            trainer.extend(extensions.ProgressBar(update_interval=50))

    trainer.run()

    if rank == 0:
        log = trainer.get_extension('LogReport').log
        result = {
            'bn': args.bn,
            'fc_bn': not args.no_fc_bn,
            'processes': comm.size,
            'batchsize_per_process': args.batchsize,
            'seed': args.seed,
            'epoch': [entry['epoch'] for entry in log],
            'validation_accuracy': [
                float(entry['validation/main/accuracy']) for entry in log],
            'validation_loss': [
                float(entry['validation/main/loss']) for entry in log],
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
