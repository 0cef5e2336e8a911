"""StaleSB: reuse each example's loss for 3 epochs instead of forwarding it again. The loader must yield dataset
indices (here a third tensor of the TensorDataset).

Run: python examples/stale_sb.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selective_backprop import SelectiveBackprop

torch.manual_seed(0)
X = torch.randn(4096, 20)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
loader = DataLoader(TensorDataset(X, Y, torch.arange(len(X))), batch_size=128, shuffle=True)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

sb = SelectiveBackprop(model, batch_size=128, beta=2, staleness=3, dataset_size=len(X))
for epoch in range(7):
    for batch in sb.iterate(loader):
        loss = batch.loss(model(batch.inputs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

with torch.no_grad():
    accuracy = (model(X).argmax(1) == Y).float().mean().item()
c = sb.counters
# epoch 0 is primed (no scoring forward); fresh scoring forwards at epochs 3 and 6, cached losses at 1, 2, 4, 5
print(f"accuracy {accuracy:.3f}  scoring forwards {c['selection_forwards']:.0f}  skipped {c['skipped_forwards']:.0f}")
