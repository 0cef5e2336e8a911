"""The Hugging Face Trainer integration end to end, with tiny models built from configs (nothing downloaded):
SelectiveBackpropTrainer trains exactly the selected examples (sequence classification and causal LM with padded
and fully padded rows), an optimizer step with nothing selected leaves the weights alone, a resume from a Trainer
checkpoint (end of epoch and mid-epoch) continues with identical selections and weights, counters reach the Trainer's
logs, and what it cannot do is refused."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
)

from selective_backprop import SelectiveBackprop, ThresholdPolicy  # noqa: E402
from selective_backprop.integrations.transformers import SelectiveBackpropTrainer  # noqa: E402

N, T, V = 256, 12, 50
g = torch.Generator().manual_seed(0)
IDS = torch.randint(3, V, (N, T), generator=g)
LABELS = (IDS[:, :4] < 20).any(1).long()
CLASSIFY = [{"input_ids": x, "attention_mask": torch.ones(T, dtype=torch.long), "labels": int(y)}
            for x, y in zip(IDS, LABELS, strict=True)]  # fmt: skip


def lm_example(i: int) -> dict:
    length = [T, T // 2, 0][i % 3] if i % 7 else T  # full, half padded, fully padded rows
    mask = (torch.arange(T) < length).long()
    return {"input_ids": IDS[i] * mask, "attention_mask": mask, "labels": torch.where(mask.bool(), IDS[i], -100)}


LM = [lm_example(i) for i in range(N)]


class Recording(SelectiveBackprop):
    """Records the dataset indices of every trained batch, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained: list[torch.Tensor] = []

    def observe(self, batch, outputs, losses) -> None:
        super().observe(batch, outputs, losses)
        self.trained.append(batch.indices.clone())


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=T, num_labels=2))  # fmt: skip


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=T))


def arguments(out, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-2,
                lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, logging_steps=4)  # fmt: skip
    return TrainingArguments(**{**base, **kwargs})


def trainer(out, model=None, data=CLASSIFY, sb=None, eval_dataset=None, **kwargs) -> SelectiveBackpropTrainer:
    return SelectiveBackpropTrainer(model=model or bert(), args=arguments(out, **kwargs), train_dataset=data,
                                    eval_dataset=eval_dataset,
                                    selector=Recording, selector_kwargs=sb or dict(beta=2, seed=1),
                                    causal_lm=data is LM)  # fmt: skip


def training_rows(model) -> list[int]:
    """Rows of every forward with gradients enabled (training forwards; scoring runs under no_grad)."""
    rows: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(len(kwargs["input_ids"])) if torch.is_grad_enabled() else None,
        with_kwargs=True)  # fmt: skip
    return rows


@pytest.mark.parametrize("data", ["classification", "causal-lm"])
def test_trains_exactly_the_selected_examples(tmp_path, data):
    model = bert() if data == "classification" else gpt2()
    rows = training_rows(model)
    bs = 16 if data == "classification" else 32  # training batches of 16 from loader batches of 32: two a step
    t = trainer(tmp_path, model, CLASSIFY if data == "classification" else LM, sb=dict(beta=2, seed=1, batch_size=bs))
    t.train()
    sb, c = t.selector, t.selector.counters
    assert sb.model is model and t.state.global_step == 3 * N // 32  # a Trainer step is a loader batch
    assert c["seen"] == 3 * N and c["selection_forwards"] == 2 * N  # primed epoch, then every example scored
    assert rows == [len(i) for i in sb.trained] and c["steps"] == len(sb.trained)  # only selected rows trained
    assert c["backpropagated"] == sum(rows) == c["selected"] - len(sb.queue)
    assert N < c["selected"] < N + 0.6 * 2 * N
    # one optimizer step per trained batch (AdamW counts the steps a parameter had a gradient in), none for a
    # loader batch with nothing ready, two or more where several batches were ready together
    assert all(t.optimizer.state[p]["step"] == c["steps"] for p in model.parameters() if p.requires_grad)
    assert torch.cat(sb.trained[: N // bs]).sort().values.equal(torch.arange(N))  # primed: each example once
    logged = [h for h in t.state.log_history if "sb/seen" in h]
    assert logged and logged[-1]["sb/seen"] == 3 * N and logged[-1]["sb/backpropagated"] == c["backpropagated"]
    if data == "causal-lm":  # fully padded rows score 0, the lowest loss: after priming SB never picks them
        padded = torch.tensor([i for i in range(N) if i % 7 and i % 3 == 2])
        assert len(padded) > 50 and not torch.isin(torch.cat(sb.trained[N // bs :]), padded).any()
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.state.log_history if "loss" in h)


def test_padding_collators_carry_the_index_causal_lm_with_a_tokenizer(tmp_path):
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(40)]))  # fmt: skip
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))  # built offline from a word list
    texts = [" ".join(f"w{(i * j) % 40}" for j in range(1 + i % 9)) for i in range(64)]  # 1 to 9 words
    data = [dict(tokenizer(text, padding="max_length", max_length=12)) for text in texts]  # one length (see below)
    args = arguments(tmp_path, num_train_epochs=2, per_device_train_batch_size=16)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    t = SelectiveBackpropTrainer(model=gpt2(), args=args, train_dataset=data, data_collator=collator,
                                 selector=Recording, selector_kwargs=dict(beta=1, staleness=2, dataset_size=64),
                                 causal_lm=True)  # fmt: skip
    t.train()
    c, trained = t.selector.counters, t.selector.trained
    assert c["seen"] == 2 * 64 and c["skipped_forwards"] == 64  # StaleSB reused epoch 1's losses by index
    assert torch.cat(trained[:4]).sort().values.equal(torch.arange(64))  # the indices came through the collator
    assert 0 < c["backpropagated"] - 64 < 64
    # padded to each batch's longest, rows of different lengths would meet in the queue: refused, naming the fix
    t = SelectiveBackpropTrainer(model=gpt2(), args=arguments(tmp_path, per_device_train_batch_size=16),
                                 train_dataset=[dict(tokenizer(text)) for text in texts],
                                 data_collator=collator, causal_lm=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"sequence length.*padding='max_length'"):
        t.train()


def test_max_steps_counts_loader_batches_and_evaluation_selects_nothing(tmp_path):
    t = trainer(tmp_path, max_steps=13, eval_strategy="steps", eval_steps=5, eval_dataset=CLASSIFY[:64])
    t.train()
    c = t.selector.counters
    assert t.state.global_step == 13 and c["seen"] == 13 * 32  # 1 5/8 epochs; 3 evaluations of 64 not counted
    assert len([h for h in t.state.log_history if "eval_loss" in h]) == 3  # steps 5, 10 and the last
    assert c["steps"] == len(t.selector.trained) and c["backpropagated"] == sum(map(len, t.selector.trained))


def test_a_step_with_nothing_selected_leaves_the_weights_alone(tmp_path):
    t = trainer(tmp_path, sb=dict(policy=ThresholdPolicy(1e9)), num_train_epochs=2, weight_decay=0.1)
    t.train()  # AdamW with weight decay: a real step would move every weight
    assert t.selector.counters["backpropagated"] == N and t.state.global_step == 2 * N // 32
    after_first = trainer(tmp_path / "one", sb=dict(policy=ThresholdPolicy(1e9)), num_train_epochs=1,
                          weight_decay=0.1)  # fmt: skip
    after_first.train()
    assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), after_first.model.parameters(), strict=True))


@pytest.mark.parametrize("save_steps", [8, 12], ids=["end-of-epoch", "mid-epoch"])
def test_resume_from_a_trainer_checkpoint_continues_with_identical_selections(tmp_path, save_steps):
    sb = dict(beta=2, staleness=2, dataset_size=N, seed=3)
    whole = trainer(tmp_path / "whole", sb=sb, save_strategy="steps", save_steps=save_steps)
    whole.train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{save_steps}"
    assert (checkpoint / "selective_backprop.pt").exists()
    steps_before = int(torch.load(checkpoint / "selective_backprop.pt", weights_only=True)["counters"]["steps"])
    resumed = trainer(tmp_path / "resumed", sb=sb, save_strategy="steps", save_steps=save_steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = resumed.selector, whole.selector
    assert 0 < steps_before < len(b.trained) and len(a.trained) == len(b.trained) - steps_before
    assert all(torch.equal(x, y) for x, y in zip(a.trained, b.trained[steps_before:], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))
    assert a.counters["skipped_forwards"] > 0  # StaleSB's cache came through the checkpoint
    drop_times = {k: v for k, v in b.counters.items() if not k.endswith("_s")}
    assert {k: v for k, v in a.counters.items() if not k.endswith("_s")} == drop_times


def test_refusals_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2.*per_device_train_batch_size"):
        trainer(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="fp16=True is not supported.*bf16=True"):
        trainer(tmp_path, fp16=True)
    with pytest.raises(TypeError, match="Selector class"):
        SelectiveBackpropTrainer(model=bert(), args=arguments(tmp_path), train_dataset=CLASSIFY, selector=object)
    with pytest.raises(TypeError, match="remove model="):
        SelectiveBackpropTrainer(model=bert(), args=arguments(tmp_path), selector_kwargs=dict(model=bert()))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match="selective_backprop.pt is missing"):
        trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
