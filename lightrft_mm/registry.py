"""One generic name -> object registry for rewards, adapters, datasets, strategies and engines."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RegistryError

_FILE_MODULE_PREFIX = "_lightrft_mm_file_"
_LAZY = object()  # stands for the object of a lazy registration


def normalize_name(name: str) -> str:
    """Returns the canonical form of a registry name: stripped, lower case, ``-`` -> ``_``."""
    return name.strip().lower().replace("-", "_")


def _origin_of(obj: Any) -> str:
    """Says where an object was defined: ``"module:qualname"``, or ``"file.py:qualname"``."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if module.startswith(_FILE_MODULE_PREFIX):  # loaded from a file by ``get``
        module = getattr(sys.modules.get(module), "__file__", None) or module
    return f"{module}:{qualname}"


def _get_attr(module: Any, attr: str, target: str) -> Any:
    """Follows a dotted attribute path in a module, or lists the public callables it defines."""
    obj = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        offers = ", ".join(sorted(
            key for key, value in vars(module).items() if not key.startswith("_")
            and callable(value) and getattr(value, "__module__", None) == module.__name__
        )) or "(none)"
        where = module.__name__
        if where.startswith(_FILE_MODULE_PREFIX):  # loaded from a file: name the file
            where = getattr(module, "__file__", None) or where
        raise RegistryError(f"{target!r}: {where!r} has no attribute {attr!r}; "
                            f"its public callables are: {offers}") from None
    return obj


class Registry:
    """A registry of named objects of one kind (``"reward"``, ``"strategy"``, ...).

    Entries come from a decorator, a lazy ``"package.module:attr"`` string (imported on first
    ``get``, so heavy optional dependencies stay unimported) or an installed package's entry
    point. Names are case-insensitive and ``-`` equals ``_``.

    Args:
        kind: What the registry holds, used in messages.
        entry_point_group: Installed packages may add entries through this entry point group.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._origins: dict[str, str] = {}  # normalised name -> origin (a lazy entry's target)
        self._objects: dict[str, Any] = {}  # normalised name -> object; absent while lazy

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._origins)} registered)"

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = normalize_name(name)
        return key in self._origins or key in self._entry_points()

    def register(self, name: str | Callable | None = None, *, obj: Any = None) -> Any:
        """Registers an object, directly or as a decorator.

        ``@REG.register("name")``, ``@REG.register()`` / ``@REG.register`` (the name is then the
        object's ``__name__``) or ``REG.register("name", obj=thing)``.

        Returns:
            The object (without ``obj``: a decorator that returns its argument).

        Raises:
            RegistryError: The name is taken by another object (the message names both origins).
        """
        if callable(name) and not isinstance(name, str) and obj is None:  # bare @REG.register
            return self.register(obj=name)
        if obj is None:
            return lambda target: self.register(name, obj=target)
        if name is None:
            name = getattr(obj, "__name__", None)
            if name is None:
                raise RegistryError(f"cannot register {obj!r} as a {self.kind} without a name; "
                                    f"pass one: register('name', obj=...)")
        self._add(name, _origin_of(obj), obj)
        self._objects[normalize_name(name)] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Registers ``"package.module:attr"``, imported only on the first ``get`` of ``name``.

        Raises:
            RegistryError: ``target`` is malformed, or the name is taken.
        """
        module, _, attr = target.partition(":")
        if not module or not attr or ".py:" in target:
            raise RegistryError(f"lazy {self.kind} target {target!r} for {name!r} must look like "
                                f"'package.module:attr'")
        self._add(name, target, _LAZY)
        self._objects.pop(normalize_name(name), None)

    def _add(self, name: str, origin: str, obj: Any) -> None:
        if not isinstance(name, str) or not normalize_name(name) or ":" in name:
            raise RegistryError(f"invalid {self.kind} name {name!r}: use a non-empty string "
                                f"without ':' (':' marks 'module:attr' and 'file.py:fn' specs)")
        key = normalize_name(name)
        previous = self._origins.get(key)
        # Allowed again: the same object, the same lazy target, or a lazy target's module that
        # registers that target itself while ``get`` imports it. Not two lambdas of one module.
        same = previous == origin and (obj is _LAZY or self._objects.get(key, obj) is obj)
        if previous is not None and not same:
            raise RegistryError(f"duplicate {self.kind} name {key!r}: already registered from "
                                f"{previous}, registered again from {origin}; pick another name")
        self._origins[key] = origin

    def get(self, spec: str) -> Any:
        """Resolves a registered name, ``"file.py:fn"``, ``"package.module:attr"`` or entry point.

        Args:
            spec: Tried in this order: a registered name; ``"path/to/file.py:function"``
                (relative to the working directory); ``"package.module:attr"``; an entry point
                name of ``entry_point_group``.

        Raises:
            RegistryError: Unknown name (with the closest names and how to register one), a
                missing file or attribute, or a target that fails to import.
        """
        if not isinstance(spec, str):
            raise RegistryError(f"a {self.kind} is named by a string, got {spec!r}")
        key = normalize_name(spec)
        if key in self._origins:
            if key not in self._objects:  # lazy; its import may register the object itself
                self._objects.setdefault(key, self._import_target(self._origins[key]))
            return self._objects[key]
        if ".py:" in spec:
            return self._load_file(spec)
        if ":" in spec:
            return self._import_target(spec)
        found = self._entry_points().get(key, [])
        if len(found) > 1:
            raise RegistryError(f"{self.kind} {key!r} is ambiguous: entry points "
                                f"{' and '.join(self._ep_origin(ep) for ep in found)}; "
                                f"uninstall one of the packages")
        if found:
            try:
                return found[0].load()
            except Exception as exc:
                raise RegistryError(f"{self.kind} {key!r} from {self._ep_origin(found[0])} failed "
                                    f"to load: {type(exc).__name__}: {exc}") from exc
        raise RegistryError(self._unknown_message(spec))

    def names(self) -> list[str]:
        """Returns every known name (registered and entry points), normalised and sorted."""
        return sorted(set(self._origins) | set(self._entry_points()))

    def origin(self, name: str) -> str:
        """Says where ``name`` comes from, importing nothing; RegistryError if it is unknown."""
        key = normalize_name(name)
        if key in self._origins:
            return self._origins[key]
        found = self._entry_points().get(key)
        if found:
            return " and ".join(self._ep_origin(ep) for ep in found)
        raise RegistryError(self._unknown_message(name))

    def items(self) -> Iterator[tuple[str, str]]:
        """Yields ``(name, origin)`` for every known name, sorted, importing nothing."""
        for name in self.names():
            yield name, self.origin(name)

    def _import_target(self, target: str) -> Any:
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise RegistryError(f"{self.kind} spec {target!r} must look like 'package.module:attr'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise RegistryError(f"{self.kind} target {target!r} failed to import: "
                                f"{type(exc).__name__}: {exc}") from exc
        return _get_attr(module, attr, target)

    def import_plugin(self, spec: str) -> Any:
        """Imports ``"path/to/file.py"`` or ``"package.module"`` so that the entries it registers
        with decorators exist; returns the module.

        Raises:
            RegistryError: The file does not exist, or the file or module fails to import.
        """
        if spec.endswith(".py"):
            return self._import_file(spec)
        try:
            return importlib.import_module(spec)
        except Exception as exc:
            raise RegistryError(f"{self.kind} plugin module {spec!r} failed to import: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _load_file(self, spec: str) -> Any:
        path_text, _, attr = spec.rpartition(":")
        return _get_attr(self._import_file(path_text), attr, spec)

    def _import_file(self, path_text: str) -> Any:
        path = Path(path_text).expanduser().absolute()
        if not path.is_file():
            raise RegistryError(f"{self.kind} file not found: {path_text!r} (looked at {path}); "
                                f"relative paths are taken from the working directory")
        # One module per file (a hash of its path), so loading it twice reuses the first import.
        module_name = _FILE_MODULE_PREFIX + hashlib.sha1(str(path).encode()).hexdigest()[:16]
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look the module up here
            try:
                module_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise RegistryError(f"{self.kind} file {path_text!r} ({path}) failed to import: "
                                    f"{type(exc).__name__}: {exc}") from exc
        return module

    def _entry_points(self) -> dict[str, list[Any]]:
        if not self.entry_point_group:
            return {}
        found: dict[str, list[Any]] = {}
        for ep in metadata.entry_points(group=self.entry_point_group):
            found.setdefault(normalize_name(ep.name), []).append(ep)
        return found

    @staticmethod
    def _ep_origin(ep: Any) -> str:
        dist = getattr(ep, "dist", None)
        return f"entry point {dist.name if dist else '(unknown distribution)'} {ep.value}"

    def _unknown_message(self, spec: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(normalize_name(spec), names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        text = (f"unknown {self.kind} {spec!r}{hint}\n"
                f"registered {self.kind} names: {', '.join(names) or '(none)'}\n"
                f"to add a {self.kind}: decorate it with @<registry>.register(\"name\") in a "
                f"module that is imported, or name it as 'package.module:attr' or "
                f"'path/to/file.py:function'")
        group = self.entry_point_group
        if group:
            text += (f"\nor, from an installed package, declare an entry point in group {group!r} "
                     f"([project.entry-points.\"{group}\"] name = \"package.module:attr\")")
        return text
