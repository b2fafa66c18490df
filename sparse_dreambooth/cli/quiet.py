"""Only our progress bars and messages on the command line.

diffusers' and transformers' own bars ("Loading pipeline components", "Loading weights", "Writing
model shards") go, and so do transformers' notes about optional backends we never use
(torchvision); diffusers' warnings and Hub download bars stay.

For the command line only: importing the package changes no one's logging. The bar switches live in
the libraries' logging modules, and importing diffusers imports torch, which `sparse-db --help` must
not; so each switch is flipped as its module loads.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_LIBRARY_LOGGING = ("diffusers.utils.logging", "transformers.utils.logging")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `actions[name](module)` right after module `name` is first imported, then steps aside."""

    def __init__(self, actions: dict) -> None:
        self.actions = dict(actions)

    def find_spec(self, name, path, target=None):
        if name not in self.actions:
            return None
        action = self.actions.pop(name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def load_then_act(module) -> None:
                load(module)
                action(module)

            spec.loader.exec_module = load_then_act
        return spec


def silence_third_party_output() -> None:
    """Turn the libraries' bars off as they load; a TRANSFORMERS_VERBOSITY set by the user wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bars_off = {name: lambda logging: logging.disable_progress_bar() for name in _LIBRARY_LOGGING}
    sys.meta_path.insert(0, _AfterImport(bars_off))
