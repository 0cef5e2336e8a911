"""The drop-in selector in the training loops people actually write: nested batches, losses that are not plain
classification, a scoring forward that leaves no trace, no batch of one, bad arguments refused at construction,
priming that is exactly one epoch.
"""

from __future__ import annotations

import io
import math
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selective_backprop import (
    ComposerSB,
    InfoBatch,
    Kath18,
    LossCache,
    PercentilePolicy,
    SelectiveBackprop,
    ThresholdPolicy,
    UniformPolicy,
    per_sequence_cross_entropy,
    token_counts,
)

V, T, C = 12, 6, 3  # vocabulary, sequence length, classes


class TextClassifier(nn.Module):
    """Hugging Face style: ``model(input_ids=..., attention_mask=...)``; the class is which token appears most."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(V, 16), nn.Linear(16, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)


def text_data(n: int, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=gen)
    ids = torch.randint(C, V, (n, T), generator=gen)
    ids[:, :3] = labels[:, None]  # the label's token three times: learnable
    mask = torch.ones(n, T, dtype=torch.long)
    mask[: n // 2, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}, labels


def text_loader(n: int, batch: int, epoch: int) -> list[tuple[dict[str, Tensor], Tensor, Tensor]]:
    inputs, labels = text_data(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return [({k: v[o] for k, v in inputs.items()}, labels[o], o) for o in order.split(batch)]


# ----- 1. a batch is not always one tensor ------------------------------------------------------------------------
def test_dict_inputs_train_end_to_end_in_the_three_line_loop_with_stale_sb_and_a_resume():
    model, n = TextClassifier(), 96
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sb = SelectiveBackprop(model, batch_size=8, beta=1, staleness=2, dataset_size=n, seed=1)

    def epoch(selector, net, opt, e):
        for batch in selector.iterate(text_loader(n, 12, e)):
            loss = batch.loss(batch.forward(net))  # the training forward stays one line: model(**inputs)
            opt.zero_grad()
            loss.backward()
            opt.step()

    for e in range(3):
        epoch(sb, model, optimizer, e)
    c = sb.counters
    assert c["seen"] == 3 * n and c["skipped_forwards"] > 0 and 0 < c["selected"] - n < 2 * n
    assert c["selected"] == c["backpropagated"] + len(sb.queue)
    buffer = io.BytesIO()  # a dict batch waiting in the queue goes through the state_dict like any tensor
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "sb": sb.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = TextClassifier()
    twin.load_state_dict(state["model"])
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin_opt.load_state_dict(state["opt"])
    twin_sb = SelectiveBackprop(twin, batch_size=8, beta=1, staleness=2, dataset_size=n, seed=1)
    twin_sb.load_state_dict(state["sb"])
    for e in range(3, 8):
        epoch(sb, model, optimizer, e)
        epoch(twin_sb, twin, twin_opt, e)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    inputs, labels = text_data(n)
    with torch.no_grad():
        assert (model(**inputs).argmax(1) == labels).float().mean() > 0.9


def test_a_dict_with_as_many_rows_as_keys_is_rows_not_keys():
    model = TextClassifier()
    inputs, labels = text_data(2)  # two keys, two rows
    sb = SelectiveBackprop(model, batch_size=2, prime_epochs=1)
    (batch,) = sb.select(inputs, labels, torch.arange(2))
    assert set(batch.inputs) == {"input_ids", "attention_mask"} and len(batch) == 2
    assert batch.loss(batch.forward(model)).ndim == 0


def test_tuple_inputs_feed_a_multi_input_model_and_rows_come_from_every_leaf():
    class ImageAndMetadata(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image, self.meta = nn.Linear(4, C), nn.Linear(2, C)

        def forward(self, image: Tensor, metadata: Tensor) -> Tensor:
            return self.image(image) + self.meta(metadata)

    model, n = ImageAndMetadata(), 16
    image, metadata = torch.randn(n, 4), torch.arange(n).float()[:, None].repeat(1, 2)
    labels = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(0))
    sb = SelectiveBackprop(model, batch_size=4, beta=1, prime_epochs=0, seed=3)
    batches = sb.select((image, metadata), labels, torch.arange(n)) + sb.flush()
    assert batches
    for batch in batches:
        img, meta = batch.inputs
        assert torch.equal(img, image[batch.indices]) and torch.equal(meta[:, 0], batch.indices.float())
        batch.loss(batch.forward(model)).backward()  # model(image, metadata)


def test_nested_targets_and_a_mapping_that_is_not_a_dict():
    model = TextClassifier()
    inputs, labels = text_data(8)
    targets = {"class": labels, "weight": torch.ones(8)}

    def loss_fn(outputs, t):
        return F.cross_entropy(outputs, t["class"], reduction="none") * t["weight"]

    sb = SelectiveBackprop(model, batch_size=4, loss_fn=loss_fn, prime_epochs=0, beta=1, seed=0)
    batches = sb.select(UserDict(inputs), targets, torch.arange(8)) + sb.flush()  # e.g. a BatchEncoding
    for batch in batches:
        assert isinstance(batch.inputs, dict) and set(batch.targets) == {"class", "weight"}
        assert torch.equal(batch.targets["class"], labels[batch.indices])
        batch.loss(batch.forward(model))
    assert sb.counters["backpropagated"] == sb.counters["selected"] > 0


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ({"text": ["a", "b"], "ids": torch.zeros(2, 3)}, TypeError, r"got str at inputs\['text'\]\[0\]"),
        ({"ids": torch.zeros(2, 3), "n": 2}, TypeError, r"got int at inputs\['n'\]"),
        ({"ids": torch.zeros(2, 3), "mask": torch.zeros(3, 3)}, ValueError, r"inputs\['ids'\]: 2, inputs\['mask'\]: 3"),
        ("a string", TypeError, "got str at inputs"),
        ({"ids": None}, TypeError, "must hold at least one tensor"),
        (torch.tensor(1.0), ValueError, "0-dim"),
    ],
)
def test_anything_else_is_refused_at_the_first_select_naming_what_was_received(inputs, error, match):
    sb = SelectiveBackprop(nn.Linear(3, 2), batch_size=2)
    with pytest.raises(error, match=match):
        sb.select(inputs, torch.zeros(2, dtype=torch.long))


def test_the_forward_option_is_used_by_the_scoring_forward_and_by_batch_forward():
    calls = []

    def forward(model, inputs):
        calls.append(torch.is_grad_enabled())
        return model(inputs["x"])

    model = nn.Linear(3, 2)
    sb = SelectiveBackprop(model, batch_size=4, forward=forward, prime_epochs=0, beta=1, seed=2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    batches = sb.select({"x": x}, y) + sb.flush()
    for batch in batches:
        batch.loss(batch.forward(model))
    assert calls[0] is False and calls[1:] == [True] * len(batches)  # one scoring forward, then the training ones


# ----- 2. losses that are not plain classification --------------------------------------------------------------
def test_kath18_upper_bound_refuses_regression_and_sequence_outputs_pointing_to_score_loss():
    reg = Kath18(nn.Linear(3, 1), batch_size=4, loss_fn=lambda out, y: (out.squeeze(1) - y) ** 2)
    (batch,) = reg.select(torch.randn(4, 3), torch.randn(4))
    with pytest.raises(ValueError, match="score='loss'"):
        batch.loss(batch.forward(reg.model))  # the uniform phase scores its training batch: the first step

    class SequenceLogits(nn.Module):  # (B, T, V) with V == T: a "score" would silently come out 2-D
        def forward(self, x):
            return x.view(len(x), 5, 5)

    seq = Kath18(SequenceLogits(), batch_size=2, tau_th=-1.0,
                 loss_fn=lambda out, y: per_sequence_cross_entropy(out, y))  # fmt: skip
    with pytest.raises(ValueError, match=r"\(N, C\) class logits .* score='loss'"):
        seq.select(torch.randn(6, 25), torch.randint(0, 5, (6, 5)))  # importance sampling on: a presample


def test_kath18_score_loss_works_for_a_regression_loss():
    model = nn.Linear(3, 1)
    kath = Kath18(model, batch_size=4, presample=2, score="loss", tau_th=-1.0, seed=0,
                  loss_fn=lambda out, y: (out.squeeze(1) - y) ** 2)  # fmt: skip
    x, y = torch.randn(8, 3), torch.randn(8)
    (batch,) = kath.select(x, y)
    assert batch.weights is not None and torch.isfinite(batch.loss(batch.forward(model)))


def test_per_sequence_losses_mask_tokens_and_give_fully_padded_rows_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, T, V, generator=gen)
    labels = torch.randint(0, V, (4, T), generator=gen)
    labels[0, 4:] = -100
    labels[3] = -100  # fully padded
    got = per_sequence_cross_entropy(logits, labels)
    for i in range(3):
        keep = labels[i] != -100
        assert got[i] == pytest.approx(F.cross_entropy(logits[i][keep], labels[i][keep]).item(), rel=1e-6)
    assert got[3] == 0.0 and token_counts(labels).tolist() == [4.0, T, T, 0.0]
    with pytest.raises(ValueError, match=r"\(N, T, V\) logits and \(N, T\) labels"):
        per_sequence_cross_entropy(logits[:, 0], labels)


def test_token_count_weights_make_the_batch_loss_the_token_level_mean():
    """The recipe: per-sequence losses to select, token counts as example_weights to train as the model's loss."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, T * V, generator=gen)
    labels = torch.randint(0, V, (6, T), generator=gen)
    labels[0, 3:], labels[1] = -100, -100
    model = nn.Sequential(nn.Linear(T * V, T * V), nn.Unflatten(1, (T, V)))
    sb = SelectiveBackprop(model, batch_size=6, prime_epochs=1, loss_fn=per_sequence_cross_entropy,
                           example_weights=token_counts)  # fmt: skip
    (batch,) = sb.select(x, labels)
    outputs = batch.forward(model)
    expected = F.cross_entropy(outputs.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert batch.loss(outputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_weights_as_example_weights_match_cross_entropy_with_weight():
    w = torch.tensor([0.2, 1.0, 3.0])
    outputs, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 2, 1, 0, 2, 2])
    model = nn.Identity()
    sb = SelectiveBackprop(model, batch_size=8, prime_epochs=1, example_weights=lambda t: w[t])
    (batch,) = sb.select(outputs, y)
    assert batch.loss(batch.forward(model)).item() == pytest.approx(F.cross_entropy(outputs, y, weight=w).item())
    plain = SelectiveBackprop(model, batch_size=8, prime_epochs=1)  # without: the plain mean of per-example losses
    (batch,) = plain.select(outputs, y)
    assert batch.loss(outputs).item() == pytest.approx(F.cross_entropy(outputs, y).item())


# ----- 3. the scoring forward leaves no trace in the model --------------------------------------------------------
class GrowingPositions(nn.Module):
    """Keeps a positional table, grown (a new tensor) when a longer sequence arrives: created during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("positions", torch.ones(1, 4))
        self.head = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, L, 4)
        if self.positions.shape[0] < x.shape[1]:
            self.positions = torch.linspace(0.5, 1.5, x.shape[1])[:, None].repeat(1, 4)
        return self.head((x * self.positions[: x.shape[1]]).mean(1))  # multiplication saves it for backward


def test_state_grown_during_the_scoring_forward_trains_afterwards():
    model = GrowingPositions()
    sb = SelectiveBackprop(model, batch_size=4, prime_epochs=0, policy=ThresholdPolicy(-1.0), seed=0)  # scores all
    x, y = torch.randn(4, 7, 4), torch.randint(0, C, (4,))
    (batch,) = sb.select(x, y)  # the scoring forward grows the table to length 7
    assert model.positions.shape[0] == 7 and not model.positions.is_inference()
    loss = batch.loss(batch.forward(model))
    loss.backward()  # with inference_mode scoring: "Inference tensors cannot be saved for backward"
    assert model.head.weight.grad is not None


def test_lazy_parameters_materialised_by_the_scoring_forward_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, C))
    sb = SelectiveBackprop(model, batch_size=8, prime_epochs=0, policy=ThresholdPolicy(-1.0), seed=0)  # scores all
    x, y = torch.randn(8, 5), torch.randint(0, C, (8,))
    (batch,) = sb.select(x, y)  # the first forward of the model is the scoring one
    lazy = model[0]
    assert lazy.weight.shape == (8, 5) and lazy.weight.requires_grad and not lazy.weight.is_inference()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = lazy.weight.detach().clone()
    batch.loss(batch.forward(model)).backward()
    optimizer.step()
    assert lazy.weight.grad is not None and not torch.equal(lazy.weight.detach(), before)


# ----- 4. re-batching keeps the batch-size guarantees -------------------------------------------------------------
def test_a_batchnorm_model_trains_many_epochs_with_odd_remainders_and_loses_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(103, 5, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    sb = SelectiveBackprop(model, batch_size=8, beta=1, seed=4)  # min_batch_size 2
    sizes, carried = [], []
    for epoch in range(25):
        order = torch.randperm(103, generator=torch.Generator().manual_seed(epoch))[:100]  # drop_last: 100 a epoch
        for batch in sb.iterate([(x[o], y[o], o) for o in order.split(10)]):
            loss = batch.loss(batch.forward(model))  # a batch of one would raise inside BatchNorm here
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sizes.append(len(batch))
        carried.append(len(sb.queue))
    assert min(sizes) >= 2 and max(sizes) == 8
    assert 1 in carried and set(carried) <= {0, 1}  # one example waited for the next epoch, at least once
    (last,) = sb.flush() or [None]  # the very end: flush() returns it
    assert (last is not None) == (carried[-1] == 1)
    c = sb.counters
    assert c["selected"] == c["backpropagated"] + (len(last) if last is not None else 0)


def test_min_batch_size_is_checked():
    with pytest.raises(ValueError, match="min_batch_size must be at most batch_size=4"):
        SelectiveBackprop(nn.Linear(2, 2), batch_size=4, min_batch_size=5)
    assert SelectiveBackprop(nn.Linear(2, 2), batch_size=1).min_batch_size == 1


# ----- 5. wrong arguments fail when the object is built -----------------------------------------------------------
def sb(**kwargs):
    return SelectiveBackprop(nn.Linear(2, 2), **kwargs)


BAD = [
    (lambda: sb(policy="percentile"), TypeError, "policy must be a Policy instance"),
    (lambda: sb(policy=PercentilePolicy), TypeError, "got the class PercentilePolicy; pass PercentilePolicy"),
    (lambda: sb(loss_fn="ce"), TypeError, "loss_fn must be a function"),
    (lambda: sb(loss_fn=nn.CrossEntropyLoss), TypeError, "loss_fn must be a function"),
    (lambda: sb(forward=3), TypeError, "forward must be a function"),
    (lambda: sb(example_weights="tokens"), TypeError, "example_weights must be a function"),
    (lambda: sb(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (lambda: sb(batch_size=2.5), TypeError, "batch_size must be an int"),
    (lambda: sb(beta=float("nan")), ValueError, "beta must be a finite number > 0"),
    (lambda: sb(seed=-1), ValueError, "seed must be an int >= 0"),
    (lambda: sb(seed="0"), TypeError, "seed must be an int"),
    (lambda: sb(prime_epochs=-1), ValueError, "prime_epochs must be an int >= 0"),
    (lambda: sb(refresh_on_backprop="yes"), TypeError, "refresh_on_backprop must be True or False"),
    (lambda: sb(staleness=0, dataset_size=4), ValueError, "staleness must be an int >= 1"),
    (lambda: sb(staleness=2), ValueError, "needs dataset_size"),
    (lambda: sb(score_mode="test"), ValueError, "score_mode must be one of"),
    (lambda: sb(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
    (lambda: sb(flush="always"), ValueError, "flush must be one of"),
    (lambda: Kath18(nn.Linear(2, 2), tau_th=float("nan")), ValueError, "tau_th must be a finite number"),
    (lambda: Kath18(nn.Linear(2, 2), tau_ema=1.0), ValueError, r"tau_ema must be a finite number in \[0, 1\)"),
    (lambda: Kath18(nn.Linear(2, 2), presample=0), ValueError, "presample must be an int >= 1"),
    (lambda: Kath18(nn.Linear(2, 2), score="grad"), ValueError, "score must be one of"),
    (lambda: InfoBatch(nn.Linear(2, 2), prune_ratio=1.0, epochs=2, dataset_size=4), ValueError, "prune_ratio"),
    (lambda: InfoBatch(nn.Linear(2, 2), delta=float("nan"), epochs=2, dataset_size=4), ValueError, "delta"),
    (lambda: InfoBatch(nn.Linear(2, 2), epochs=0, dataset_size=4), ValueError, "epochs must be an int >= 1"),
    (lambda: ComposerSB(nn.Linear(2, 2), keep=0.0, epochs=2, dataset_size=4), ValueError, r"keep .* \(0, 1\]"),
    (lambda: ComposerSB(nn.Linear(2, 2), keep=True, epochs=2, dataset_size=4), TypeError, "keep must be"),
    (lambda: ComposerSB(nn.Linear(2, 2), start=0.6, end=0.5, epochs=2, dataset_size=4), ValueError, "end must"),
    (lambda: ComposerSB(nn.Linear(2, 2), interrupt=-1, epochs=2, dataset_size=4), ValueError, "interrupt"),
    (lambda: PercentilePolicy(history_size=0), ValueError, "history_size must be an int >= 1"),
    (lambda: PercentilePolicy(floor=2.0), ValueError, "floor must be a probability"),
    (lambda: UniformPolicy(float("nan")), ValueError, "rate must be a probability"),
    (lambda: ThresholdPolicy(float("inf")), ValueError, "threshold must be a finite number"),
    (lambda: LossCache(0, 1), ValueError, "dataset_size must be an int >= 1"),
]


@pytest.mark.parametrize("build, error, match", BAD, ids=range(len(BAD)))
def test_every_bad_argument_is_refused_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


# ----- 6. priming is exactly one epoch -----------------------------------------------------------------------------
def test_the_primed_epochs_remainder_is_primed_and_its_losses_reach_the_history():
    model = nn.Linear(3, C)
    sb = SelectiveBackprop(model, batch_size=8, prime_epochs=1, seed=0)
    x, y = torch.randn(20, 3), torch.randint(0, C, (20,))
    batches = sb.select(x[:10], y[:10]) + sb.select(x[10:], y[10:]) + sb.end_epoch()
    assert [len(b) for b in batches] == [8, 8, 4]
    assert all(b.primed and b.epoch == 0 for b in batches)
    for b in batches:
        b.loss(b.forward(model))
    assert len(sb.policy) == 20  # every primed loss, the remainder's included


def test_an_error_in_the_primed_epochs_remainder_names_its_epoch():
    class NaNOnRow(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), C)
            return torch.where((x[:, 0] == 19)[:, None], torch.full_like(out, float("nan")), out)

    sb = SelectiveBackprop(NaNOnRow(), batch_size=8, prime_epochs=1)
    x = torch.arange(20.0)[:, None]
    y = torch.zeros(20, dtype=torch.long)
    for batch in sb.select(x, y, torch.arange(20)):
        batch.loss(batch.forward(sb.model))
    (last,) = sb.end_epoch()
    with pytest.raises(ValueError, match=r"dataset indices \[19\] \(epoch 0\)"):
        last.loss(last.forward(sb.model))


def test_a_long_list_of_bad_indices_is_capped():
    model = nn.Linear(1, C)
    sb = SelectiveBackprop(model, batch_size=40, prime_epochs=1)
    (batch,) = sb.select(torch.zeros(40, 1), torch.zeros(40, dtype=torch.long), torch.arange(40))
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7\] and 32 more"):
        batch.loss(torch.full((40, C), math.nan))


def test_loader_batches_padded_to_different_lengths_are_refused_naming_the_leaf_and_the_fix():
    """The queue joins selected rows of several loader batches: a sequence padded to each batch's longest cannot
    join one padded to another length. Found through the Hugging Face Trainer (a torch.cat error before)."""
    model = nn.EmbeddingBag(50, 3)
    sb = SelectiveBackprop(model, batch_size=4, forward=lambda m, x: m(x["input_ids"]))
    ids = {"input_ids": torch.randint(0, 50, (3, 8))}
    assert sb.select(ids, torch.zeros(3, dtype=torch.long), torch.arange(3)) == []  # primed: queued, 3 < 4
    longer = {"input_ids": torch.randint(0, 50, (3, 12))}
    with pytest.raises(ValueError, match=r"different shapes in inputs\['input_ids'\] .*\(8,\) and \(12,\).*max_length"):
        sb.select(longer, torch.zeros(3, dtype=torch.long), torch.arange(3, 6))


def test_a_loader_item_that_is_not_a_tuple_is_refused_saying_how_to_split_a_dict():
    sb = SelectiveBackprop(nn.Linear(3, 2), batch_size=4)
    loader = [{"x": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}]
    with pytest.raises(TypeError, match=r"the loader must yield \(inputs, targets\) or \(inputs, targets, indices\) "
                                        r"tuples, got dict; .*batch\.pop\('labels'\)"):  # fmt: skip
        next(sb.iterate(loader))
    with pytest.raises(TypeError, match="got tuple of 4"):
        next(sb.iterate([(torch.zeros(2, 3),) * 4]))
