"""Progress output: a tqdm bar only on a terminal; in a log (nohup, CI) one line per epoch and a few in between."""

from __future__ import annotations

import hashlib
import io
import re

from selective_backprop.experiments import progress
from selective_backprop.experiments.cli import main
from selective_backprop.experiments.data import download

NOT_QUIET = ["--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--threads", "2", "--strategy", "sb"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class ClosedStream(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_the_bar_is_drawn_only_on_a_terminal():
    assert progress.shows_bar(True, FakeTerminal())
    assert not progress.shows_bar(True, io.StringIO()) and not progress.shows_bar(True, ClosedStream())
    assert not progress.shows_bar(True, object()) and not progress.shows_bar(False, FakeTerminal())


def test_open_bar_gives_tqdm_on_a_terminal_and_lines_elsewhere():
    terminal = FakeTerminal()
    bar = progress.open_bar(True, "sb epoch 1/3", total=512, done=0, stream=terminal)
    bar.update(256)
    bar.close()
    assert "\r" in terminal.getvalue() and "sb epoch 1/3" in terminal.getvalue()
    assert isinstance(progress.open_bar(True, "sb epoch 1/3", 512, 0, stream=io.StringIO()), progress.LineProgress)
    assert progress.open_bar(False, "sb epoch 1/3", 512, 0, stream=FakeTerminal()) is None


def test_line_progress_writes_at_most_one_line_per_interval():
    now, out = [0.0], io.StringIO()
    lines = progress.LineProgress("sb epoch 2/8", total=6000, done=1000, out=out, interval_s=30, clock=lambda: now[0])
    lines.set_postfix(err="0.1234")
    for _ in range(50):  # 50 loader batches, 2 s apart: 100 s
        now[0] += 2.0
        lines.update(100)
    lines.close()
    written = out.getvalue().splitlines()
    assert written == [
        "sb epoch 2/8: 2500/6000 examples (42%), 30 s, 50 ex/s, err 0.1234",
        "sb epoch 2/8: 4000/6000 examples (67%), 60 s, 50 ex/s, err 0.1234",
        "sb epoch 2/8: 5500/6000 examples (92%), 90 s, 50 ex/s, err 0.1234",
    ]
    assert "\r" not in out.getvalue()


def test_a_run_whose_output_is_not_a_terminal_logs_one_line_per_epoch(tiny_fmnist, tmp_path, capsys):
    assert main(["train", "--data-dir", str(tiny_fmnist), "--out", str(tmp_path / "run"), *NOT_QUIET]) == 0
    captured = capsys.readouterr()  # captured streams: not terminals
    text = captured.out + captured.err
    assert "\r" not in text
    epochs = re.findall(r"^\[sb\] epoch (\d+)/3  test error", text, flags=re.MULTILINE)
    assert epochs == ["1", "2", "3"]


def test_a_download_in_a_log_is_one_line(tmp_path, capsys):
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * (3 << 20))
    download(source.as_uri(), tmp_path / "dest.bin", hashlib.md5(source.read_bytes()).hexdigest())
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and f"to {tmp_path / 'dest.bin'}" in err
