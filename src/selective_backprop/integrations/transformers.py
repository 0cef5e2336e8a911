"""Hugging Face ``transformers``: a ``Trainer`` that trains only the examples a selector chooses (the ``[hf]`` extra).

What a user changes (``examples/hf_trainer.py``)::

    from selective_backprop.integrations.transformers import SelectiveBackpropTrainer

    trainer = SelectiveBackpropTrainer(                        # was Trainer(
        model=model, args=args, train_dataset=train_set,       # dict examples: input_ids, attention_mask, labels
        selector_kwargs=dict(beta=2),                          # + the selector's arguments (batch_size: the loader's)
        causal_lm=False,                                       # + True: rank sequences by their mean token loss
    )
    trainer.train()                                            # or train(resume_from_checkpoint=True)

How it maps onto the Trainer: a Trainer step is one **loader batch**. ``training_step`` pops ``labels`` and the
``index`` this class adds to every training example (dataset wrapper; ``index`` is kept from column removal, passes
the padding collators and never reaches the model), offers the batch to the selector (a scoring forward through the
model the Trainer trains, in eval mode under ``torch.no_grad()``) and trains the 0, 1 or more batches that became
ready -- on the epoch's last loader batch the epoch's remainder too. Each ready batch is one optimizer step: the
Trainer takes the last one; for the others ``training_step`` clips (``max_grad_norm``) and steps the optimizer
itself. A loader batch with nothing ready backpropagates nothing, and the Trainer's optimizer step is then a no-op
(gradients are ``None``; torch optimizers skip such parameters). So ``global_step``, ``max_steps``, ``save_steps``,
logging and the LR schedule count loader batches (examples seen: the lab's ``--lr-unit examples``); ``sb/steps``
counts optimizer steps. ``training_step`` returns the mean loss of the batches it trained (0 when none), and the
Trainer's logged ``loss`` averages that over loader batches: with few selected it reads low; ``Batch.loss`` trains
the true mean.

Losses: ``causal_lm=False`` ranks ``outputs.logits`` ``(N, C)`` by cross-entropy against ``labels`` ``(N,)``;
``causal_lm=True`` ranks sequences by :func:`~selective_backprop.per_sequence_cross_entropy` of the shifted logits
``(N, T, V)`` and labels ``(N, T)`` (``-100`` is ignored; a fully padded row scores 0) and trains the token-level
mean (``example_weights=token_counts``); ``loss_fn=``/``forward=`` in ``selector_kwargs`` override them. Every
loader batch must have one sequence length (pad to ``max_length``, not to each batch's longest: the selector queues
rows from several loader batches into one training batch); another length is refused, naming the fix.

State: the selector's ``state_dict`` is saved as ``selective_backprop.pt`` in every checkpoint folder and restored by
``train(resume_from_checkpoint=...)``, so a resumed run (on CPU) makes identical selections; the Trainer's own
seedable sampler and RNG restore line up the data order. Counters are added to every training log as ``sb/<name>``.

Refused at construction (``ValueError``, naming the fix): ``gradient_accumulation_steps > 1`` (raise
``per_device_train_batch_size``), more than one process, FSDP or DeepSpeed (the scoring forward needs the whole
model in one process: use the library's own DDP loop), ``fp16`` (its gradient scaler cannot step an optimizer that
got no gradients: use ``bf16``); at ``train()``: a training set without ``__len__``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..base import Selector
from ..batch import per_example_cross_entropy
from ..losses import per_sequence_cross_entropy, token_counts
from ..selector import SelectiveBackprop

__all__ = ["IndexedDataset", "SelectiveBackpropTrainer", "causal_lm_loss", "causal_lm_token_counts",
           "classification_loss"]  # fmt: skip

STATE_FILE = "selective_backprop.pt"


def classification_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-example cross-entropy of a model output's ``logits`` ``(N, C)`` against ``labels`` ``(N,)`` -> ``(N,)``."""
    return per_example_cross_entropy(outputs.logits, labels)


def causal_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sequence mean next-token loss: ``logits`` ``(N, T, V)`` shifted against ``labels`` ``(N, T)`` -> ``(N,)``;
    tokens labelled ``-100`` count for nothing, a sequence with none scores 0."""
    return per_sequence_cross_entropy(outputs.logits[:, :-1], labels[:, 1:])


def causal_lm_token_counts(labels: Tensor) -> Tensor:
    """The scored (shifted) tokens of each sequence, float ``(N,)``: the token-level mean's ``example_weights``."""
    return token_counts(labels[:, 1:])


class IndexedDataset(Dataset[dict[str, Any]]):
    """``dataset[i]`` (a dict) with ``"index": i`` added, for StaleSB's cache and error messages."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


class SelectiveBackpropTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step trains what a selector chooses from each loader batch.

    Args:
        *args, **kwargs: the ``Trainer``'s. Training examples are dicts with ``labels``.
        selector: the :class:`~selective_backprop.Selector` class, built on the model at the first training step
            as ``selector(model, batch_size=per_device_train_batch_size, loss_fn=..., **selector_kwargs)``.
            Default: :class:`~selective_backprop.SelectiveBackprop`.
        selector_kwargs: its arguments (``beta``, ``staleness`` with ``dataset_size``, ``seed``, ...). Default: none.
        causal_lm: rank sequences by their mean next-token loss (see the module docstring). Default: ``False``
            (sequence classification).

    Attributes:
        selector: the selector; ``None`` until training starts.

    Raises:
        TypeError: for a ``selector`` that is not a Selector class, or ``model=`` in ``selector_kwargs``.
        ValueError: for arguments the class cannot honour (see the module docstring), naming the fix.
    """

    def __init__(self, *args: Any, selector: type[Selector] = SelectiveBackprop,
                 selector_kwargs: dict[str, Any] | None = None, causal_lm: bool = False,
                 **kwargs: Any) -> None:  # fmt: skip
        if not (isinstance(selector, type) and issubclass(selector, Selector)):
            raise TypeError(f"selector must be a Selector class such as SelectiveBackprop, got {selector!r}")
        if {"model", "distributed"} & (selector_kwargs or {}).keys():
            raise TypeError("the Trainer's model is the selector's; remove model=/distributed= from selector_kwargs")
        super().__init__(*args, **kwargs)
        a = self.args
        if a.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={a.gradient_accumulation_steps} is not supported: a "
                             "selector decides when a batch is full; raise per_device_train_batch_size instead")
        if a.world_size != 1 or a.fsdp or a.deepspeed:
            raise ValueError(f"SelectiveBackpropTrainer runs in one process on one device (world_size="
                             f"{a.world_size}, fsdp={a.fsdp!r}, deepspeed={a.deepspeed!r}): for data parallel use "
                             "the library's loop with distributed=True (README, Distributed)")
        if a.fp16:
            raise ValueError("fp16=True is not supported (its gradient scaler refuses an optimizer step with no "
                             "gradients, which a loader batch with nothing selected takes): use bf16=True")
        self.selector_class, self.causal_lm = selector, causal_lm
        self.selector_kwargs = dict(selector_kwargs or {})
        self.selector: Selector | None = None
        self._sb_resume: str | None = None  # a checkpoint folder whose selector state waits for the selector
        self._sb_epoch_len = 0
        self._sb_length: int | None = None  # the sequence length of every training batch

    def _set_signature_columns_if_needed(self) -> None:  # keep "index" through remove_unused_columns
        super()._set_signature_columns_if_needed()
        columns: list[str] = self._signature_columns  # type: ignore[assignment]  # set by the call above
        if "index" not in columns:
            columns.append("index")

    def get_train_dataloader(self) -> Any:
        if not hasattr(self.train_dataset, "__len__"):
            raise ValueError("SelectiveBackpropTrainer needs a training set with __len__ (a map-style dataset)")
        dataset, self.train_dataset = self.train_dataset, IndexedDataset(self.train_dataset)
        try:
            loader = super().get_train_dataloader()
        finally:
            self.train_dataset = dataset
        self._sb_epoch_len = len(loader)
        return loader

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
        if isinstance(path, str):
            if not os.path.isfile(os.path.join(path, STATE_FILE)):
                raise FileNotFoundError(f"{os.path.join(path, STATE_FILE)} is missing: resume from a checkpoint "
                                        "written by SelectiveBackpropTrainer")
            self._sb_resume = path
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:  # fmt: skip
        sb = self._selector(model)
        inputs = dict(self._prepare_inputs(inputs))
        labels, index = inputs.pop("labels"), inputs.pop("index")
        self._check_length({**inputs, "labels": labels})
        ready = sb.select(inputs, labels, index)
        if (self.state.global_step + 1) % self._sb_epoch_len == 0:  # the epoch's last loader batch
            ready += sb.end_epoch()
        model.train()
        optimizer: Any = self.optimizer  # created before the first step
        if hasattr(optimizer, "train") and callable(optimizer.train):  # schedule-free optimizers, as the Trainer
            optimizer.train()
        losses = []
        for i, batch in enumerate(ready):
            if i > 0:  # the previous batch's step; the Trainer takes the last one's
                if self.args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
                optimizer.step()
                model.zero_grad()
            with self.compute_loss_context_manager():
                loss = batch.loss(batch.forward(model))
            self.accelerator.backward(loss)
            losses.append(loss.detach())
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.args.device)

    def _check_length(self, batch: dict[str, Any]) -> None:
        lengths = {v.shape[1] for v in batch.values() if isinstance(v, Tensor) and v.dim() >= 2}
        if self._sb_length is None and len(lengths) == 1:
            self._sb_length = lengths.pop()
        elif lengths and lengths != {self._sb_length}:
            raise ValueError(f"this loader batch has sequence length(s) {sorted(lengths)}, an earlier one "
                             f"{self._sb_length}: the selector queues rows across loader batches, so pad every batch "
                             "to one length, e.g. tokenizer(..., padding='max_length', max_length=L) or "
                             "DataCollatorWithPadding(tokenizer, padding='max_length', max_length=L)")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.selector is not None and "loss" in logs:  # a training log
            logs = {**logs, **{f"sb/{k}": float(v) for k, v in self.selector.counters.items()}}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.selector is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # the one the Trainer just wrote
            torch.save(self.selector.state_dict(), os.path.join(self._get_output_dir(trial=trial), folder, STATE_FILE))

    def _selector(self, model: nn.Module) -> Selector:
        if self.selector is None or self.selector.model is not model:
            kwargs: dict[str, Any] = {"batch_size": self.args.per_device_train_batch_size}
            if self.causal_lm:
                kwargs.update(loss_fn=causal_lm_loss, example_weights=causal_lm_token_counts)
            else:
                kwargs.update(loss_fn=classification_loss)
            self.selector = self.selector_class(model, **{**kwargs, **self.selector_kwargs})
        if self._sb_resume is not None:
            path, self._sb_resume = os.path.join(self._sb_resume, STATE_FILE), None
            state = torch.load(path, map_location="cpu", weights_only=True)  # the generator's state stays on the CPU

            def to_device(t: Any) -> Any:
                return t.to(self.args.device) if isinstance(t, Tensor) else t

            self.selector.load_state_dict({k: v if k == "generator" else tree_map(to_device, v)
                                           for k, v in state.items()})  # fmt: skip
        return self.selector
