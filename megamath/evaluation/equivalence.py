r"""Symbolic equality of two normalised MATH answers through SymPy, bounded by a timeout.

Why not SymPy's own LaTeX parser: it needs the ANTLR runtime. MATH's answers use a small LaTeX
vocabulary (numbers, `\frac`, `\sqrt`, `\pi`, powers, `\cdot`, intervals and tuples), which `to_sympy`
rewrites into SymPy syntax. An answer it cannot read compares unequal (exact string match already
failed), so a parser gap can only cost a correct answer, never credit a wrong one.

Intervals and tuples compare element by element and need the same brackets ("[2,5)" is not "(2,5)").
SymPy's simplify can run for minutes on adversarial input: the check runs under a SIGALRM timer when
called from the main thread (elsewhere inputs are short-circuited by length instead) and a timeout
counts as unequal. SymPy's parser evaluates Python, and the answer is a model's output: the rewritten
text may hold only numbers, names, operators and parentheses, no attribute access, and it is evaluated in
a namespace of the few SymPy names the rewriting produces with no builtins (SymPy's default namespace
holds all of SymPy and Python's builtin functions, so `eval(chr(…)+…)` would run any code). A power
whose result would have too many digits (`10^{10^{10}}`) is refused before anything is evaluated: Python's
big-integer arithmetic runs in C, where neither the alarm nor any thread can stop it.
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading
import warnings

_COMMANDS = {"\\pi": "pi", "\\infty": "oo", "\\cdot": "*", "\\times": "*", "\\div": "/", "\\ln": "log",
             "\\log": "log", "\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\exp": "exp"}
MAX_CHARS = 200
MAX_DIGITS = 100_000
"""A number power may have at most this many digits (2^{2005} is fine, 10^{10^{10}} is not)."""
MAX_SYMBOLIC_EXPONENT = 100
"""A power of an expression with symbols may have at most this exponent: (x+y+z)^{1000} would be expanded
for minutes where no alarm runs (off the main thread); ^{100} takes seconds."""
_SYMPY_NAMES = ("Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow")  # what parse_expr's code calls


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float, cpu: bool = False):
    """Raise _Timeout after `seconds` of the wall clock, or with `cpu` of this process's CPU time (main thread
    only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    sig, timer = (signal.SIGPROF, signal.ITIMER_PROF) if cpu else (signal.SIGALRM, signal.ITIMER_REAL)
    previous = signal.signal(sig, on_alarm)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        signal.setitimer(timer, 0)
        signal.signal(sig, previous)


def _group(text: str, i: int) -> tuple[str, int]:
    """The brace group (or single character) starting at text[i] -> (content, index after it)."""
    if i >= len(text):
        raise ValueError("missing argument")
    if text[i] != "{":
        return text[i], i + 1
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j], j + 1
    raise ValueError("unbalanced braces")


def latex_to_python(text: str) -> str:
    r"""`\frac{a}{b}` -> ((a)/(b)), `\sqrt[n]{x}` -> ((x)**(1/(n))), `^{…}` -> **(…), braces -> parentheses."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("\\frac", i):
            num, i = _group(text, i + 5)
            den, i = _group(text, i)
            out.append(f"(({latex_to_python(num)})/({latex_to_python(den)}))")
        elif text.startswith("\\sqrt", i):
            i += 5
            root = "2"
            if text.startswith("[", i):
                close = text.index("]", i)
                root, i = text[i + 1:close], close + 1
            arg, i = _group(text, i)
            out.append(f"(({latex_to_python(arg)})**(1/({latex_to_python(root)})))")
        elif text[i] == "^":
            arg, i = _group(text, i + 1)
            out.append(f"**({latex_to_python(arg)})")
        elif text[i] == "\\":
            name = re.match(r"\\[A-Za-z]+", text[i:])
            if not name or name.group(0) not in _COMMANDS:
                raise ValueError(f"unsupported LaTeX {text[i:i + 12]!r}")
            out.append(f" {_COMMANDS[name.group(0)]} ")
            i += len(name.group(0))
        elif text[i] in "{}":
            out.append("(" if text[i] == "{" else ")")
            i += 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _namespace() -> dict:
    """The only names the parsed answer can reach: SymPy's number/symbol constructors and _COMMANDS' targets."""
    import sympy

    names = _SYMPY_NAMES + tuple(name.strip() for name in _COMMANDS.values() if name.strip().isalpha())
    return {"__builtins__": {}, **{name: getattr(sympy, name) for name in names}}


def _check_size(expr) -> None:
    """Refuse (ValueError) a power too large to evaluate: expr is unevaluated, so nothing big exists yet."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if not isinstance(node, sympy.Pow) or not node.exp.is_number:
            continue
        exponent = abs(complex(sympy.N(node.exp)))  # mpmath: 10^{10} evaluates to a float, not an integer
        if not node.base.is_number:
            if exponent > MAX_SYMBOLIC_EXPONENT:
                raise ValueError(f"exponent {exponent:g} too large")
            continue
        base = sympy.N(sympy.Abs(node.base))  # an mpmath float: 2^{1024} is no overflow, as a Python float is
        if not base.is_finite or base.is_zero or base == 1:
            continue
        digits = exponent * abs(float(sympy.log(base, 10).evalf()))
        if digits > MAX_DIGITS:
            raise ValueError(f"power with about {digits:g} digits")


def to_sympy(text: str):
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    python = latex_to_python(text)
    # Python's number literals are not LaTeX's: 08 would be 0·8 and 1011_2 (a base subscript) 10112.
    python = re.sub(r"(?<![0-9A-Za-z_.])0+(?=[0-9])", "", python)
    if re.search(r"[0-9]_", python):
        raise ValueError(f"subscripted number in {text!r}")
    if re.search(r"[^0-9A-Za-z_+\-*/().\s]", python):
        raise ValueError(f"unsupported characters in {text!r}")
    # parse_expr evaluates its input as Python: a model's answer must not reach attributes ("(1).__class__").
    if re.search(r"\.\s*[A-Za-z_]|__", python):
        raise ValueError(f"attribute access in {text!r}")
    from sympy.utilities.exceptions import SymPyDeprecationWarning

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    # Parsed unevaluated first, sizes checked, then evaluated; names outside _namespace() become symbols.
    # What SymPy only deprecates (a tuple inside a product: "x(1,2)") is unreadable here, not a warning
    # printed in the middle of an evaluation's progress bar that a later SymPy turns into an error anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("error", SymPyDeprecationWarning)
        _check_size(parse_expr(python, {}, transformations, _namespace(), evaluate=False))
        return parse_expr(python, {}, transformations, _namespace(), evaluate=True)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{" and 1 or (ch in ")]}" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _exact_decimals(expr):
    """Every decimal as written becomes the rational it spells: 0.3333333333 is not 1/3."""
    import sympy

    return expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)})


def _scalar_equal(a: str, b: str) -> bool:
    import sympy

    x, y = to_sympy(a), to_sympy(b)
    decimals = bool(x.atoms(sympy.Float) or y.atoms(sympy.Float))
    x, y = _exact_decimals(x), _exact_decimals(y)
    difference = sympy.simplify(x - y)
    if difference == 0:
        return True
    # A decimal is exact as written (3.14159265359 is not pi), and an exactly nonzero rational difference is
    # never float noise (1000000007 is not 1000000008). What is left, irrational constants simplify could not
    # cancel (sqrt(2)/2 against 1/sqrt(2)), is compared numerically.
    if decimals or difference.is_Rational:
        return False
    return bool(difference.is_number and abs(complex(sympy.N(difference))) <= 1e-9 * max(1.0, abs(complex(sympy.N(y)))))


def _enclosed(text: str) -> bool:
    """True when the bracket opening text closes at its end: "[2,5)", "(1,2)", "(x)"; not "(x+1)(x-1)"."""
    if len(text) < 2 or text[0] not in "([" or text[-1] not in ")]":
        return False
    depth = 0
    for i, ch in enumerate(text[:-1]):
        depth += ch in "([{" and 1 or (ch in ")]}" and -1 or 0)
        if depth == 0:  # the first bracket closed before the end: a product of groups
            return False
    return True


def _ungroup(text: str) -> str:
    """"(5)" -> "5": parentheses around one value group it, they make no tuple."""
    while _enclosed(text) and text[0] + text[-1] == "()" and len(_split_top_level(text[1:-1])) == 1:
        text = text[1:-1].strip()
    return text


def _equal(a: str, b: str) -> bool:
    a, b = _ungroup(a), _ungroup(b)
    if a == b:
        return True
    ends = (a[:1] + a[-1:], b[:1] + b[-1:])
    bracketed = [_enclosed(a), _enclosed(b)]
    if any(bracketed) or "," in a or "," in b:  # intervals, tuples, lists: same brackets, elementwise
        if bracketed[0] != bracketed[1] or (bracketed[0] and ends[0] != ends[1]):
            return False
        inner_a, inner_b = (a[1:-1], b[1:-1]) if bracketed[0] else (a, b)
        parts_a, parts_b = _split_top_level(inner_a), _split_top_level(inner_b)
        if len(parts_a) != len(parts_b) or (len(parts_a) == 1 and bracketed[0]):
            return len(parts_a) == len(parts_b) == 1 and _scalar_equal(inner_a, inner_b)
        return all(_equal(p.strip(), q.strip()) for p, q in zip(parts_a, parts_b))
    return _scalar_equal(a, b)


def symbolic_equal(a: str, b: str, timeout_s: float = 2.0) -> bool:
    """True when the answers are provably equal; unreadable, too long or too slow counts as unequal."""
    if not a or not b or len(a) > MAX_CHARS or len(b) > MAX_CHARS:
        return False
    try:
        with _time_limit(timeout_s):
            return _equal(a, b)
    except _Timeout:
        return False
    except Exception:  # noqa: BLE001 - any parse or SymPy failure means "not shown equal"
        return False


def numeric_key(text: str, timeout_s: float = 1.0) -> str | None:
    """The value of an answer that is a plain number ("0.5" and `\\frac{1}{2}` give "1/2"), else None (symbols,
    tuples, unreadable, too long or too slow). Used to pool votes: rationals and decimals are exact (0.333
    is not 1/3, 10^{12}+7 is not 10^{12}+8), other numbers (`2\\sqrt{2}`, `\\pi/2`) 15 significant digits."""
    if not text or len(text) > MAX_CHARS or "," in text:
        return None
    try:
        with _time_limit(timeout_s):
            import sympy

            value = to_sympy(text)
            if not value.is_number or not value.is_finite:
                return None
            if value.is_Float:  # a decimal as written: exactly the rational it spells
                value = sympy.Rational(str(value))
            return str(value) if value.is_Rational else str(sympy.N(value, 15))
    except _Timeout:
        return None
    except Exception:  # noqa: BLE001 - an unreadable answer keeps its string
        return None
