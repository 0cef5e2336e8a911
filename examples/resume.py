"""Save and resume: the selector's state_dict goes into the checkpoint beside the model's and the optimizer's, and
the resumed run continues exactly as the uninterrupted one (same selections, same parameters).

Run: python examples/resume.py [checkpoint path]
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from selective_backprop import SelectiveBackprop

X = torch.randn(2048, 20, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def batches(epoch: int):
    """The loader of one epoch: a seeded shuffle, so a resumed run sees the same order."""
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
    return [(X[o], Y[o], o) for o in order.split(128)]


def build():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sb = SelectiveBackprop(model, batch_size=128, beta=2, staleness=2, dataset_size=len(X), seed=0)
    return model, optimizer, sb


def train(model, optimizer, sb, epochs):
    for epoch in epochs:
        for batch in sb.iterate(batches(epoch)):
            loss = batch.loss(model(batch.inputs))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "checkpoint.pt"
model, optimizer, sb = build()
train(model, optimizer, sb, range(3))
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "selector": sb.state_dict()}, path)
train(model, optimizer, sb, range(3, 6))  # the uninterrupted run

resumed_model, resumed_optimizer, resumed_sb = build()
state = torch.load(path, weights_only=True)  # plain tensors and numbers: no pickled code runs
resumed_model.load_state_dict(state["model"])
resumed_optimizer.load_state_dict(state["optimizer"])
resumed_sb.load_state_dict(state["selector"])
train(resumed_model, resumed_optimizer, resumed_sb, range(3, 6))

same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True))
backprops = resumed_sb.counters["backpropagated"]
print(f"resumed run identical to the uninterrupted one: {same}; backpropagated {backprops:.0f}")
sys.exit(0 if same else 1)
