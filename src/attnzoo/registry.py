"""Registries, one per kind of thing attnzoo offers: attention methods (``attnzoo.methods``), KV-cache
policies (``attnzoo.cache``) and nn.Module blocks (``attnzoo.modules``).

Each kind has one base class and one registry; ``@register`` on a subclass makes it reachable by
name, and every module under the kind's package is imported on first lookup, so adding one is
adding one file. Names are unique across kinds (``attnzoo list --kind ...`` and error messages
never have to say which ``snapkv`` they mean).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError, UnknownNameError
from .method import Method, MethodInfo


@dataclass(frozen=True)
class ComponentInfo:
    """The card of a registered KV-cache policy or module: its name, the paper (title, arXiv id),
    the SEED_MAP family and a one-line summary."""

    name: str
    title: str
    arxiv: str | None
    family: tuple[str, ...]
    summary: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Registry:
    """The registered classes of one kind, by ``cls.info.name``; ``package`` holds their files."""

    def __init__(self, kind: str, singular: str, package: str):
        self.kind, self.singular, self.package = kind, singular, package
        self.base: type | None = None  # set by the kind's package (its base class)
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: type) -> type:
        """Class decorator: register ``cls`` under ``cls.info.name``."""
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise InvalidArgumentError(f"@{self.kind} register", f"a subclass of {self.base.__name__}", repr(cls))
        name = cls.info.name
        for other in KINDS.values():
            owner = other._classes.get(name)
            if owner is not None and owner is not cls:
                raise ValueError(f"{self.singular} name {name!r} is already registered as a {other.singular} "
                                 f"({owner.__module__}; {cls.__module__} is the second); names are unique across kinds")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a throwaway class registered by a test or a notebook); no error if absent."""
        self._classes.pop(name, None)

    def load(self) -> None:
        """Import every module under the kind's package once (files starting with ``_`` excepted)."""
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not module.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(module.name)
        self._loaded = True

    def get(self, name: str) -> type:
        self.load()
        if not isinstance(name, str) or name not in self._classes:
            raise UnknownNameError(self.singular, str(name), self._classes)
        return self._classes[name]

    def create(self, name: str, **config: Any):
        """A new instance of the class registered as ``name``, built with ``config``."""
        return self.get(name)(**config)

    def names(self) -> list[str]:
        self.load()
        return sorted(self._classes)

    def infos(self) -> list[Any]:
        """Every registered class's ``info``, sorted by name."""
        return [self.get(name).info for name in self.names()]


METHODS = Registry("methods", "method", "attnzoo.methods")
METHODS.base = Method
CACHES = Registry("caches", "cache policy", "attnzoo.cache")
MODULES = Registry("modules", "module", "attnzoo.modules")
KINDS: dict[str, Registry] = {r.kind: r for r in (METHODS, CACHES, MODULES)}


def kind(name: str) -> Registry:
    """The registry of kind ``name`` (``methods``, ``caches`` or ``modules``)."""
    if name not in KINDS:
        raise UnknownNameError("kind", str(name), KINDS)
    return KINDS[name]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register an attention method under ``cls.info.name``."""
    return METHODS.register(cls)


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def get_method(name: str, **config: Any) -> Method:
    """Return the method registered as ``name``, configured with ``config``."""
    return METHODS.create(name, **config)


def as_method(method: str | Method, **config: Any) -> Method:
    """``method`` as a configured :class:`Method`: a registered name configured with ``config``, or a
    Method instance as it is (then no ``config``: it is configured already)."""
    if isinstance(method, str):
        return get_method(method, **config)
    if isinstance(method, Method):
        if config:
            raise InvalidArgumentError("config", "no method options with a configured Method (configure it with "
                                       "attnzoo.get_method)", sorted(config))
        return method
    raise InvalidArgumentError("method", "a registered method name or an attnzoo.Method", type(method).__name__)


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method's :class:`MethodInfo`, sorted by name (optionally one family)."""
    infos = METHODS.infos()
    if family is not None:
        infos = [i for i in infos if family in i.family]
    return infos
