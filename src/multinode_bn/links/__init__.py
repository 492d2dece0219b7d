"""Links: the synchronized batch normalization layer."""

from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization  # NOQA
from multinode_bn.links.create_mnbn_model import create_mnbn_model  # NOQA
from multinode_bn.links.create_mnbn_model import revert_mnbn_model  # NOQA
