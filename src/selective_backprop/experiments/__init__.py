"""The lab: the experiment harness around the library -- datasets, models, the trainer, the report and the
command line (``selective-backprop train|compare|report``).

It needs the ``[experiments]`` extra (``pip install 'selective-backprop[experiments]'``: tqdm, matplotlib, scipy)
and makes no stability promise; the library (:mod:`selective_backprop`) never imports it.

Modules: :mod:`.config` (``TrainConfig``, the LR schedule), :mod:`.strategies` (the registry), :mod:`.setup` (builds
a run's parts), :mod:`.calibrate` (F, T, beta for a target time), :mod:`.trainer`, :mod:`.meters`,
:mod:`.evaluation`, :mod:`.runfolder` (atomic files, checkpoint envelope), :mod:`.checkpoints` (resume),
:mod:`.errors` (+ exit codes), :mod:`.progress`, :mod:`.data`, :mod:`.models`, :mod:`.analysis` (time to target and
the paper's measures), :mod:`.report`, :mod:`.cli`.
"""
