"""PyTorch Lightning: a LightningModule trains on the batches a selector chooses (the ``[lightning]`` extra).

What a user adds (``examples/lightning_module.py``)::

    from selective_backprop.integrations.lightning import SelectiveBackpropCallback, selected_batches

    class Classifier(L.LightningModule):
        def __init__(self):
            ...
            self.automatic_optimization = False                 # + SB decides when the optimizer steps

        def training_step(self, batch, batch_idx):              # batch: (inputs, targets[, indices])
            optimizer = self.optimizers()
            for selected in selected_batches(self, batch):      # + 0, 1 or more training batches
                loss = selected.loss(selected.forward(self))    # + was F.cross_entropy(self(x), y)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()

    trainer = L.Trainer(callbacks=[SelectiveBackpropCallback(batch_size=64, beta=2)])  # + the selector's arguments

Why manual optimization: automatic optimization steps once per ``training_step`` (one loader batch), but a selector
yields 0, 1 or more training batches per loader batch, plus each epoch's remainder. Returning ``None`` only skips
the backward: Lightning still calls ``optimizer.step``, counts it in ``global_step`` (``max_steps`` and per-step LR
schedulers would count loader batches) and refuses ``None`` under DDP. Here every optimizer step is one selected
batch, and ``global_step`` counts exactly those.

The callback builds ``selector(pl_module, **kwargs)`` at fit start. :func:`selected_batches` scores the loader batch
Lightning moved to the device, under the Trainer's autocast (``score_precision`` overrides it), in eval mode (then
restored); on the epoch's last loader batch it adds ``end_epoch()``'s remainder, so that trains within its epoch,
before validation and checkpoints; it stops once ``global_step`` reaches ``max_steps``. Counters are logged at
each epoch end as ``sb/<name>`` (cumulative; counts summed over ranks, times their maximum). Validation, test and
predict select nothing. Lightning refuses ``accumulate_grad_batches`` and ``gradient_clip_val`` under manual
optimization (raise ``batch_size``; call ``self.clip_gradients(optimizer, ...)``) and leaves LR schedulers to you
(``self.lr_schedulers().step()``).

DDP (``strategy="ddp"``): global selection, the library's ``distributed=True``, set when ``trainer.world_size > 1``
(Lightning's ``DistributedSampler`` gives every rank as many batches); FSDP, DeepSpeed and XLA are refused at fit
start. Checkpoints keep every rank's selector state; resume with as many ranks. From an end-of-epoch checkpoint a
resumed fit makes identical selections; mid-epoch, only with a resumable loader (as Lightning warns).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from torch.utils._pytree import tree_map

from ..base import Selector
from ..batch import Batch
from ..batching import loader_item
from ..selector import SelectiveBackprop

__all__ = ["SelectiveBackpropCallback", "selected_batches"]


def selected_batches(pl_module: LightningModule, batch: Any) -> Iterator[Batch]:
    """Offer a loader batch ``(inputs, targets[, indices])`` to the Trainer's :class:`SelectiveBackpropCallback`;
    return the training batches it makes ready (on the epoch's last loader batch, the epoch's remainder too).

    Call it once per ``training_step`` and train every batch it yields with one optimizer step.

    Raises:
        RuntimeError: when the Trainer has no :class:`SelectiveBackpropCallback`.
        TypeError: when ``batch`` is not a 2- or 3-tuple.
    """
    trainer = pl_module.trainer
    found = [c for c in trainer.callbacks if isinstance(c, SelectiveBackpropCallback)]  # type: ignore[attr-defined]
    if len(found) != 1:
        raise RuntimeError(f"selected_batches needs exactly one SelectiveBackpropCallback in the Trainer's "
                           f"callbacks, found {len(found)}: Trainer(callbacks=[SelectiveBackpropCallback(...)])")
    return found[0].select(trainer, batch)


class SelectiveBackpropCallback(Callback):
    """Builds a selector on the LightningModule at fit start, keeps its state in checkpoints, logs its counters.

    Args:
        selector: the :class:`~selective_backprop.Selector` class, built as ``selector(pl_module, **kwargs)``
            (e.g. ``Kath18``). Default: :class:`~selective_backprop.SelectiveBackprop`.
        **kwargs: its arguments (``batch_size``, ``beta``, ``staleness``, ``seed``, ...) except ``distributed``,
            which the callback sets (``True`` when ``trainer.world_size > 1``).

    Attributes:
        selector: the selector; ``None`` until fit starts.

    Raises:
        TypeError: at construction, for a ``selector`` that is not a Selector class or an argument it sets.
        RuntimeError: at fit start, for a module with automatic optimization or an unsupported strategy.

    Example:
        >>> SelectiveBackpropCallback(batch_size=64, beta=2).state_key
        "SelectiveBackpropCallback{'selector': 'SelectiveBackprop', 'batch_size': 64, 'beta': 2}"
    """

    def __init__(self, selector: type[Selector] = SelectiveBackprop, **kwargs: Any) -> None:
        if not (isinstance(selector, type) and issubclass(selector, Selector)):
            raise TypeError(f"selector must be a Selector class such as SelectiveBackprop, got {selector!r}")
        if {"model", "distributed"} & kwargs.keys():
            raise TypeError("the callback passes the LightningModule as the model and sets distributed from the "
                            "Trainer's strategy; remove model=/distributed= from SelectiveBackpropCallback(...)")
        self.selector_class, self.kwargs = selector, kwargs
        self.selector: Selector | None = None
        self._rank, self._world_size, self._device = 0, 1, torch.device("cpu")
        self._saved: dict[str, Any] | None = None  # a loaded state waiting for the selector
        self._closed = True  # whether end_epoch() ran in the current epoch
        self._seen = 0.0  # examples seen when the epoch started

    @property
    def state_key(self) -> str:
        def stable(v: Any) -> Any:  # the same text in every run: a name, never an object's address
            plain = isinstance(v, (bool, int, float, str, type(None)))
            return v if plain else getattr(v, "__qualname__", type(v).__qualname__)

        config = {k: stable(v) for k, v in self.kwargs.items()}
        return self._generate_state_key(selector=self.selector_class.__qualname__, **config)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(pl_module).__name__
        if pl_module.automatic_optimization:
            raise RuntimeError(f"SelectiveBackpropCallback needs manual optimization: a loader batch yields 0, 1 or "
                               f"more training batches. Set self.automatic_optimization = False in {name}.__init__ "
                               "and train what selected_batches(self, batch) yields (see its docstring)")
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
                strategy, (DeepSpeedStrategy, XLAStrategy)):  # fmt: skip
            raise RuntimeError(f"SelectiveBackpropCallback supports one device or strategy='ddp', got "
                               f"{type(strategy).__name__}: its scoring forward needs the whole model on each rank")
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._device = strategy.root_device  # where the model will be (restores may run before it moves there)
        if self.selector is None or self.selector.model is not pl_module:
            extra: dict[str, Any] = {"distributed": True} if self._world_size > 1 else {}
            self.selector = self.selector_class(pl_module, **self.kwargs, **extra)
        if self._saved is not None:
            self.load_state_dict(self._saved)

    def select(self, trainer: Trainer, batch: Any) -> Iterator[Batch]:
        """What :func:`selected_batches` returns."""
        sb = self._built()
        batch = loader_item(batch, "the training dataloader")
        if self._closed:
            raise RuntimeError("selected_batches was called again after the epoch's last loader batch, or outside "
                               "training_step: call it once per training_step")
        ready = sb.select(*batch)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # set before training_step (length or prefetch)
            ready += sb.end_epoch()
            self._closed = True
        return self._until_max_steps(trainer, ready)

    @staticmethod
    def _until_max_steps(trainer: Trainer, ready: list[Batch]) -> Iterator[Batch]:
        for batch in ready:  # global_step moves as the caller steps: check before each batch
            if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
                return
            yield batch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._closed, self._seen = False, self._built().counters["seen"]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sb = self._built()
        if not self._closed:  # the epoch was cut short (max_steps, a stop): advance the epoch, drop its remainder
            if sb.counters["seen"] == self._seen and trainer.fit_loop.epoch_loop.batch_progress.current.ready:
                raise RuntimeError(f"{type(pl_module).__name__}.training_step never called "
                                   "selected_batches(self, batch): nothing was selected or trained")
            sb.end_epoch()
            self._closed = True
        counters = {f"sb/{k}": float(v) for k, v in sb.counters.items()}
        times = {k: v for k, v in counters.items() if k.endswith("_s")}
        counts = {k: v for k, v in counters.items() if k not in times}
        pl_module.log_dict(counts, on_epoch=True, sync_dist=self._world_size > 1, reduce_fx="sum")
        pl_module.log_dict(times, on_epoch=True, sync_dist=self._world_size > 1, reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        if self.selector is None:
            return self._saved or {}
        state = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, self.selector.state_dict())
        states: list[Any] = [state]
        if self._world_size > 1:  # Lightning saves rank 0's callback state only: keep every rank's
            states = [None] * self._world_size
            dist.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.selector is None or not state_dict:
            self._saved = state_dict or None
            return
        states = state_dict["ranks"]
        if len(states) != self._world_size:
            raise RuntimeError(f"the checkpoint holds selector states for {len(states)} rank(s), this run has "
                               f"{self._world_size}: resume with the same number of devices")

        def to_device(t: Any) -> Any:
            return t.to(self._device) if isinstance(t, torch.Tensor) else t

        state = states[self._rank]  # the generator's state stays a CPU tensor, as torch.Generator wants it
        self.selector.load_state_dict({k: v if k == "generator" else tree_map(to_device, v) for k, v in state.items()})
        self._saved = None

    def _built(self) -> Selector:
        if self.selector is None:
            raise RuntimeError("the selector is built when trainer.fit starts; pass this callback to the Trainer")
        return self.selector
