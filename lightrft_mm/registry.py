"""One generic name -> object registry for rewards, adapters, datasets, strategies and engines."""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RegistryError

_FILE_MODULE_PREFIX = "_lightrft_mm_file_"
_LAZY = object()  # stands for the object of a lazy registration
# Passed through when plugin code is imported; anything else it raises (sys.exit() included)
# becomes a RegistryError naming the plugin.
_INTERRUPTS = (KeyboardInterrupt, GeneratorExit)


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
            except _INTERRUPTS:
                raise
            except BaseException as exc:  # noqa: BLE001 - sys.exit() in plugin code too
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

    def is_registered(self, name: str) -> bool:
        """True for a name registered in this process (decorator or lazy), not an entry point."""
        return isinstance(name, str) and normalize_name(name) in self._origins

    def locate(self, spec: str) -> str:
        """Checks what ``get(spec)`` would resolve, without running any plugin code.

        A registered name is known already. ``"file.py:fn"``: the file exists, is valid Python
        and binds ``fn`` at its top level (a def, class, assignment or import). ``"package.module:attr"``:
        the module is found (its parent packages are located on their paths, not imported) and,
        when it is Python source, binds ``attr``. An entry point name: an installed distribution
        declares it, and its module is found the same way.

        Returns:
            What ``spec`` is: ``"registered"``, ``"file"``, ``"module"`` or ``"entry point"``.

        Raises:
            RegistryError: What can be told without importing is wrong (the message names the
                file or module and the fix).
        """
        if not isinstance(spec, str):
            raise RegistryError(f"a {self.kind} is named by a string, got {spec!r}")
        key = normalize_name(spec)
        if key in self._origins:
            return "registered"
        if ".py:" in spec:
            path_text, _, attr = spec.rpartition(":")
            path = Path(path_text).expanduser().absolute()
            if not path.is_file():
                raise RegistryError(f"{self.kind} file not found: {path_text!r} (looked at {path}); "
                                    f"relative paths are taken from the working directory")
            self._check_source(path, attr, spec, f"{path_text!r} ({path})")
            return "file"
        if ":" in spec:
            module_name, _, attr = spec.partition(":")
            if not module_name or not attr:
                raise RegistryError(f"{self.kind} spec {spec!r} must look like 'package.module:attr'")
            self._check_module(module_name, attr, spec)
            return "module"
        found = self._entry_points().get(key, [])
        if len(found) > 1:
            raise RegistryError(f"{self.kind} {key!r} is ambiguous: entry points "
                                f"{' and '.join(self._ep_origin(ep) for ep in found)}; "
                                f"uninstall one of the packages")
        if not found:
            raise RegistryError(self._unknown_message(spec))
        self._check_module(found[0].module, found[0].attr, f"{key!r} ({self._ep_origin(found[0])})")
        return "entry point"

    def _check_module(self, module_name: str, attr: str | None, target: str) -> None:
        try:
            module_spec = _find_spec(module_name)
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"{self.kind} target {target!r}: {exc}") from None
        if module_spec is None:
            raise RegistryError(f"{self.kind} target {target!r}: no module named {module_name!r} on the "
                                "import path (located without importing). Fix: install the package that "
                                "provides it, or run from the folder that holds it")
        origin = module_spec.origin
        if attr and isinstance(module_spec.loader, importlib.machinery.SourceFileLoader) and origin:
            self._check_source(Path(origin), attr, target, f"module {module_name!r} ({origin})")

    def _check_source(self, path: Path, attr: str, target: str, what: str) -> None:
        """Reads (does not run) the Python file: it parses and binds the first part of ``attr``."""
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except OSError as exc:
            raise RegistryError(f"{self.kind} {what}: cannot be read: {exc}") from None
        except (SyntaxError, ValueError) as exc:
            line = f"line {exc.lineno}: " if getattr(exc, "lineno", None) else ""
            raise RegistryError(f"{self.kind} {what} is not valid Python: {line}{getattr(exc, 'msg', exc)}. "
                                "Fix: the syntax error") from None
        names = _bound_names(tree)
        if names is None or attr.split(".")[0] in names:
            return
        offers = ", ".join(sorted(n for n in names if not n.startswith("_"))) or "(none)"
        raise RegistryError(f"{target!r}: {what} defines no top-level function, class or variable "
                            f"{attr.split('.')[0]!r}; it defines: {offers}. Fix: name one of them after "
                            "the ':' (or, if the name is made while the module runs, check by importing "
                            "it: lightrft-mm validate --import-plugins)")

    def _import_target(self, target: str) -> Any:
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise RegistryError(f"{self.kind} spec {target!r} must look like 'package.module:attr'")
        try:
            module = importlib.import_module(module_name)
        except _INTERRUPTS:
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in plugin code too
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
        except _INTERRUPTS:
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in plugin code too
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
            except BaseException as exc:
                del sys.modules[module_name]
                if isinstance(exc, _INTERRUPTS):
                    raise
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


def _find_spec(name: str) -> Any:
    """The import spec of module ``name``, or None; no module code runs (parent packages are
    located on their ``__path__``, not imported, unless they are imported already)."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None) or importlib.machinery.ModuleSpec(name, None)
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)  # a top-level name: the finders look, nothing runs
    parent_spec = _find_spec(parent)
    if parent_spec is None:
        return None
    if parent in sys.modules:
        return importlib.util.find_spec(name)  # the parent's code ran already; this runs no more
    locations = parent_spec.submodule_search_locations
    if locations is None:
        raise ImportError(f"{parent!r} is a module, not a package, so it has no submodule {name!r}")
    return importlib.machinery.PathFinder.find_spec(name, list(locations))


def _stored(*targets: ast.AST) -> set[str]:
    """The plain names an assignment's targets bind (``a, b = ...``; not ``a.x = ...``)."""
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


_BLOCKS = (ast.If, ast.Try, getattr(ast, "TryStar", ast.Try), ast.With, ast.For, ast.While)


def _bound_names(tree: ast.Module) -> set[str] | None:
    """The names a module's top level binds, or None where that cannot be told from the source
    (``from x import *`` or a module ``__getattr__``)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        return False
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(_stored(*targets))
            elif isinstance(node, _BLOCKS):
                if isinstance(node, ast.For):
                    names.update(_stored(node.target))
                blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
                blocks += [h.body for h in getattr(node, "handlers", [])]
                if not all(visit(block) for block in blocks):
                    return False
        return True

    if not visit(tree.body) or "__getattr__" in names:
        return None
    return names
