"""The suite's pytest plug-in lives in properties/pytest_plugin.py (--impl, the scorecard, CUDA cases, the
Hypothesis profiles); the package registers it under the ``pytest11`` entry point ``transformer_spec``
(``pip install -e .``), so that ``pytest --impl /anywhere/model.py`` works from any directory.

This file only registers the plug-in when the entry point did not (the package is not installed, or
PYTEST_DISABLE_PLUGIN_AUTOLOAD is set): a plain ``pytest -n auto`` in this repository works either way.
"""

import sys

if "properties.pytest_plugin" not in sys.modules:
    pytest_plugins = ["properties.pytest_plugin"]
