"""A ResNet-50-shaped Chainer model for the whole-model benchmark.

The layer sizes of He et al.'s ResNet-50 (ImageNet, bottleneck blocks of
3, 4, 6 and 3 units; 53 batch normalizations), written for this benchmark:
every convolution is followed by ``L.BatchNormalization``, which
``multinode_bn.create_mnbn_model`` replaces.
"""

import chainer
import chainer.functions as F
import chainer.links as L


class Bottleneck(chainer.Chain):
    """1x1, 3x3, 1x1 convolutions with a projection shortcut when the shape
    changes."""

    def __init__(self, in_channels, mid, out, stride):
        super(Bottleneck, self).__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(in_channels, mid, 1, stride,
                                         nobias=True)
            self.bn1 = L.BatchNormalization(mid)
            self.conv2 = L.Convolution2D(mid, mid, 3, 1, 1, nobias=True)
            self.bn2 = L.BatchNormalization(mid)
            self.conv3 = L.Convolution2D(mid, out, 1, nobias=True)
            self.bn3 = L.BatchNormalization(out)
            if in_channels != out or stride != 1:
                self.proj = L.Convolution2D(in_channels, out, 1, stride,
                                            nobias=True)
                self.bn_proj = L.BatchNormalization(out)
            else:
                self.proj = None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.proj is None else self.bn_proj(self.proj(x))
        return F.relu(h + shortcut)


class ResNet50(chainer.Chain):

    def __init__(self, n_classes=1000):
        super(ResNet50, self).__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 64, 7, 2, 3, nobias=True)
            self.bn1 = L.BatchNormalization(64)
            self.stages = chainer.ChainList()
            in_channels = 64
            for units, mid, stride in [(3, 64, 1), (4, 128, 2), (6, 256, 2),
                                       (3, 512, 2)]:
                for i in range(units):
                    self.stages.append(Bottleneck(
                        in_channels, mid, 4 * mid, stride if i == 0 else 1))
                    in_channels = 4 * mid
            self.fc = L.Linear(in_channels, n_classes)

    def forward(self, x, t):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pooling_2d(h, 3, 2)
        for block in self.stages:
            h = block(h)
        h = F.average_pooling_2d(h, h.shape[2:])
        return F.softmax_cross_entropy(self.fc(h), t)
