"""Selective-Backprop in a PyTorch Lightning module: the callback, manual optimization and a five-line
training_step (changed lines marked), synthetic data, CPU, a few seconds. Needs the extra:
``pip install 'selective-backprop[lightning]'``.

Run: python examples/lightning_module.py  (not lightning.py: a script named so would shadow the package)
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selective_backprop.integrations.lightning import SelectiveBackpropCallback, selected_batches


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
        self.automatic_optimization = False  # 1: SB decides when the optimizer steps

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):  # batch: (inputs, targets, indices)
        optimizer = self.optimizers()
        for selected in selected_batches(self, batch):  # 2: 0, 1 or more training batches per loader batch
            loss = selected.loss(selected.forward(self))  # 3: was `loss = F.cross_entropy(self(x), y)`
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def validation_step(self, batch, batch_idx):  # validation sees every example: nothing is selected here
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


if __name__ == "__main__":
    torch.manual_seed(0)
    X = torch.randn(4096, 20)
    Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    data = TensorDataset(X, Y, torch.arange(len(X)))
    train = DataLoader(data, batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(X[:1024], Y[:1024], torch.arange(1024)), batch_size=512)
    model = Classifier()
    sb = SelectiveBackpropCallback(batch_size=128, beta=2)  # 4: the selector, built on the module at fit start
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", devices=1, callbacks=[sb], logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, train, val)

    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    c, logged = sb.selector.counters, trainer.callback_metrics["sb/seen"]  # counters are logged as sb/<name>
    print(f"accuracy {accuracy:.3f}  steps {trainer.global_step}  "
          f"backpropagated {c['backpropagated']:.0f} of {c['seen']:.0f}  logged {logged:.0f}")
