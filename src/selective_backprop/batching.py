"""The one definition of "a batch" the selectors, the queue, :class:`~selective_backprop.Batch`, the StaleSB path,
the distributed padding and the state_dict all use.

A batch's inputs and targets are each a tensor or any nesting of dicts, lists and tuples (``torch.utils._pytree``
containers, namedtuples included) of tensors that share their first dimension, the example dimension; ``None``
leaves are allowed and carried along. Other mappings (e.g. Hugging Face's ``BatchEncoding``) are read as dicts.
Rows are selected from every tensor leaf at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_leaves, tree_map, tree_unflatten

__all__ = ["as_tree", "rows_of", "device_of", "take", "cut", "concat", "clone", "default_forward", "loader_item"]


def as_tree(value: Any) -> Any:
    """``value``, or a plain dict of it when it is a mapping pytree does not know (``UserDict``, ``BatchEncoding``)."""
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return {k: as_tree(v) for k, v in value.items()}
    return value


def rows_of(tree: Any, what: str = "inputs") -> int:
    """The number of examples (first dimension) shared by every tensor leaf of ``tree``.

    Raises:
        TypeError: when ``tree`` holds a leaf that is neither a tensor nor ``None``, or no tensor at all, naming
            the leaf's position and type.
        ValueError: when a tensor is 0-dimensional or the leaves disagree on the first dimension.
    """
    if isinstance(tree, Tensor):  # the common case, kept cheap
        if tree.ndim == 0:
            raise ValueError(f"{what} must have a first (example) dimension, got a 0-dim tensor")
        return len(tree)
    leaves, _ = tree_flatten_with_path(tree)
    sizes = {}
    for path, leaf in leaves:
        where = f"{what}{keystr(path)}"
        if leaf is None:
            continue
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{what} must be a tensor or a dict/list/tuple of tensors sharing their first dimension; got "
                f"{type(leaf).__name__} at {where} (convert it to a tensor, or leave it out of the batch)"
            )
        if leaf.ndim == 0:
            raise ValueError(f"{where} must have a first (example) dimension, got a 0-dim tensor")
        sizes[where] = len(leaf)
    if not sizes:
        raise TypeError(f"{what} must hold at least one tensor, got {type(tree).__name__}: {tree!r:.80}")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in list(sizes.items())[:6])
        raise ValueError(f"every tensor of {what} must have the same first (example) dimension; got {listed}")
    return next(iter(sizes.values()))


def device_of(tree: Any) -> torch.device:
    """The device of the first tensor leaf of ``tree`` (where a batch's per-example tensors should live)."""
    if isinstance(tree, Tensor):
        return tree.device
    return next(leaf.device for leaf in tree_leaves(tree) if isinstance(leaf, Tensor))


def take(tree: Any, rows: Tensor) -> Any:
    """The examples at ``rows`` (an index or bool tensor) of every tensor leaf."""
    if isinstance(tree, Tensor):
        return tree[rows.to(tree.device)] if rows.device != tree.device else tree[rows]
    return tree_map(lambda t: take(t, rows) if isinstance(t, Tensor) else t, tree)


def cut(tree: Any, start: int, stop: int | None) -> Any:
    """Examples ``start:stop`` of every tensor leaf (views, no copy)."""
    if isinstance(tree, Tensor):
        return tree[start:stop]
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, tree)


def concat(trees: Sequence[Any], names: Sequence[str] = ()) -> Any:
    """The examples of ``trees`` (same structure) one after the other: ``torch.cat`` of each tensor leaf;
    ``names`` name the items of tuple trees in messages (``inputs``, ``targets``, ...).

    Raises:
        ValueError: for trees of different structures, or a leaf whose examples differ in shape after dim 0
            (e.g. sequences padded to each loader batch's longest), naming the leaf, the shapes and the fix.
    """
    if isinstance(trees[0], Tensor):
        return _cat(trees, "")
    flat = [tree_flatten(t) for t in trees]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        other = next(s for _, s in flat if s != spec)
        raise ValueError(f"cannot queue batches of different structures: {spec} and {other}")
    paths = [keystr(path) for path, _ in tree_flatten_with_path(trees[0])[0]]
    for i, name in enumerate(names):  # "[0]['input_ids']" -> "inputs['input_ids']"
        paths = [name + p[len(f"[{i}]") :] if p.startswith(f"[{i}]") else p for p in paths]
    columns = zip(*(f for f, _ in flat), strict=True)
    leaves = [None if col[0] is None else _cat(col, path) for col, path in zip(columns, paths, strict=True)]
    return tree_unflatten(leaves, spec)


def _cat(tensors: Sequence[Tensor], path: str) -> Tensor:
    shapes = sorted({tuple(t.shape[1:]) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(
            f"cannot queue examples of different shapes{f' in {path}' if path else ''} into one training batch: "
            f"{' and '.join(str(s) for s in shapes)} after the batch dimension. The queue joins the selected rows "
            "of several loader batches, so every loader batch must give an example the same shape: pad sequences "
            "to one length (e.g. padding='max_length' in the tokenizer or collator)"
        )
    return torch.cat(list(tensors))


def loader_item(item: Any, source: str = "the loader") -> tuple[Any, ...]:
    """``item`` as the ``(inputs, targets[, indices])`` a loader yields, or a ``TypeError`` naming what ``source``
    gave and how to split a dict batch."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(
            f"{source} must yield (inputs, targets) or (inputs, targets, indices) tuples, got "
            f"{type(item).__name__}{'' if not isinstance(item, (tuple, list)) else f' of {len(item)}'}"
            "; for dict batches split the targets out, e.g. (batch, batch.pop('labels'))"
        )
    return tuple(item)


def clone(tree: Any) -> Any:
    """A deep copy of the tensors in ``tree`` (containers rebuilt, other leaves kept)."""
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, tree)


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """How a batch is fed to the model unless told otherwise: ``model(**inputs)`` for a mapping (Hugging Face
    style), ``model(*inputs)`` for a tuple (several positional inputs), ``model(inputs)`` for anything else."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)
