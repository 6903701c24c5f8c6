"""A safe parser for schedule specs such as ``"warmup(cosine(start=0.1, steps=900), steps=100)"``.

The spec is parsed with :func:`ast.parse` in ``eval`` mode and the tree is walked by hand. Only these nodes
are
allowed: calls to known constructor names (positional and keyword arguments, no ``*``/``**``), number, string,
boolean and ``None`` literals, lists and tuples of those, unary minus/plus on a number, and ``*`` between a
number and a schedule (or two numbers). Nothing is ever passed to :func:`eval`, attribute access is
impossible, and the spec length and nesting depth are bounded.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from lrbs.errors import ConfigError, LrbsError, unknown_name

MAX_SPEC_LENGTH = 10_000
MAX_DEPTH = 32


def parse_spec(spec: str, constructors: Mapping[str, Callable[..., Any]], result_type: type) -> Any:
    """Build the object a spec describes, calling only ``constructors``.

    Args:
        spec: The text, e.g. ``"0.5 * cosine(start=0.1, steps=100)"``.
        constructors: The allowed call names and the functions they map to.
        result_type: The type the whole spec must evaluate to; also the only non-number operand ``*`` accepts.

    Returns:
        The constructed object, an instance of ``result_type``.

    Raises:
        LrbsTypeError: If ``spec`` is not a string.
        ConfigError: If the spec is not valid Python, uses anything outside the allowed subset, names an
            unknown constructor (the closest known name is suggested), passes arguments the constructor
            rejects, or does not describe a ``result_type``.
    """
    from lrbs.errors import LrbsTypeError

    if not isinstance(spec, str):
        raise LrbsTypeError(
            f"spec={spec!r} is not allowed: must be a string such as 'cosine(start=0.1, steps=100)'"
        )
    if len(spec) > MAX_SPEC_LENGTH:
        raise ConfigError(f"spec of {len(spec)} characters is not allowed: must be at most {MAX_SPEC_LENGTH}")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"spec={spec!r} is not a valid schedule expression: {exc.msg}") from None
    value = _Walker(spec, constructors, result_type).visit(tree.body, 0)
    if not isinstance(value, result_type):
        raise ConfigError(
            f"spec={spec!r} is not allowed: must describe a schedule (a call such as 'cosine(...)'), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Walker:
    def __init__(self, spec: str, constructors: Mapping[str, Callable[..., Any]], result_type: type) -> None:
        self.spec = spec
        self.constructors = constructors
        self.result_type = result_type

    def fail(self, node: ast.AST, what: str) -> ConfigError:
        col = getattr(node, "col_offset", None)
        where = f" at column {col + 1}" if col is not None else ""
        return ConfigError(
            f"spec={self.spec!r}: {what}{where} is not allowed. A spec may only contain calls to known "
            f"schedules ({', '.join(sorted(self.constructors))}), numbers, strings, lists, unary minus, "
            "and '*' by a number"
        )

    def visit(self, node: ast.AST, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ConfigError(f"spec={self.spec[:60]!r}...: nesting deeper than {MAX_DEPTH} is not allowed")
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, (bool, int, float, str)):
                return node.value
            raise self.fail(node, f"the literal {node.value!r}")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.visit(elt, depth + 1) for elt in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return self.unary(node, depth)
        if isinstance(node, ast.BinOp):
            return self.product(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.Name):
            if node.id in self.constructors:
                raise ConfigError(f"spec={self.spec!r}: {node.id!r} must be called, e.g. '{node.id}(...)'")
            raise unknown_name("schedule", node.id, self.constructors)
        raise self.fail(node, f"the expression {type(node).__name__}")

    def unary(self, node: ast.UnaryOp, depth: int) -> Any:
        """``-x`` / ``+x`` of a number."""
        operand = self.visit(node.operand, depth + 1)
        if not _is_number(operand):
            raise self.fail(node, f"a unary sign on {type(operand).__name__}")
        return -operand if isinstance(node.op, ast.USub) else operand

    def product(self, node: ast.BinOp, depth: int) -> Any:
        """``a * b`` where at least one side is a number and the other a number or a schedule."""
        if not isinstance(node.op, ast.Mult):
            raise self.fail(node, f"the operator {type(node.op).__name__}")
        left, right = self.visit(node.left, depth + 1), self.visit(node.right, depth + 1)
        if not (_is_number(left) or _is_number(right)):
            raise self.fail(node, "'*' between two non-numbers")
        for side in (left, right):
            if not (_is_number(side) or isinstance(side, self.result_type)):
                raise self.fail(node, f"'*' with a {type(side).__name__}")
        return left * right

    def call(self, node: ast.Call, depth: int) -> Any:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "a call to something other than a plain schedule name")
        name = node.func.id
        if name not in self.constructors:
            raise unknown_name("schedule", name, self.constructors)
        fn = self.constructors[name]
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.fail(arg, "'*args'")
            args.append(self.visit(arg, depth + 1))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(kw.value, "'**kwargs'")
            kwargs[kw.arg] = self.visit(kw.value, depth + 1)
        try:
            return fn(*args, **kwargs)
        except LrbsError:
            raise
        except TypeError as exc:  # wrong arguments for the signature, e.g. an unknown keyword
            raise ConfigError(
                f"{name}(...) in spec={self.spec!r}: {exc}. Signature: {name}{inspect.signature(fn)}"
            ) from None
