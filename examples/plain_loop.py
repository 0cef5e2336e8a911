"""Selective-Backprop in a plain PyTorch loop: three changed lines (marked), synthetic data, CPU, a few seconds.

Run: python examples/plain_loop.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selective_backprop import SelectiveBackprop

torch.manual_seed(0)
X = torch.randn(4096, 20)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=128, shuffle=True)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

sb = SelectiveBackprop(model, batch_size=128, beta=2)  # 1: the selector
for epoch in range(5):
    for batch in sb.iterate(loader):  # 2: was `for x, y in loader:`
        loss = batch.loss(model(batch.inputs))  # 3: was `loss = F.cross_entropy(model(x), y)`
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

with torch.no_grad():
    accuracy = (model(X).argmax(1) == Y).float().mean().item()
    full_loss = F.cross_entropy(model(X), Y).item()
c = sb.counters
print(f"accuracy {accuracy:.3f}  loss {full_loss:.3f}  backpropagated {c['backpropagated']:.0f} of {c['seen']:.0f}")
