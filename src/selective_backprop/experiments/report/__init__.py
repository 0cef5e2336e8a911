"""A Markdown + HTML report of a ``compare`` folder, computed only from the runs' own logs.

:func:`write_report` reads every run subfolder of ``run_dir`` (``config.json``, ``environment.json``,
``metrics.jsonl``, ``selection_counts.npy``, ``train_confidence.npy``, ``noisy_indices.npy``; see
:mod:`selective_backprop.experiments.runfolder`), groups runs by label (the run name without its ``-s<seed>``
suffix, e.g. ``sb-b3-s1`` -> ``sb-b3``) and writes into ``run_dir``:

* ``report.md`` -- time to 1.1x / 1.2x / 1.4x Traditional's final error by wall-clock time, backprops and
  forwards with speedups and 95 % confidence intervals over seeds; error curves; the Pareto front of
  (training time, final error); StaleSB's savings; which examples SB backpropagates (selection histograms,
  image galleries, the paper's hard-set measure); label-noise robustness; the paper's claims next to ours;
  the environment.
* ``report.html`` -- the same content in one file (figures embedded as base64 ``data:`` URIs).
* ``figures/*.png`` -- the figures, referenced by ``report.md``.
* ``summary.csv`` -- one row per label.

Every file is written atomically (a temporary file, then ``os.replace``). matplotlib and scipy are needed
(``pip install 'selective-backprop[experiments]'``); the library never imports this package.

Modules: :mod:`.runs` (the data model), :mod:`.document` (Markdown/HTML blocks, formatting), :mod:`.sections`
(sections 0-4), :mod:`.examples` (5-6), :mod:`.summary` (``summary.csv``), :mod:`.build` (7-8 and
:func:`write_report`).
"""

from __future__ import annotations

from ..analysis import TARGETS
from .build import write_report
from .runs import CONFIDENT, HARD_FRACTION, Run, load_runs

__all__ = ["Run", "load_runs", "write_report", "TARGETS", "HARD_FRACTION", "CONFIDENT"]
