"""Whole-model conversion between local and synchronized batch normalization."""

import copy
import pickle
import warnings

import chainer
import chainer.links as L

from multinode_bn.links.batch_normalization import MultiNodeBatchNormalization


def create_mnbn_model(link, comm, communication_backend='auto',
                      in_place=False):
    """Copy of ``link`` with every ``L.BatchNormalization`` synchronized.

    Every :class:`chainer.links.BatchNormalization` at any depth inside
    :class:`~chainer.Chain`, :class:`~chainer.ChainList` and
    :class:`~chainer.Sequential` is replaced by a
    :class:`~multinode_bn.MultiNodeBatchNormalization` with the same size,
    axis, decay, eps, dtype, ``use_gamma``/``use_beta``, parameters, running
    statistics and ``N``. The original model is left untouched; every
    parameter of the result is an independent copy. Subclasses of
    ``L.BatchNormalization`` with other semantics (such as
    ``L.BatchRenormalization``) are left as they are, with a warning.

    A model that cannot be deep-copied, such as a
    :class:`~chainer.Sequential` holding a ``lambda`` (Chainer refuses to
    copy or pickle it), raises ``ValueError`` naming the cause; convert it
    with ``in_place=True``.

    Args:
        link (~chainer.Link): The model (or a single batch normalization).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` whose processes
            share statistics.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
        in_place (bool): If ``True``, no copy is made: the batch
            normalizations inside ``link`` are replaced where they are
            (keeping their parameter objects) and ``link`` itself is
            returned, or the new link if ``link`` is itself an
            ``L.BatchNormalization``.

    Returns:
        ~chainer.Link: The converted copy (or ``link``, converted, with
        ``in_place=True``).

    .. admonition:: Example

        >>> from mpi4py import MPI
        >>> model = chainer.Sequential(L.Linear(3, 4), L.BatchNormalization(4))
        >>> synced = create_mnbn_model(model, MPI.COMM_WORLD)
        >>> type(synced[1]).__name__
        'MultiNodeBatchNormalization'
    """
    # The communicator must not be copied along with the model.
    memo = {id(comm): comm}

    def convert(child, path):
        if type(child) is L.BatchNormalization:
            synced = MultiNodeBatchNormalization(
                _size_of(child), comm,
                communication_backend=communication_backend,
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

    return _replace_links(_copy_unless_in_place(
        link, memo, in_place, 'create_mnbn_model'), convert)


def revert_mnbn_model(link, in_place=False):
    """Copy of ``link`` with every synchronized BN made local again.

    Every :class:`~multinode_bn.MultiNodeBatchNormalization` (and ChainerMN's
    ``chainermn.links.MultiNodeBatchNormalization``) becomes a
    :class:`chainer.links.BatchNormalization` with the same parameters and
    statistics, for single-process inference, export and evaluation. In
    evaluation mode the result computes exactly what the converted model did.

    Args:
        link (~chainer.Link): The model.
        in_place (bool): If ``True``, no copy is made (as for
            :func:`create_mnbn_model`, for a model that cannot be copied):
            the synchronized links inside ``link`` are replaced where they
            are and ``link`` is returned.

    Returns:
        ~chainer.Link: The reverted copy, in which the original keeps its
        communicator (or ``link``, reverted, with ``in_place=True``).

    .. admonition:: Example

        >>> from mpi4py import MPI
        >>> model = chainer.Sequential(L.Linear(3, 4), L.BatchNormalization(4))
        >>> local = revert_mnbn_model(create_mnbn_model(model, MPI.COMM_WORLD))
        >>> type(local[1]).__name__
        'BatchNormalization'
    """
    memo = {}
    for child in link.links():
        if hasattr(child, 'comm') and _is_synchronized(child):
            memo[id(child.comm)] = child.comm

    def convert(child, path):
        if _is_synchronized(child):
            return _transplant(child, L.BatchNormalization(
                _size_of(child), **_config_of(child)))
        return child

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
            'functools.partial.'.format(
                caller=caller, kind=type(link).__name__,
                error=error)) from error


def _is_synchronized(link):
    if isinstance(link, MultiNodeBatchNormalization):
        return True
    try:
        from chainermn.links import MultiNodeBatchNormalization as Theirs
    except ImportError:  # pragma: no cover
        return False
    return isinstance(link, Theirs)


def _size_of(bn):
    return None if bn.avg_mean is None else bn.avg_mean.shape


def _config_of(bn):
    axis = getattr(bn, 'axis', None)
    return dict(decay=bn.decay, eps=bn.eps, dtype=bn.avg_mean.dtype
                if bn.avg_mean is not None else bn._highprec_dtype,
                use_gamma=getattr(bn, 'gamma', None) is not None,
                use_beta=getattr(bn, 'beta', None) is not None,
                axis=axis)


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


def _replace_links(root, convert):
    new_root = convert(root, '')
    if new_root is not root:
        return new_root
    _replace_children(root, convert, '')
    return root


def _replace_children(link, convert, path):
    # A Sequential's children are keyed (in paths and checkpoints) by their
    # position among its links, not among its layers.
    if isinstance(link, chainer.ChainList):
        slots = list(enumerate(list(link.children())))
    elif isinstance(link, chainer.Chain):
        slots = [(name, getattr(link, name)) for name in sorted(link._children)]
    else:
        return
    for key, child in slots:
        if not isinstance(child, chainer.Link):
            continue  # a plain function inside a Sequential
        child_path = '{}/{}'.format(path, key)
        new = convert(child, child_path)
        if new is child:
            _replace_children(child, convert, child_path)
        elif isinstance(link, chainer.Sequential):
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
