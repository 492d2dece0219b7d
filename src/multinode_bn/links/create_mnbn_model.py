"""Whole-model conversion to and from synchronized batch normalization."""

import copy
import pickle
import warnings

import chainer
import chainer.links as L

from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization


def create_mnbn_model(link, comm, communication_backend='auto',
                      in_place=False):
    """Copy of ``link`` with every ``L.BatchNormalization`` synchronized.

    Each :class:`chainer.links.BatchNormalization` at any depth becomes a
    :class:`~multinode_bn.MultiNodeBatchNormalization` with the same state;
    subclasses (``L.BatchRenormalization``) are left, with a warning.

    Args:
        link (~chainer.Link): The model (or a single batch normalization).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` to share over.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
        in_place (bool): If ``True``, convert ``link`` itself, keeping the
            parameter objects: for a model that cannot be copied (a
            ``Sequential`` holding a ``lambda``).

    Returns:
        ~chainer.Link: The converted copy, or with ``in_place=True``
        ``link`` itself (unless it is an ``L.BatchNormalization``).
    """
    def convert(child, path):
        if type(child) is L.BatchNormalization:
            synced = MultiNodeBatchNormalization(
                comm=comm, communication_backend=communication_backend,
                **_config_of(child))
            synced.label = path or '/'
            return _transplant(child, synced)
        if (isinstance(child, L.BatchNormalization)
                and not isinstance(child, MultiNodeBatchNormalization)):
            warnings.warn('{} at {} has its own semantics and was left '
                          'unsynchronized'.format(type(child).__name__,
                                                  path or '/'))
        return child

    # The communicator must not be copied along with the model.
    return _replace_links(_copy_unless_in_place(
        link, {id(comm): comm}, in_place, 'create_mnbn_model'), convert)


def revert_mnbn_model(link, in_place=False):
    """Copy of ``link`` with every synchronized BN made local again.

    Each :class:`~multinode_bn.MultiNodeBatchNormalization` (or ChainerMN's)
    becomes an ``L.BatchNormalization`` with the same state, which computes
    the same in evaluation mode.

    Args:
        link (~chainer.Link): The model.
        in_place (bool): If ``True``, revert ``link`` itself.

    Returns:
        ~chainer.Link: The reverted copy, or ``link`` with ``in_place=True``.
    """
    def convert(child, path):
        if not _is_synchronized(child):
            return child
        return _transplant(child, L.BatchNormalization(**_config_of(child)))

    memo = {id(child.comm): child.comm for child in link.links()
            if hasattr(child, 'comm') and _is_synchronized(child)}
    return _replace_links(_copy_unless_in_place(
        link, memo, in_place, 'revert_mnbn_model'), convert)


def _copy_unless_in_place(link, memo, in_place, caller):
    if in_place:
        return link
    try:
        return copy.deepcopy(link, memo)
    except (TypeError, ValueError, AttributeError,
            pickle.PicklingError) as error:
        raise ValueError(
            '{} converts a copy of the model, and this {} cannot be copied '
            '({}; a Sequential holding a lambda cannot be): pass '
            'in_place=True, or replace each lambda by a named function'.format(
                caller, type(link).__name__, error)) from error


def _is_synchronized(link):
    try:
        from chainermn.links import MultiNodeBatchNormalization as Theirs
    except ImportError:  # pragma: no cover
        Theirs = MultiNodeBatchNormalization
    return isinstance(link, (MultiNodeBatchNormalization, Theirs))


def _config_of(bn):
    """The constructor arguments that remake ``bn`` (of either kind)."""
    mean = bn.avg_mean
    return dict(size=None if mean is None else mean.shape,
                dtype=bn._highprec_dtype if mean is None else mean.dtype,
                decay=bn.decay, eps=bn.eps, axis=getattr(bn, 'axis', None),
                use_gamma=getattr(bn, 'gamma', None) is not None,
                use_beta=getattr(bn, 'beta', None) is not None)


def _transplant(old, new):
    """Moves parameters, statistics and ``N`` of ``old`` into ``new``."""
    # new's constructor registered the same parameters and persistents; the
    # initializers still matter to a link not yet called.
    for name in ('gamma', 'beta', 'avg_mean', 'avg_var', 'N', 'name',
                 '_initial_avg_mean', '_initial_avg_var'):
        setattr(new, name, getattr(old, name, None))
    new.to_device(old.device)
    return new


def _replace_links(link, convert, path=''):
    """``link`` converted, or if ``convert`` keeps it, its links inside."""
    new = convert(link, path)
    if new is not link:
        return new
    # A Sequential's children are keyed (in paths and checkpoints) by their
    # position among its links, not among its layers.
    if isinstance(link, chainer.ChainList):
        slots = list(enumerate(link.children()))
    elif isinstance(link, chainer.Chain):
        slots = [(name, getattr(link, name))
                 for name in sorted(link._children)]
    else:
        return link
    for key, child in slots:
        new = _replace_links(child, convert, '{}/{}'.format(path, key))
        if new is child:
            continue
        if isinstance(key, int):
            # Not Sequential's __setitem__: its delete and re-insert reorder
            # the links (the checkpoint keys) around plain functions.
            chainer.ChainList.__setitem__(link, key, new)
            if isinstance(link, chainer.Sequential):
                link._layers = [new if layer is child else layer
                                for layer in link._layers]
        else:
            delattr(link, key)
            with link.init_scope():
                setattr(link, key, new)
    return link
