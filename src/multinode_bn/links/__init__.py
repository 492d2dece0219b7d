"""Links: the synchronized batch normalization layer."""

from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization  # NOQA
