"""Sub-commands of `cinesr`, one module per area; each module registers its commands on cli.app at import."""

import importlib
import pkgutil


def load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
