"""The README's drop-in example runs verbatim and trains the model through Selective-Backprop."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return blocks[0]


def test_readme_example_trains_end_to_end():
    code = _first_python_block()
    assert "sb.iterate(loader)" in code and "batch.loss(model(batch.inputs))" in code
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), scope)
    import torch

    sb, model, X, Y = scope["sb"], scope["model"], scope["X"], scope["Y"]
    c = sb.counters
    n = len(X)
    assert c["seen"] == 6 * n
    assert c["backpropagated"] == c["selected"]
    # epoch 0 primed (all), epochs 1..5 selective: far fewer backprops than 6 epochs of SGD
    assert n < c["backpropagated"] < 0.7 * 6 * n
    # StaleSB n=3: scoring forwards only at epoch 3 (epochs 1, 2, 4, 5 reuse cached losses)
    assert c["selection_forwards"] == n and c["skipped_forwards"] == 4 * n
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    assert accuracy > 0.95


def test_readme_strategy_lines_construct_what_they_say():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    from torch import nn

    import selective_backprop as sb

    lines = [line.split("#")[0].strip() for line in blocks[1].splitlines()]
    calls = [line for line in lines if line and not line.startswith("from ")]
    scope: dict = {"model": nn.Linear(3, 2), **{name: getattr(sb, name) for name in sb.__all__}}
    built = [eval(call, scope) for call in calls]  # each line of the block is one constructor call
    assert [type(b).__name__ for b in built] == ["SelectiveBackprop"] * 4 + ["Kath18"]
    assert [type(b.policy).__name__ for b in built[:4]] == ["Traditional", "UniformPolicy", "ThresholdPolicy",
                                                             "ClampPolicy"]  # fmt: skip
    assert built[1].policy.rate == 0.25 and built[2].policy.threshold == 1.0 and built[4].pool_size == 3 * 128


def _section_block(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"### {title}\n") :]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def _code(line: str) -> str:
    return " ".join(line.split("#")[0].split())


@pytest.mark.parametrize("title,example", [
    ("PyTorch Lightning", "lightning_module.py"),
    ("Hugging Face Accelerate", "accelerate_loop.py"),
    ("Hugging Face Trainer", "hf_trainer.py"),
])  # fmt: skip
def test_each_integrations_added_lines_are_the_examples_own(title, example):
    """The lines the README marks as added (``# +``) are in the example that make test runs, as written: the
    user-facing code is as short as the README says."""
    added = [_code(line) for line in _section_block(title).splitlines() if "# +" in line]
    source = {_code(line) for line in (README.parent / "examples" / example).read_text().splitlines()}
    assert len(added) >= 3
    missing = [line for line in added if line not in source]
    assert not missing, f"README lines not in examples/{example}: {missing}"
