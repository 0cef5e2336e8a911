"""Selective-Backprop in a Hugging Face Accelerate loop: no adapter, the README's three-line loop on the prepared
model, optimizer and loader; the selector rides in ``accelerator.save_state`` through
``register_for_checkpointing``. Synthetic data, CPU, a few seconds. Needs ``pip install 'selective-backprop[hf]'``.

Run: python examples/accelerate_loop.py [--bf16] [checkpoint folder]
(not accelerate.py: a script named so would shadow the package)
"""

import sys
import tempfile

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selective_backprop import SelectiveBackprop

X = torch.randn(4096, 20, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def build(mixed_precision: str = "no"):
    set_seed(0)  # the global RNGs: the model's init and the loader's shuffle
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)  # cpu=True: drop it to use a GPU
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(X, Y, torch.arange(len(X))), batch_size=128, shuffle=True)  # + indices
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sb = SelectiveBackprop(model, batch_size=128, beta=2, staleness=2, dataset_size=len(X))  # 1: on the prepared model
    accelerator.register_for_checkpointing(sb)  # 2: its state goes into save_state / load_state
    return accelerator, model, optimizer, loader, sb


def train(accelerator, model, optimizer, loader, sb, epochs):
    for epoch in epochs:
        for batch in sb.iterate(loader):  # 3: was `for x, y in loader:`
            loss = batch.loss(model(batch.inputs))  # 4: was `loss = F.cross_entropy(model(x), y)`
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()


if __name__ == "__main__":
    precision = "bf16" if "--bf16" in sys.argv else "no"
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    folder = folders[0] if folders else tempfile.mkdtemp()

    accelerator, model, optimizer, loader, sb = build(precision)
    train(accelerator, model, optimizer, loader, sb, range(3))
    accelerator.save_state(folder)  # model, optimizer, RNGs, the selector
    train(accelerator, model, optimizer, loader, sb, range(3, 5))  # the uninterrupted run

    accelerator2, model2, optimizer2, loader2, sb2 = build(precision)
    accelerator2.load_state(folder)
    train(accelerator2, model2, optimizer2, loader2, sb2, range(3, 5))

    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    c = sb.counters
    print(f"accuracy {accuracy:.3f}  steps {c['steps']:.0f}  backpropagated {c['backpropagated']:.0f} of "
          f"{c['seen']:.0f}  skipped {c['skipped_forwards']:.0f}")
    print(f"resumed run identical to the uninterrupted one: {same}")
    sys.exit(0 if same else 1)
