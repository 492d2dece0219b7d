"""Functions: the synchronized batch normalization function and its parts."""

from multinode_bn.functions.batch_normalization import get_communication_backend  # NOQA
from multinode_bn.functions.batch_normalization import multi_node_batch_normalization  # NOQA
from multinode_bn.functions.batch_normalization import MultiNodeBNImplSelector  # NOQA
