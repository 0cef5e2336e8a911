"""Selective-Backprop with the Hugging Face Trainer: a tiny BERT-like classifier built from a config (nothing is
downloaded), synthetic token data, CPU, a few seconds. Needs ``pip install 'selective-backprop[hf]'``.

Run: python examples/hf_trainer.py [output folder]
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from selective_backprop.integrations.transformers import SelectiveBackpropTrainer  # noqa: E402

# Synthetic "sentences" of 16 tokens: the label says whether token 7 occurs among the first eight.
g = torch.Generator().manual_seed(0)
ids = torch.randint(10, 100, (2048, 16), generator=g)
ids[torch.rand(2048, generator=g) < 0.5, torch.randint(0, 8, (1,), generator=g)] = 7
train_set = [{"input_ids": x, "attention_mask": torch.ones(16, dtype=torch.long), "labels": int((x[:8] == 7).any())}
             for x in ids]  # fmt: skip

torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
model = BertForSequenceClassification(config)
args = TrainingArguments(output_dir=sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), num_train_epochs=4,
                         per_device_train_batch_size=64, learning_rate=3e-3, lr_scheduler_type="constant",
                         logging_steps=32, save_strategy="epoch", report_to=[], use_cpu=True, seed=0,
                         disable_tqdm=True)  # fmt: skip
trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=train_set,  # was Trainer(
                                   selector_kwargs=dict(beta=2))  # + the selector's arguments
trainer.train()

model.eval()
with torch.no_grad():
    accuracy = (model(input_ids=ids).logits.argmax(1) == torch.tensor([e["labels"] for e in train_set])).float()
c = trainer.selector.counters
print(f"accuracy {accuracy.mean().item():.3f}  steps {c['steps']:.0f}  loader batches {trainer.state.global_step}  "
      f"backpropagated {c['backpropagated']:.0f} of {c['seen']:.0f}")
