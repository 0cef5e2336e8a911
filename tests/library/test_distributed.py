"""Distributed SB: sharded loader and lockstep queue in-process; global selection on two gloo ranks.

The multi-process tests run this file as a script, one subprocess per rank (``python test_distributed.py
SCENARIO RANK WORLD FOLDER``), rendezvous through a file in ``tmp_path`` and save each rank's results with
``torch.save``. Every launch has a hard timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selective_backprop import BackpropQueue, PercentilePolicy, SelectiveBackprop
from selective_backprop.experiments.data import ArrayDataset, DeviceLoader, ShardedLoader
from selective_backprop.kath18 import Kath18, _normalize, variance_reduction

LAUNCH_TIMEOUT_S = 40  # per launch; the collective timeout inside is 10 s
COLLECTIVE_TIMEOUT_S = 10.0
STALL_TIMEOUT_S, STALL_SLEEP_S = 2.0, 6.0  # a process group with a short timeout; rank 1 sleeps longer


def toy_dataset(n: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long() + (images[:, 0, 0, 0] > 127).long()
    return ArrayDataset(images, labels, num_classes=3, mean=(0.5,), std=(0.25,), name="toy")


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


# ----------------------------------------------------------------------------------------------------------
# In-process: the loader and the queue


class TestShardedLoader:
    @pytest.mark.parametrize("n, world", [(91, 2), (90, 2), (10, 3), (7, 7)])
    @pytest.mark.parametrize("pad", [True, False])
    def test_static_shards_equal_batch_counts(self, n, world, pad):
        ds = toy_dataset(n)
        loaders = [ShardedLoader(ds, 4, rank=r, world_size=world, seed=5, pad=pad) for r in range(world)]
        for _ in range(2):  # epochs
            epochs = [torch.cat([idx for _, _, idx in loader]) for loader in loaders]
            assert {len(e) for e in epochs} == {-(-n // world) if pad else n // world}
            assert len({len(loader) for loader in loaders}) == 1
            for rank, seen in enumerate(epochs):
                assert bool((seen % world == rank).all())  # only its own indices, every epoch
                own = set(range(rank, n, world))
                assert set(seen.tolist()) <= own and (not pad or set(seen.tolist()) == own)
            if not pad:
                assert len(torch.cat(epochs).unique()) == len(torch.cat(epochs))  # no repeats

    def test_one_rank_is_a_device_loader_and_ranks_shuffle_differently(self):
        ds = toy_dataset(30)
        one, plain = ShardedLoader(ds, 8, rank=0, world_size=1, seed=3), DeviceLoader(ds, 8, seed=3)
        for _ in range(2):
            for (x, y, i), (px, py, pi) in zip(one, plain, strict=True):
                assert torch.equal(x, px) and torch.equal(y, py) and torch.equal(i, pi)
        orders = [torch.cat([i for _, _, i in ShardedLoader(ds, 8, rank=r, world_size=2, seed=3)]) for r in (0, 1)]
        assert not torch.equal(orders[0] // 2, orders[1] // 2)  # (seed, rank) give different permutations

    def test_state_dict_resumes_and_checks_the_rank(self):
        ds = toy_dataset(40)
        loader = ShardedLoader(ds, 6, rank=1, world_size=2, seed=1)
        list(loader)
        state = loader.state_dict()
        expected = [i for _, _, i in loader]
        fresh = ShardedLoader(ds, 6, rank=1, world_size=2, seed=1)
        fresh.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip((i for _, _, i in fresh), expected, strict=True))
        with pytest.raises(ValueError, match="rank 1 of 2, but this loader is rank 0 of 2"):
            ShardedLoader(ds, 6, rank=0, world_size=2, seed=1).load_state_dict(state)

    @pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
    def test_bad_rank_raises(self, rank, world):
        with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
            ShardedLoader(toy_dataset(8), 2, rank=rank, world_size=world)

    def test_fewer_examples_than_ranks_raises(self):
        with pytest.raises(ValueError, match="3 examples cannot be sharded over 4 ranks"):
            ShardedLoader(toy_dataset(3), 2, rank=0, world_size=4)


def test_queue_max_batches_holds_full_batches_back_in_order():
    q = BackpropQueue(2)
    assert q.push(torch.arange(5), max_batches=0) == [] and len(q) == 5
    assert [b[0].tolist() for b in q.push(torch.arange(5, 6), max_batches=1)] == [[0, 1]]
    assert [b[0].tolist() for b in q.push(torch.arange(0), max_batches=5)] == [[2, 3], [4, 5]]
    assert len(q) == 0


def test_distributed_without_a_process_group_says_how_to_start_one():
    with pytest.raises(RuntimeError, match="needs an initialized process group: call .*init_distributed"):
        SelectiveBackprop(nn.Linear(2, 2), distributed=True)


# ----------------------------------------------------------------------------------------------------------
# Multi-process: two gloo ranks


def launch(folder: Path, scenarios: str, world: int = 2) -> tuple[list[int], list[str], dict[str, list[dict]]]:
    """Run the comma-separated ``scenarios`` in turn on ``world`` ranks (one process group, so DDP's lazy imports
    are paid once); return the exit codes, the outputs and, per scenario, each rank's saved results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenarios, str(rank), str(world), str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    deadline, outputs = time.monotonic() + LAUNCH_TIMEOUT_S, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{scenarios}: ranks still running after {LAUNCH_TIMEOUT_S} s (a hang)")
    codes = [proc.returncode for proc in procs]
    files = {name: [folder / f"{name}.rank{r}.pt" for r in range(world)] for name in scenarios.split(",")}
    results = {name: [torch.load(f) if f.exists() else {} for f in paths] for name, paths in files.items()}
    return codes, outputs, results


def assert_ok(codes: list[int], outputs: list[str]) -> None:
    assert codes == [0] * len(codes), "\n".join(f"--- rank {r} ---\n{out[-3000:]}" for r, out in enumerate(outputs))


def assert_same_parameters(results: list[dict[str, Any]]) -> None:
    first = results[0]["params"]
    for other in results[1:]:
        assert first.keys() == other["params"].keys()
        assert all(torch.equal(first[k], other["params"][k]) for k in first)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The scenarios in which no rank fails, run in one launch of two ranks."""
    scenarios = "ddp-None,ddp-2,history,starved,one-rank,kath18,padding-bn"
    codes, outputs, results = launch(tmp_path_factory.mktemp("healthy"), scenarios)
    assert_ok(codes, outputs)
    return results


@pytest.mark.parametrize("staleness", [None, 2])
def test_ddp_with_global_selection_keeps_ranks_identical(healthy, staleness):
    results = healthy[f"ddp-{staleness}"]
    assert_same_parameters(results)
    assert results[0]["steps"] == results[1]["steps"] > 0
    assert torch.equal(results[0]["history"], results[1]["history"]) and len(results[0]["history"]) > 0
    for rank, res in enumerate(results):
        counters = res["counters"]
        assert 0 < counters["selected"] < counters["seen"]  # selection happened, and not of everything
        assert res["start"] != res["params"]["1.weight"].sum().item()  # the model trained
        if staleness is not None:
            assert counters["skipped_forwards"] > 0
            assert bool((res["cached"] % 2 == rank).all()) and len(res["cached"]) > 0  # own indices only


def test_gathered_history_equals_one_process_fed_the_union(healthy):
    results = healthy["history"]
    events = [res["events"] for res in results]
    assert [kind for kind, _ in events[0]] == [kind for kind, _ in events[1]]
    assert {kind for kind, _ in events[0]} == {"record", "score"}
    assert {len(e) for _, e in events[0]} != {len(e) for _, e in events[1]}  # unequal lengths were gathered
    single = PercentilePolicy(beta=1.0, history_size=64)
    probabilities = []
    for (kind, mine), (_, theirs) in zip(events[0], events[1], strict=True):
        union = torch.cat([mine, theirs])
        if kind == "record":
            single.record(union)
        else:
            probabilities.append(single(union))
    for res in results:
        assert torch.equal(res["history"], single.history)
        assert all(torch.equal(a, b) for a, b in zip(res["probabilities"], probabilities, strict=True))
    # Each rank flips its own coins (generator seed + rank) against its own slice of the union's probabilities.
    scores = [(a, b) for (kind, a), (_, b) in zip(events[0], events[1], strict=True) if kind == "score"]
    for rank, res in enumerate(results):
        coins, selected = torch.Generator().manual_seed(10 + rank), res["primed"]
        for (first, _), p in zip(scores, probabilities, strict=True):
            mine = p[: len(first)] if rank == 0 else p[len(first) :]
            selected += int((torch.rand(len(mine), generator=coins, dtype=p.dtype) < mine).sum())
        assert res["counters"]["selected"] == selected


def test_a_rank_that_selects_nothing_neither_hangs_nor_desyncs(healthy):
    results = healthy["starved"]
    assert_same_parameters(results)
    busy, idle = results
    assert busy["steps"] == idle["steps"] > 0
    assert idle["counters"]["selected"] == 0 and busy["counters"]["selected"] > 0
    assert idle["padding"] == idle["steps"] and busy["padding"] == 0
    assert idle["counters"]["backpropagated"] == 0


def test_kath18_switches_to_importance_sampling_in_lockstep(healthy):
    results = healthy["kath18"]
    assert_same_parameters(results)
    assert results[0]["taus"] == results[1]["taus"] and len(results[0]["taus"]) == results[0]["steps"]
    assert results[0]["switched"] == results[1]["switched"] and 0 < results[0]["switched"] < results[0]["steps"]
    # tau is the EMA over the union: recompute it from both ranks' scores, gathered in rank order
    for res in results:
        assert res["counters"]["selection_forwards"] > 0 and res["counters"]["backpropagated"] > 0
    tau = 0.0
    for mine, theirs in zip(results[0]["scores"], results[1]["scores"], strict=True):
        tau = 0.9 * tau + 0.1 * float(variance_reduction(_normalize(torch.cat([mine, theirs]))))
    assert tau == pytest.approx(results[0]["tau"], rel=1e-12)


def test_padding_batches_never_have_one_example(healthy):
    """Rank 1 pads from a last loader batch of one example; its padding batches still have two rows (BatchNorm)."""
    results = healthy["padding-bn"]
    assert_same_parameters(results)
    busy, idle = results
    assert idle["padding"] == idle["steps"] > 0 and min(idle["sizes"]) == 2
    assert busy["padding"] == 0 and min(busy["sizes"]) >= 2


def test_ranks_out_of_step_are_named_on_every_rank(tmp_path):
    """A rank with one loader batch more: both ranks raise CollectiveError saying where each was, none hangs."""
    codes, outputs, results = launch(tmp_path, "out-of-step")
    assert codes == [0, 0], outputs
    for rank, res in enumerate(results["out-of-step"]):
        error = res["error"]
        assert f"the ranks fell out of step on rank {rank} of 2" in error, error
        assert "rank 0 at collective" in error and "all_gather of the batch losses" in error
        assert "rank 1 at collective" in error and "flush batch counts" in error
        assert "same number of non-empty loader batches" in error


def test_a_dead_rank_gives_a_clear_error_within_the_timeout(tmp_path):
    codes, outputs, results = launch(tmp_path, "dies")
    assert codes == [0, 3], outputs
    error = results["dies"][0]["error"]
    assert "all_gather of the batch losses (header) failed on rank 0 of 2" in error
    assert "another rank probably died" in error
    assert results["dies"][0]["waited_s"] < COLLECTIVE_TIMEOUT_S + 5


def test_a_stalled_rank_times_out_on_its_process_group(tmp_path):
    codes, outputs, results = launch(tmp_path, "stalls")
    assert codes == [0, 3], outputs
    assert "failed on rank 0 of 2: another rank probably died or stalled" in results["stalls"][0]["error"]
    waited = results["stalls"][0]["waited_s"]
    assert STALL_TIMEOUT_S - 0.5 < waited < STALL_SLEEP_S  # the group's timeout, not the sleep


def test_a_group_of_one_equals_the_single_process_selector_exactly(healthy):
    for res in healthy["one-rank"]:  # each rank on a process group of its own
        assert torch.equal(res["history"], res["reference_history"])
        assert all(torch.equal(res["params"][k], res["reference_params"][k]) for k in res["params"])


# ----------------------------------------------------------------------------------------------------------
# The worker (runs in each rank's subprocess)


class Zeros:
    """A policy that keeps the history but never selects anything."""

    needs_loss = True
    selects_all = False

    def __init__(self) -> None:
        self.inner = PercentilePolicy(beta=1.0)

    def record(self, losses: Tensor) -> None:
        self.inner.record(losses)

    def __call__(self, losses: Tensor) -> Tensor:
        return torch.zeros_like(self.inner(losses))

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def dying(loader: Any, at: int, sleep_s: float = 0.0) -> Any:
    """Yield from ``loader`` until batch ``at``, then (after ``sleep_s``) exit at once (code 3), as a crash would."""
    for k, item in enumerate(loader):
        if k == at:
            time.sleep(sleep_s)
            os._exit(3)
        yield item


def train(sb: SelectiveBackprop, model: nn.Module, loader: Any, epochs: int, die_at: int | None = None) -> dict:
    """The drop-in loop; ``die_at``: exit (code 3) when the loader reaches that batch of epoch 1."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    steps = padding = 0
    sizes = []
    for epoch in range(epochs):
        for batch in sb.iterate(loader if die_at is None or epoch != 1 else dying(loader, die_at)):
            loss = batch.loss(model(batch.inputs))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, padding = steps + 1, padding + batch.padding
            sizes.append(len(batch))
    return {"steps": steps, "padding": padding, "sizes": sizes}


def scenario_ddp(rank: int, world: int, staleness: int | None) -> dict[str, Any]:
    ds, model = toy_dataset(91), toy_model()
    start = model[1].weight.sum().item()
    ddp = nn.parallel.DistributedDataParallel(model)
    sb = SelectiveBackprop(ddp, batch_size=8, beta=1, staleness=staleness, dataset_size=len(ds), distributed=True)
    out = train(sb, ddp, ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0), epochs=4)
    cached = sb.cache.valid.nonzero().squeeze(1) if sb.cache is not None else torch.empty(0)
    return {**out, "params": model.state_dict(), "history": sb.policy.history, "counters": sb.counters,
            "start": start, "cached": cached}  # fmt: skip


def scenario_history(rank: int, world: int) -> dict[str, Any]:
    """A frozen model, so every loss is a fixed function of the example; rank batch sizes differ (8 vs 5)."""
    ds, model = toy_dataset(64), toy_model()
    events: list[tuple[str, Tensor]] = []

    def logged(outputs: Tensor, targets: Tensor) -> Tensor:
        losses = F.cross_entropy(outputs, targets, reduction="none")
        if not torch.is_grad_enabled():  # the scoring forward: what the policy is asked about
            events.append(("score", losses.detach().clone()))
        return losses

    class Recording(PercentilePolicy):
        def __call__(self, losses: Tensor) -> Tensor:
            p = super().__call__(losses)
            probabilities.append(p)
            return p

    probabilities: list[Tensor] = []  # what the policy returned: one value per example of the union
    policy = Recording(1.0, history_size=64)
    sb = SelectiveBackprop(model, batch_size=6, policy=policy, loss_fn=logged, seed=10, distributed=True)
    loader = list(ShardedLoader(ds, 8 if rank == 0 else 5, rank=rank, world_size=world, seed=0))[:4]
    for _ in range(3):
        for batch in sb.iterate(loader):
            outputs = model(batch.inputs)
            if batch.epoch <= sb.prime_epochs:  # a step that may hold primed rows: every rank gathers theirs
                losses = F.cross_entropy(outputs, batch.targets, reduction="none").detach()
                primed = batch.primed_rows is not None and not batch.padding
                events.append(("record", losses[batch.primed_rows] if primed else losses[:0]))
            batch.loss(outputs).backward()
    return {"events": events, "history": sb.policy.history, "probabilities": probabilities, "counters": sb.counters,
            "primed": sum(len(y) for _, y, _ in loader)}  # fmt: skip


def scenario_starved(rank: int, world: int) -> dict[str, Any]:
    ds, model = toy_dataset(64), toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    policy = PercentilePolicy(beta=1.0) if rank == 0 else Zeros()
    sb = SelectiveBackprop(ddp, batch_size=4, policy=policy, prime_epochs=0, distributed=True)
    out = train(sb, ddp, ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0), epochs=3)
    return {**out, "params": model.state_dict(), "counters": sb.counters}


def scenario_kath18(rank: int, world: int) -> dict[str, Any]:
    """Kath18 on two ranks; the scores each rank feeds to tau are logged to recompute the global tau."""
    ds, model = toy_dataset(96), toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    sb = Kath18(ddp, batch_size=4, presample=2, tau_th=1.1, seed=1, distributed=True)
    scores: list[Tensor] = []
    update = sb._update_tau

    def logged(local: Tensor) -> None:
        scores.append(local.detach().clone())
        update(local)

    sb._update_tau = logged  # type: ignore[method-assign]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    taus, steps, switched = [], 0, 0
    for _ in range(4):
        for batch in sb.iterate(ShardedLoader(ds, 4, rank=rank, world_size=world, seed=0)):
            loss = batch.loss(ddp(batch.inputs))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            switched += batch.weights is not None
            taus.append(sb.tau)
    return {"params": model.state_dict(), "taus": taus, "steps": steps, "switched": switched, "tau": sb.tau,
            "counters": sb.counters, "scores": scores}  # fmt: skip


def scenario_dies(rank: int, world: int) -> dict[str, Any]:
    from selective_backprop.distributed import CollectiveError

    ds, model = toy_dataset(64), toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    sb = SelectiveBackprop(ddp, batch_size=8, beta=1, distributed=True)
    loader = ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0)
    start = time.monotonic()
    try:
        train(sb, ddp, loader, epochs=3, die_at=2 if rank == 1 else None)
    except CollectiveError as err:
        return {"error": str(err), "waited_s": time.monotonic() - start}
    return {"error": "no error"}


def scenario_stalls(rank: int, world: int) -> dict[str, Any]:
    """No DDP; the selector runs on its own group, whose timeout is short (also exercises ``distributed=group``)."""
    import datetime

    import torch.distributed as dist

    from selective_backprop.distributed import CollectiveError

    group = dist.new_group(timeout=datetime.timedelta(seconds=STALL_TIMEOUT_S))
    ds, model = toy_dataset(64), toy_model()
    sb = SelectiveBackprop(model, batch_size=8, beta=1, prime_epochs=0, distributed=group)
    loader = ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0)
    list(sb.iterate(loader))  # one epoch, nothing trained: warms up the group
    batches = loader if rank == 0 else dying(loader, 2, sleep_s=STALL_SLEEP_S)
    start = time.monotonic()
    try:
        for _ in sb.iterate(batches):
            start = time.monotonic()
    except CollectiveError as err:
        return {"error": str(err), "waited_s": time.monotonic() - start}
    return {"error": "no error"}


def scenario_padding_bn(rank: int, world: int) -> dict[str, Any]:
    """A BatchNorm model; each rank's shard of 17 examples ends in a loader batch of one, and rank 1 selects nothing,
    so it pads every step from that one-example batch."""
    ds = toy_dataset(17)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    policy = PercentilePolicy(beta=1.0) if rank == 0 else Zeros()
    sb = SelectiveBackprop(ddp, batch_size=4, policy=policy, prime_epochs=0, distributed=True)
    out = train(sb, ddp, ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0), epochs=3)
    # parameters only: each rank's BatchNorm statistics follow its own last batch (DDP broadcasts rank 0's before
    # every forward)
    return {**out, "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


def scenario_out_of_step(rank: int, world: int) -> dict[str, Any]:
    """Rank 1's loader has one batch fewer than rank 0's: rank 0 offers a batch while rank 1 ends its epoch."""
    from selective_backprop.distributed import CollectiveError

    ds, model = toy_dataset(64), toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    sb = SelectiveBackprop(ddp, batch_size=4, beta=1, prime_epochs=0, distributed=True)
    batches = list(ShardedLoader(ds, 8, rank=rank, world_size=world, seed=0))
    try:
        train(sb, ddp, batches if rank == 0 else batches[:-1], epochs=1)
    except CollectiveError as err:
        return {"error": str(err)}
    return {"error": "no error: the ranks were not caught out of step"}


def scenario_one_rank(rank: int, world: int) -> dict[str, Any]:
    """DDP and the selector on a process group of this rank alone, against the plain single-process selector."""
    import torch.distributed as dist

    own = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in creating every group
    ds = toy_dataset(50)
    model, reference = toy_model(), toy_model()
    ddp = nn.parallel.DistributedDataParallel(model, process_group=own)
    sb = SelectiveBackprop(ddp, batch_size=8, beta=1, staleness=2, dataset_size=50, distributed=own)
    ref = SelectiveBackprop(reference, batch_size=8, beta=1, staleness=2, dataset_size=50)
    train(sb, ddp, ShardedLoader(ds, 8, rank=0, world_size=1, seed=3), epochs=3)
    train(ref, reference, DeviceLoader(ds, 8, seed=3), epochs=3)
    return {"params": model.state_dict(), "history": sb.policy.history,
            "reference_params": reference.state_dict(), "reference_history": ref.policy.history}  # fmt: skip


SCENARIOS = {"ddp-None": functools.partial(scenario_ddp, staleness=None),
             "ddp-2": functools.partial(scenario_ddp, staleness=2), "history": scenario_history,
             "starved": scenario_starved, "dies": scenario_dies, "stalls": scenario_stalls,
             "one-rank": scenario_one_rank, "kath18": scenario_kath18, "padding-bn": scenario_padding_bn,
             "out-of-step": scenario_out_of_step}  # fmt: skip


def worker(scenarios: str, rank: int, world: int, folder: Path) -> None:
    import torch.distributed as dist

    from selective_backprop.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo", COLLECTIVE_TIMEOUT_S, f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)
    for scenario in scenarios.split(","):
        result = SCENARIOS[scenario](rank, world)
        torch.save(result, folder / f"{scenario}.rank{rank}.pt")
        if "error" in result:
            os._exit(0)  # the group is broken: skip its teardown
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
