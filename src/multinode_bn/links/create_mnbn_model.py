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

    Every :class:`chainer.links.BatchNormalization` at any depth of a
    ``Chain``, ``ChainList`` or ``Sequential`` becomes, at its own position,
    a :class:`~multinode_bn.MultiNodeBatchNormalization` with the same
    configuration, parameters, statistics and ``N``; subclasses with other
    semantics (``L.BatchRenormalization``) are left, with a warning.

    Args:
        link (~chainer.Link): The model (or a single batch normalization).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` whose processes
            share statistics.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
        in_place (bool): If ``True``, convert ``link`` itself, keeping the
            parameter objects: for a model that cannot be deep-copied (a
            ``Sequential`` holding a ``lambda``), which raises ``ValueError``.

    Returns:
        ~chainer.Link: The converted copy; with ``in_place=True``, ``link``
        itself (or the new link if ``link`` is an ``L.BatchNormalization``).
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
            warnings.warn(
                '{} at {} is a subclass of L.BatchNormalization with its own '
                'semantics and was left unsynchronized.'.format(
                    type(child).__name__, path or '/'), UserWarning)
        return child

    # The communicator must not be copied along with the model.
    return _replace_links(_copy_unless_in_place(
        link, {id(comm): comm}, in_place, 'create_mnbn_model'), convert)


def revert_mnbn_model(link, in_place=False):
    """Copy of ``link`` with every synchronized BN made local again.

    Every :class:`~multinode_bn.MultiNodeBatchNormalization` (or ChainerMN's)
    becomes a :class:`chainer.links.BatchNormalization` with the same
    parameters and statistics, which in evaluation mode computes the same.

    Args:
        link (~chainer.Link): The model.
        in_place (bool): If ``True``, revert ``link`` itself (as for
            :func:`create_mnbn_model`).

    Returns:
        ~chainer.Link: The reverted copy, in which the original keeps its
        communicator (or ``link``, reverted, with ``in_place=True``).
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
            '{caller} converts a copy of the model, and this {kind} cannot '
            'be copied: {error} (a chainer.Sequential holding a lambda '
            'cannot be, for one). Either pass in_place=True to convert the '
            'model itself, or replace each lambda by a named function or a '
            'functools.partial.'.format(caller=caller, error=error,
                                        kind=type(link).__name__)) from error


def _is_synchronized(link):
    if isinstance(link, MultiNodeBatchNormalization):
        return True
    try:
        from chainermn.links import MultiNodeBatchNormalization as Theirs
    except ImportError:  # pragma: no cover
        return False
    return isinstance(link, Theirs)


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
    with new.init_scope():
        for name in ('gamma', 'beta'):
            param = getattr(old, name, None)
            if param is not None:
                setattr(new, name, param)
    if old.avg_mean is not None:
        new.avg_mean = old.avg_mean
        new.avg_var = old.avg_var
    else:
        # Not initialized yet: carry the pending initializers instead.
        new._initial_avg_mean = getattr(old, '_initial_avg_mean', None)
        new._initial_avg_var = getattr(old, '_initial_avg_var', None)
    new.N = old.N
    new.name = old.name
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
        slots = list(enumerate(list(link.children())))
    elif isinstance(link, chainer.Chain):
        slots = [(name, getattr(link, name))
                 for name in sorted(link._children)]
    else:
        return link
    for key, child in slots:
        new = _replace_links(child, convert, '{}/{}'.format(path, key))
        if new is child:
            continue
        if isinstance(link, chainer.Sequential):
            # Sequential's own __setitem__ deletes and re-inserts, which
            # reorders the links (and so the checkpoint keys) when plain
            # functions sit between them: replace in place instead.
            chainer.ChainList.__setitem__(link, key, new)
            link._layers = [new if layer is child else layer
                            for layer in link._layers]
        elif isinstance(key, int):
            link[key] = new
        else:
            delattr(link, key)
            with link.init_scope():
                setattr(link, key, new)
    return link
