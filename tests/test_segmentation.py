"""A segmentation network built as PSPNet and DeepLab are built, one image
per process, converted by ``create_mnbn_model``: it computes what the same
network with ``L.BatchNormalization`` computes in one process on the
concatenated batch.

Pyramid pooling averages the feature map down to bins as small as 1x1, where
a local batch of one image leaves one value per channel (variance zero), and
``F.resize_images`` brings each branch back up: these are the models
synchronized batch normalization exists for, and ``F.resize_images`` is
where an install with NumPy 1.24 or newer fails (``numpy.float``).
"""

import copy

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from mpi4py import MPI

import multinode_bn

parallel = pytest.mark.parallel(nprocs=[2, 3])

SIZE = 16          # input images are SIZE x SIZE
BINS = (1, 2, 4)   # pyramid pooling bins, down to 1x1


class ConvBNReLU(chainer.Chain):

    def __init__(self, in_channels, out_channels, ksize, stride=1):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, ksize,
                                        stride=stride, pad=ksize // 2,
                                        nobias=True)
            self.bn = L.BatchNormalization(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class PyramidPooling(chainer.ChainList):
    """PSPNet's pyramid pooling: for each bin count, average pooling to
    ``bins x bins``, 1x1 conv-BN-relu, resize back; concatenated with the
    input."""

    def __init__(self, channels, bins):
        super().__init__(*[ConvBNReLU(channels, channels // len(bins), 1)
                           for _ in bins])
        self.bins = bins

    def forward(self, x):
        height, width = x.shape[2:]
        branches = [x]
        for bins, branch in zip(self.bins, self):
            k = (height // bins, width // bins)
            h = F.average_pooling_2d(x, k, stride=k)
            branches.append(F.resize_images(branch(h), (height, width)))
        return F.concat(branches, axis=1)


class TinySegmenter(chainer.Chain):
    """Encoder (stride 2), pyramid pooling, conv-BN head, per-pixel class
    scores resized to the input size, as in DeepLab's decoder."""

    def __init__(self, classes=3):
        super().__init__()
        with self.init_scope():
            self.encoder = chainer.Sequential(
                ConvBNReLU(3, 8, 3), ConvBNReLU(8, 12, 3, stride=2))
            self.pyramid = PyramidPooling(12, BINS)
            self.head = ConvBNReLU(24, 8, 3)
            self.classifier = L.Convolution2D(8, classes, 1)

    def forward(self, x):
        h = self.classifier(self.head(self.pyramid(self.encoder(x))))
        return F.resize_images(h, x.shape[2:])


def _forward_backward(model, x):
    """Output, input gradient, parameter gradients of ``sum(y ** 2)``."""
    xv = chainer.Variable(x)
    y = model(xv)
    model.cleargrads()
    F.sum(y * y).backward()
    grads = {name: param.grad.copy() for name, param in model.namedparams()}
    return y.array, xv.grad, grads


def _running_statistics(model):
    return {name: (link.avg_mean.copy(), link.avg_var.copy())
            for name, link in model.namedlinks()
            if isinstance(link, L.BatchNormalization)}


def _compare(checks, rtol, atol):
    """Every process raises when any process found a mismatch."""
    comm = MPI.COMM_WORLD
    failures = []
    for what, actual, expected in checks:
        try:
            numpy.testing.assert_allclose(actual, expected, rtol=rtol,
                                          atol=atol, err_msg=what)
        except AssertionError as e:
            failures.append('{} (shape {}): {}'.format(
                what, numpy.shape(actual), e))
    failed = [r for r, f in enumerate(comm.allgather(bool(failures))) if f]
    if failed:
        raise AssertionError('mismatch on rank(s) {}; this rank ({}): {}'
                             .format(failed, comm.rank,
                                     '\n'.join(failures) or 'matched'))


@parallel
def test_pyramid_pooling_segmenter_matches_one_process_on_whole_batch():
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    numpy.random.seed(0)   # Chainer's initializers: same weights everywhere
    with chainer.using_config('dtype', numpy.float64):
        model = TinySegmenter()
    reference_model = copy.deepcopy(model)
    synced = multinode_bn.create_mnbn_model(model, comm)
    assert sum(isinstance(link, multinode_bn.MultiNodeBatchNormalization)
               for link in synced.links()) == 3 + len(BINS)

    images = numpy.random.RandomState(1).standard_normal(
        (size, 3, SIZE, SIZE))
    # Chainer's resize and pooling functions accept float32 only unless the
    # type check is off.
    with chainer.using_config('type_check', False):
        y_all, gx_all, grads_all = _forward_backward(reference_model, images)
        y, gx, grads = _forward_backward(synced, images[rank:rank + 1])
        with chainer.using_config('train', False):
            y_eval_all = reference_model(images).array
            y_eval = synced(images[rank:rank + 1]).array

    checks = [('output', y, y_all[rank:rank + 1]),
              ('input gradient', gx, gx_all[rank:rank + 1])]
    for name in sorted(grads_all):
        summed = comm.allreduce(grads[name])
        checks.append(('gradient of {} summed over processes'.format(name),
                       summed, grads_all[name]))
    ours, theirs = _running_statistics(synced), _running_statistics(
        reference_model)
    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        checks.append(('avg_mean of ' + name, ours[name][0], theirs[name][0]))
        checks.append(('avg_var of ' + name, ours[name][1], theirs[name][1]))
    checks.append(('evaluation output', y_eval, y_eval_all[rank:rank + 1]))
    _compare(checks, rtol=1e-9, atol=1e-11)
    # The 1x1 bin holds one value per channel and process: its variance
    # comes from the other processes' images alone (a local batch of one
    # image has none), and it moved the running variance.
    assert numpy.abs(ours['/pyramid/0/bn'][1] - 0.9).max() > 1e-5


def test_resize_images_runs_under_the_installed_numpy():
    # Chainer 7.8.1's F.resize_images uses numpy.float (removed in NumPy
    # 1.24): the install pins numpy<1.24 so that it runs.
    x = numpy.arange(8, dtype=numpy.float32).reshape(1, 2, 2, 2)
    y = F.resize_images(x, (3, 3)).array
    # Bilinear with aligned corners: the centre is the mean of the corners.
    numpy.testing.assert_allclose(y[:, :, 1, 1], x.mean(axis=(2, 3)))
    numpy.testing.assert_allclose(y[:, :, ::2, ::2], x)
