"""Package namespaces that import their modules on first use (`clapcli.audio`, `clapcli.tagging`), so that
`import clapcli.tagging` for one constant does not pull in numpy or torch."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The module `__getattr__` and `__dir__` of `package` whose public names live in its modules:
    `exports` maps each name to its module; a name is imported on first access and kept in `namespace`."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
