"""Collection for the whole repository (pytest runs doctests over src/): an integration's module is collected only
when its framework is installed, so the suite still runs without the extra (``pip install -e '.[lightning]'``,
``'.[hf]'``)."""

import importlib.util

INTEGRATIONS = {"lightning": "lightning", "transformers": "transformers"}  # module -> the package it needs
collect_ignore = [f"src/selective_backprop/integrations/{module}.py" for module, package in INTEGRATIONS.items()
                  if importlib.util.find_spec(package) is None]  # fmt: skip
