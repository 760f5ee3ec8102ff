"""VNN-LIB input boxes: the input bounds of a VNN-LIB property file, read strictly.

VNN-LIB (https://www.vnnlib.org) writes a verification property as SMT-LIB
s-expressions over input variables ``X_i`` and output variables ``Y_j``. verigrad reads
the *input box* only, a strict subset:

* ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``, each variable declared once
  and before it is used; the inputs must be ``X_0 .. X_{n-1}`` (flattened in C order);
* ``(assert (<= X_i c))``, ``(assert (>= X_i c))`` (either side may hold the variable; ``=``
  gives both bounds) and ``(assert (and ...))`` of such bounds, nested ``and`` allowed;
  ``c`` a decimal number (scientific notation allowed) or ``(- c)``; repeated bounds on one
  variable intersect;
* asserts over outputs only (``Y_j``, with ``and`` / ``or`` / comparisons) are *ignored*
  and counted, so that the run can say so;
* ``;`` comments.

Anything else (a strict inequality, a disjunction over inputs, an assert mixing inputs and
outputs, an unknown command, an unbalanced parenthesis, a constant that is not a number,
a variable never declared or never bounded on both sides, lower > upper) is a
:class:`VnnlibError` naming the file and the line. Constants are read as float64 exactly as
``float()`` rounds the decimal text; casting the box to a run's dtype is the caller's.

The ``vnnlib`` package on PyPI (1.0.2) was considered: it is a compiled C++ extension with
platform wheels, so this strict pure-Python reader of the subset above is used instead.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from verigrad.errors import UserError

__all__ = ["MAX_FILE_BYTES", "VnnlibBox", "VnnlibError", "parse_vnnlib", "read_vnnlib"]

MAX_FILE_BYTES = 256 << 20  # a VNN-COMP property with a few thousand inputs is a few MB
MAX_DEPTH = 256  # nesting of parentheses

_TOKEN = re.compile(r"\s+|;[^\n]*|\(|\)|[^\s();]+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")
_OUTPUT_OPS = frozenset({"and", "or", "not", "<=", ">=", "<", ">", "=", "+", "-", "*"})


class VnnlibError(UserError):
    """A VNN-LIB file verigrad cannot read as an input box: names the file, the line and what
    was expected."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}: line {line}: {message}")


@dataclass(frozen=True)
class _Atom:
    text: str
    line: int


@dataclass
class _List:
    line: int  # where its '(' is
    items: list["_Expr"] = field(default_factory=list)


_Expr = Union[_Atom, _List]


@dataclass(frozen=True, eq=False)
class VnnlibBox:
    """The input box of a VNN-LIB file: ``lower[i] <= X_i <= upper[i]`` (float64, flat, C
    order), with the line of every declaration and effective bound for messages."""

    path: str
    lower: np.ndarray
    upper: np.ndarray
    decl_lines: tuple[int, ...]
    lower_lines: tuple[int, ...]
    upper_lines: tuple[int, ...]
    outputs: int  # Y_j declared
    ignored_lines: tuple[int, ...]  # asserts on outputs only, not read
    sha256: str
    last_line: int

    @property
    def size(self) -> int:
        return int(self.lower.shape[0])

    def centre(self) -> np.ndarray:
        """The midpoint of the box (float64), inside it coordinate by coordinate."""
        with np.errstate(over="ignore", invalid="ignore"):
            c = (self.lower + self.upper) / 2.0
        return np.clip(c, self.lower, self.upper)

    def check_size(self, n: int, shape: tuple[int, ...]) -> None:
        """The file declares exactly ``n`` inputs (the model's input size, shape ``shape``)."""
        if self.size != n:
            dims = "×".join(map(str, shape))
            raise VnnlibError(self.path, self.decl_lines[-1],
                              f"expected {n} input variables X_0..X_{n - 1} (the model's input {dims}, flattened "
                              f"in C order), got {self.size} (X_0..X_{self.size - 1})")

    def notes(self) -> tuple[str, ...]:
        out = [f"input box: the {self.size} input bounds of {self.path} (sha256 {self.sha256[:16]}); the "
               "reference input is its centre"]
        if self.ignored_lines:
            lines = ", ".join(map(str, self.ignored_lines[:5])) + (", ..." if len(self.ignored_lines) > 5 else "")
            out.append(f"{self.path}: {len(self.ignored_lines)} output constraint(s) (assert over Y_j, line(s) "
                       f"{lines}) ignored: verigrad certifies the spec's explanation properties, not the file's "
                       "output property")
        return tuple(out)


def read_vnnlib(path: str | Path) -> VnnlibBox:
    """Read the input box of the VNN-LIB file at ``path`` (see the module docstring)."""
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise VnnlibError(p, 1, "expected a regular VNN-LIB file (not a directory, FIFO or device)")
        if st.st_size > MAX_FILE_BYTES:
            raise VnnlibError(p, 1, f"the file is {st.st_size} bytes, more than the limit of {MAX_FILE_BYTES}")
        data = p.read_bytes()
    except OSError as e:
        raise VnnlibError(p, 1, f"cannot read the file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise VnnlibError(p, 1, f"the file is more than the limit of {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VnnlibError(p, line, f"expected UTF-8 text, got byte 0x{data[e.start]:02x} ({e.reason})") from None
    return parse_vnnlib(text, str(p), hashlib.sha256(data).hexdigest())


def _tokens(text: str, path: str) -> list[_Expr]:
    """The top-level s-expressions of ``text`` (an explicit stack: no recursion)."""
    top: list[_Expr] = []
    stack: list[_List] = []
    line, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None  # every character starts some token
        tok, pos = m.group(), m.end()
        if tok[0].isspace() or tok[0] == ";":
            line += tok.count("\n")
            continue
        if tok == "(":
            if len(stack) >= MAX_DEPTH:
                raise VnnlibError(path, line, f"expected at most {MAX_DEPTH} nested parentheses")
            node = _List(line)
            (stack[-1].items if stack else top).append(node)
            stack.append(node)
        elif tok == ")":
            if not stack:
                raise VnnlibError(path, line, "unbalanced parentheses: ')' without a matching '('")
            stack.pop()
        elif not stack:
            raise VnnlibError(path, line, f"expected '(' starting a command, got {tok!r}")
        else:
            stack[-1].items.append(_Atom(tok, line))
    if stack:
        raise VnnlibError(path, stack[-1].line, "unbalanced parentheses: the '(' on this line is never closed")
    return top


def _show(e: _Expr) -> str:
    if isinstance(e, _Atom):
        return repr(e.text)
    head = e.items[0].text if e.items and isinstance(e.items[0], _Atom) else "..."
    return f"({head} ...)" if e.items else "()"


def _atoms(e: _Expr) -> list[_Atom]:
    out, stack = [], [e]
    while stack:
        n = stack.pop()
        if isinstance(n, _Atom):
            out.append(n)
        else:
            stack.extend(n.items)
    return out


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.decl: dict[tuple[str, int], int] = {}  # (X|Y, index) -> declaration line
        self.lower: dict[int, tuple[float, int]] = {}  # X index -> (bound, line)
        self.upper: dict[int, tuple[float, int]] = {}
        self.ignored: list[int] = []

    def fail(self, line: int, message: str) -> VnnlibError:
        return VnnlibError(self.path, line, message)

    def command(self, cmd: _Expr) -> None:
        if not isinstance(cmd, _List) or not cmd.items or not isinstance(cmd.items[0], _Atom):
            raise self.fail(cmd.line, f"expected (declare-const ...) or (assert ...), got {_show(cmd)}")
        head = cmd.items[0].text
        if head == "declare-const":
            self.declare(cmd)
        elif head == "assert":
            if len(cmd.items) != 2:
                raise self.fail(cmd.line, f"expected (assert <constraint>), got {len(cmd.items) - 1} argument(s)")
            self.assertion(cmd.items[1], cmd.line)
        else:
            raise self.fail(cmd.line, f"expected (declare-const ...) or (assert ...), got ({head} ...)")

    def declare(self, cmd: _List) -> None:
        args = cmd.items[1:]
        if len(args) != 2 or not all(isinstance(a, _Atom) for a in args):
            raise self.fail(cmd.line, "expected (declare-const X_i Real) or (declare-const Y_j Real)")
        name, typ = args
        assert isinstance(name, _Atom) and isinstance(typ, _Atom)
        m = _VAR.fullmatch(name.text)
        if m is None:
            raise self.fail(name.line, f"expected a variable named X_i or Y_j (i, j = 0, 1, ...), got {name.text!r}")
        if typ.text != "Real":
            raise self.fail(typ.line, f"expected type Real for {name.text}, got {typ.text!r}")
        key = (m.group(1), int(m.group(2)))
        if key in self.decl:
            raise self.fail(name.line, f"{name.text} is declared twice (first on line {self.decl[key]})")
        self.decl[key] = name.line

    def variable(self, a: _Atom) -> tuple[str, int] | None:
        """(X|Y, index) for a declared variable, None for a non-variable; undeclared: an error."""
        m = _VAR.fullmatch(a.text)
        if m is None:
            return None
        key = (m.group(1), int(m.group(2)))
        if key not in self.decl:
            raise self.fail(a.line, f"{a.text} is not declared (expected (declare-const {a.text} Real) before "
                                    "its first use)")
        return key

    def assertion(self, body: _Expr, line: int) -> None:
        kinds = set()
        for a in _atoms(body):
            v = self.variable(a)
            if v is not None:
                kinds.add(v[0])
        if "Y" in kinds:
            if "X" in kinds:
                raise self.fail(line, "expected an assert over inputs (X_i) or over outputs (Y_j), got one mixing "
                                      "both (a disjunction of input boxes?): verigrad reads one input box")
            for a in _atoms(body):
                if a.text not in _OUTPUT_OPS and self.variable(a) is None and _NUMBER.fullmatch(a.text) is None:
                    raise self.fail(a.line, f"expected an operator, a number or Y_j in an output constraint, got "
                                            f"{a.text!r}")
            self.ignored.append(line)
            return
        self.bounds(body)

    def bounds(self, e: _Expr) -> None:
        """``e``: a bound (op X_i c) / (op c X_i), or (and ...) of such."""
        stack = [e]
        while stack:
            n = stack.pop()
            if not isinstance(n, _List) or not n.items or not isinstance(n.items[0], _Atom):
                raise self.fail(n.line, f"expected a bound (<= X_i c) or (>= X_i c), got {_show(n)}")
            op = n.items[0].text
            if op == "and":
                stack.extend(reversed(n.items[1:]))
            elif op == "or":
                raise self.fail(n.line, "expected a conjunction of input bounds, got a disjunction (or ...): "
                                        "verigrad reads one input box")
            elif op in ("<", ">"):
                raise self.fail(n.line, f"expected <= or >= (a closed box), got the strict inequality {op!r}")
            elif op in ("<=", ">=", "="):
                self.bound(n, op)
            else:
                raise self.fail(n.line, f"expected a bound (<= X_i c) or (>= X_i c) or (and ...), got ({op} ...)")

    def bound(self, n: _List, op: str) -> None:
        if len(n.items) != 3:
            raise self.fail(n.line, f"expected ({op} X_i c) with two arguments, got {len(n.items) - 1}")
        a, b = n.items[1], n.items[2]
        va = self.variable(a) if isinstance(a, _Atom) else None
        vb = self.variable(b) if isinstance(b, _Atom) else None
        if va is not None and vb is not None:
            raise self.fail(n.line, f"expected a bound of one variable by a number, got ({op} {_show(a)} {_show(b)})")
        if va is None and vb is None:
            raise self.fail(n.line, f"expected a bound ({op} X_i c) on an input variable, got ({op} {_show(a)} "
                                    f"{_show(b)})")
        if va is not None:
            var, const, lower = va, b, op == ">="
        else:
            assert vb is not None
            var, const, lower = vb, a, op == "<="
        c = self.number(const)
        i = var[1]
        if op == "=" or lower:
            self.tighten(self.lower, i, c, n.line, max)
        if op == "=" or not lower:
            self.tighten(self.upper, i, c, n.line, min)

    @staticmethod
    def tighten(table: dict[int, tuple[float, int]], i: int, c: float, line: int, pick) -> None:
        old = table.get(i)
        if old is None or pick(old[0], c) != old[0]:
            table[i] = (c, line)

    def number(self, e: _Expr) -> float:
        neg = False
        if isinstance(e, _List):  # (- c)
            if len(e.items) == 2 and isinstance(e.items[0], _Atom) and e.items[0].text == "-" \
                    and isinstance(e.items[1], _Atom):
                neg, e = True, e.items[1]
            else:
                raise self.fail(e.line, f"expected a number or (- number), got {_show(e)}")
        if _NUMBER.fullmatch(e.text) is None:
            raise self.fail(e.line, f"expected a number (e.g. 0.5, -1e-3), got {e.text!r}")
        v = float(e.text)
        if not np.isfinite(v):
            raise self.fail(e.line, f"expected a finite number, got {e.text!r} (beyond float64's range)")
        return -v if neg else v

    def box(self, last_line: int, sha256: str) -> VnnlibBox:
        xs = sorted(i for k, i in self.decl if k == "X")
        if not xs:
            raise self.fail(last_line, "expected input variables (declare-const X_0 Real) ..., got none")
        for want, i in enumerate(xs):
            if want != i:
                raise self.fail(self.decl[("X", i)], f"expected the inputs X_0..X_{len(xs) - 1} without gaps, "
                                                     f"got X_{i} but X_{want} is not declared")
        lower, upper = np.empty(len(xs)), np.empty(len(xs))
        lo_lines, up_lines = [], []
        for i in xs:
            d = self.decl[("X", i)]
            if i not in self.lower:
                raise self.fail(d, f"X_{i} (declared here) has no lower bound: expected (assert (>= X_{i} c))")
            if i not in self.upper:
                raise self.fail(d, f"X_{i} (declared here) has no upper bound: expected (assert (<= X_{i} c))")
            (lo, ll), (up, ul) = self.lower[i], self.upper[i]
            if not lo <= up:
                raise self.fail(max(ll, ul), f"expected lower <= upper for X_{i}, got lower bound {lo!r} (line {ll}) "
                                             f"> upper bound {up!r} (line {ul}): an empty box")
            lower[i], upper[i] = lo, up
            lo_lines.append(ll)
            up_lines.append(ul)
        outputs = sum(1 for k, _ in self.decl if k == "Y")
        return VnnlibBox(self.path, lower, upper, tuple(self.decl[("X", i)] for i in xs), tuple(lo_lines),
                         tuple(up_lines), outputs, tuple(self.ignored), sha256, last_line)


def parse_vnnlib(text: str, path: str = "<vnnlib>", sha256: str | None = None) -> VnnlibBox:
    """The input box of VNN-LIB ``text`` (``path`` names it in errors)."""
    reader = _Reader(path)
    for cmd in _tokens(text, path):
        reader.command(cmd)
    last_line = text.count("\n") + (0 if text.endswith("\n") else 1)
    digest = sha256 if sha256 is not None else hashlib.sha256(text.encode()).hexdigest()
    return reader.box(max(last_line, 1), digest)
