"""Collection for the whole repository (pytest runs doctests over src/): an integration's module is collected only
when its framework is installed, so the suite still runs without the extra (``pip install -e '.[lightning]'``)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("lightning") else ["src/selective_backprop/integrations/lightning.py"]
