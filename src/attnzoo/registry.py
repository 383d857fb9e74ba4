"""The method registry: ``@register`` on a :class:`~attnzoo.method.Method` subclass makes it reachable by name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .errors import UnknownNameError
from .method import Method, MethodInfo

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.info.name``."""
    name = cls.info.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    """Import every module of ``attnzoo.methods`` once: adding a method is adding a file."""
    global _loaded
    if _loaded:
        return
    from . import methods

    for module in pkgutil.iter_modules(methods.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{module.name}")
    _loaded = True


def method_class(name: str) -> type[Method]:
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError("method", str(name), _REGISTRY)
    return _REGISTRY[name]


def get_method(name: str, **config: Any) -> Method:
    """Return the method registered as ``name``, configured with ``config``."""
    return method_class(name)(**config)


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method's :class:`MethodInfo`, sorted by name (optionally one family)."""
    _load_all()
    infos = [cls.info for cls in _REGISTRY.values()]
    if family is not None:
        infos = [i for i in infos if family in i.family]
    return sorted(infos, key=lambda i: i.name)
