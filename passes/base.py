"""Passes: typed options, the registry, and the two ways to write one.

A pass maps a :class:`~slimfx.ir.Graph` to a graph.  The pass manager hands each pass its
own copy of the graph, so a pass may rewrite it in place and return whether it changed
anything (or a :class:`PassResult` with statistics).  Verification, rollback, timing and
printing belong to the manager, not to passes.

Write a pass as a function::

    @register_pass("my-pass", lossless=True)
    def my_pass(graph: Graph, options: MyOptions) -> bool: ...

or as a class deriving from :class:`Pass` and decorated with ``@register_pass("name")``.
Options are a dataclass; the same schema feeds the Python API, the textual pipeline
(``"my-pass{k=3}"``) and the CLI.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimfx.errors import PipelineError
from slimfx.ir import Graph

__all__ = [
    "NoOptions", "Pass", "PassResult", "register_pass", "get_pass", "list_passes",
    "make_options", "parse_value", "format_value",
]


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass returns: the new graph, whether it changed, and pass-specific stats."""

    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of passes.

    Class attributes
    ----------------
    name: the registered name used in pipelines.
    Options: a dataclass of typed options (``NoOptions`` by default).
    lossless: ``True`` if the output must match the input within ``atol`` (relative to the
        output's magnitude); a lossy pass only has its error reported.  A pass whose options
        decide it sets ``self.lossless`` in ``__init__``, the class attribute giving its
        default options' answer.
    lossy_when: for such a pass, the options that make it lossy (``slimfx passes`` shows it).
    atol: tolerance for lossless verification.
    requires: names of passes that must run earlier in the same pipeline.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    lossless: ClassVar[bool] = True
    lossy_when: ClassVar[str] = ""
    atol: ClassVar[float] = 1e-5
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None, **overrides: Any):
        if options is not None and overrides:
            raise PipelineError(f"pass '{self.name}': give an options object or keywords, not both")
        if options is None:
            options = make_options(type(self), overrides)
        elif not isinstance(options, self.Options):
            raise PipelineError(f"pass '{self.name}' takes {self.Options.__name__} options, "
                                f"got {type(options).__name__}")
        self.options = options

    def run(self, graph: Graph) -> PassResult | bool:  # pragma: no cover - abstract
        """Rewrite ``graph`` in place; return ``modified`` or a :class:`PassResult`."""
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __call__(self, graph: Graph) -> Graph:
        """Run this pass alone under a :class:`~slimfx.passes.PassManager` (verified)."""
        from .manager import PassManager
        return PassManager([self]).run(graph)

    def __repr__(self) -> str:
        opts = ",".join(f"{f.name}={format_value(getattr(self.options, f.name))}"
                        for f in dataclasses.fields(self.options))
        return f"{self.name}{{{opts}}}" if opts else self.name


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str, *, options: type | None = None, lossless: bool = True,
                  atol: float = 1e-5, requires: tuple[str, ...] = (), replace: bool = False):
    """Register a pass class or function under ``name`` (a decorator).

    A function ``fn(graph, options) -> bool | PassResult`` becomes a :class:`Pass`
    subclass (``fn.pass_class``; the function itself is returned unchanged); its options
    dataclass is ``options``, or the annotation of its second parameter.  Registering a taken name raises unless ``replace=True``.
    """
    if not name or any(c in name for c in ",{}= "):
        raise PipelineError(f"invalid pass name {name!r}: use letters, digits and '-'")

    def deco(obj):
        if name in _REGISTRY and not replace:
            raise PipelineError(f"a pass named '{name}' is already registered "
                                f"({_REGISTRY[name].__module__}); pass replace=True to override")
        if isinstance(obj, type) and issubclass(obj, Pass):
            cls = obj
            cls.name = name
            if options is not None:
                cls.Options = options
            for attr, val in (("lossless", lossless), ("atol", atol), ("requires", tuple(requires))):
                if attr not in cls.__dict__:  # the class body wins over decorator defaults
                    setattr(cls, attr, val)
        elif callable(obj):
            opts = options or _options_from_signature(obj) or NoOptions
            fn = obj

            def run(self, graph):
                return fn(graph, self.options) if _takes_options(fn) else fn(graph)

            cls = type(fn.__name__, (Pass,), {
                "name": name, "Options": opts, "lossless": lossless, "atol": atol,
                "requires": tuple(requires), "run": run, "__doc__": fn.__doc__,
                "__module__": fn.__module__})
        else:
            raise TypeError(f"register_pass expects a Pass subclass or a function, got {obj!r}")
        if not (dataclasses.is_dataclass(cls.Options) and isinstance(cls.Options, type)):
            raise PipelineError(f"pass '{name}': options must be a dataclass type")
        _REGISTRY[name] = cls
        if not isinstance(obj, type):
            obj.pass_class = cls  # the function stays callable; PassManager accepts it too
        return obj

    return deco


def _takes_options(fn) -> bool:
    return len(inspect.signature(fn).parameters) >= 2


def _options_from_signature(fn) -> type | None:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2:
        return None
    hints = typing.get_type_hints(fn)
    ann = hints.get(params[1].name)
    return ann if dataclasses.is_dataclass(ann) else None


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; a clear error suggests close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PipelineError(f"unknown pass '{name}'{hint} (known: {', '.join(sorted(_REGISTRY))})") from None


def list_passes() -> dict[str, type[Pass]]:
    """All registered passes by name."""
    return dict(sorted(_REGISTRY.items()))


# --------------------------------------------------------------------------- options
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()] if text.strip() else []


def format_value(value: Any) -> str:
    """Pipeline text for an option value (the inverse of :func:`parse_value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def parse_value(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` (a string from a pipeline, or a Python value) to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(a, value, where)
            except PipelineError as e:
                errors.append(str(e))
        raise PipelineError(errors[0] if len(errors) == 1 else
                            f"{where}: {value!r} is none of {', '.join(_tname(a) for a in args)}")
    if origin is typing.Literal:
        if isinstance(value, str) and value not in args:
            for a in args:  # numeric literals written as text
                if str(a) == value:
                    return a
        if value not in args:
            raise PipelineError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        items = _split_list(value) if isinstance(value, str) else list(value)
        elem = args[0] if args else str
        out = [parse_value(elem, v, where) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise PipelineError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise PipelineError(f"{where}: expected {tp.__name__}, got {value!r}")
        if isinstance(value, (int, float)) and (tp is float or float(value).is_integer()):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise PipelineError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise PipelineError(f"{where}: expected text, got {value!r}")
    if isinstance(value, tp):
        return value
    raise PipelineError(f"{where}: cannot convert {value!r} to {_tname(tp)}")


def _tname(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def make_options(pass_cls: type[Pass], values: dict[str, Any]) -> Any:
    """Build ``pass_cls.Options`` from a dict of strings or Python values, checking each.

    Unknown keys, bad values and failed ``__post_init__`` checks raise
    :class:`~slimfx.errors.PipelineError` naming the pass and option.
    """
    opts_cls = pass_cls.Options
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    hints = typing.get_type_hints(opts_cls)
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(fields) or "none"
            raise PipelineError(f"pass '{pass_cls.name}' has no option '{key}'{hint} (options: {known})")
        kwargs[key] = parse_value(hints[key], raw, f"pass '{pass_cls.name}', option '{key}'")
    try:
        return opts_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"pass '{pass_cls.name}': {e}") from e


def options_help(pass_cls: type[Pass]) -> list[tuple[str, str, Any]]:
    """(name, type, default) of each option, for help texts."""
    hints = typing.get_type_hints(pass_cls.Options)
    rows = []
    for f in dataclasses.fields(pass_cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, _tname(hints[f.name]) if not typing.get_args(hints[f.name])
                     else str(hints[f.name]).replace("typing.", ""), default))
    return rows
