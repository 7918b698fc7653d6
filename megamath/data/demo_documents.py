"""The documents of the demo corpus: math in the three genres of ProofPile II, from templates filled with
random numbers whose arithmetic is worked out correctly (so a model has something true to learn).

Each generator is a pure function of the random.Random it is given. The corpus writer
(megamath.data.demo_corpus) and the demo arithmetic evaluation (megamath.evaluation.demo_arith, which
draws problems from the same templates) both use them; they live apart from the writer so that the
training path, which reaches them through the evaluation, imports no compression library.
"""
from __future__ import annotations

import math
import random


# --- algebraic-stack: Python and Lean sources --------------------------------------------------------

def python_source(rng: random.Random) -> str:
    name = rng.choice(["gcd", "lcm", "power_mod", "triangular", "fib", "digit_sum", "is_prime"])
    a, b, m = rng.randint(2, 999), rng.randint(2, 999), rng.randint(3, 97)
    bodies = {
        "gcd": ("def gcd(a: int, b: int) -> int:\n    \"\"\"Greatest common divisor by Euclid's algorithm.\"\"\"\n"
                "    while b:\n        a, b = b, a % b\n    return abs(a)\n",
                f"assert gcd({a}, {b}) == {math.gcd(a, b)}\n"),
        "lcm": ("def lcm(a: int, b: int) -> int:\n    \"\"\"Least common multiple via the gcd.\"\"\"\n"
                "    from math import gcd\n    return a * b // gcd(a, b)\n",
                f"assert lcm({a}, {b}) == {a * b // math.gcd(a, b)}\n"),
        "power_mod": ("def power_mod(base: int, exp: int, mod: int) -> int:\n"
                      "    \"\"\"Square-and-multiply modular exponentiation.\"\"\"\n    result = 1\n"
                      "    base %= mod\n    while exp > 0:\n        if exp & 1:\n"
                      "            result = result * base % mod\n        base = base * base % mod\n"
                      "        exp >>= 1\n    return result\n",
                      f"assert power_mod({a}, {b}, {m}) == {pow(a, b, m)}\n"),
        "triangular": ("def triangular(n: int) -> int:\n    \"\"\"The n-th triangular number n(n+1)/2.\"\"\"\n"
                       "    return n * (n + 1) // 2\n",
                       f"assert triangular({a}) == {a * (a + 1) // 2}\n"),
        "fib": ("def fib(n: int) -> int:\n    \"\"\"Fibonacci numbers, F(0) = 0, F(1) = 1.\"\"\"\n"
                "    x, y = 0, 1\n    for _ in range(n):\n        x, y = y, x + y\n    return x\n",
                f"assert fib({m}) == {_fib(m)}\n"),
        "digit_sum": ("def digit_sum(n: int) -> int:\n    \"\"\"Sum of the decimal digits of n.\"\"\"\n"
                      "    return sum(int(c) for c in str(abs(n)))\n",
                      f"assert digit_sum({a * b}) == {sum(int(c) for c in str(a * b))}\n"),
        "is_prime": ("def is_prime(n: int) -> bool:\n    \"\"\"Trial division up to the square root.\"\"\"\n"
                     "    if n < 2:\n        return False\n    d = 2\n    while d * d <= n:\n"
                     "        if n % d == 0:\n            return False\n        d += 1\n    return True\n",
                     f"assert is_prime({a}) is {_is_prime(a)}\n"),
    }
    body, check = bodies[name]
    return f"\"\"\"Elementary number theory: {name}.\"\"\"\n\n\n{body}\n\n{check}"


def lean_source(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)
    n = rng.randint(1, 9999)
    lemmas = [
        f"theorem demo_add_{n} : ({a} : ℕ) + {b} = {a + b} := by norm_num",
        f"theorem demo_mul_{n} : ({a} : ℤ) * {b} = {a * b} := by norm_num",
        f"theorem demo_comm_{n} (x y : ℕ) : x + y + {c} = y + x + {c} := by ring",
        f"theorem demo_sq_{n} (x : ℤ) : (x + {a}) ^ 2 = x ^ 2 + {2 * a} * x + {a * a} := by ring",
        f"theorem demo_le_{n} (x : ℕ) (h : x ≤ {a}) : x ≤ {a + b} := by omega",
        f"lemma demo_dvd_{n} : ({a} : ℕ) ∣ {a * b} := ⟨{b}, by norm_num⟩",
    ]
    rng.shuffle(lemmas)
    body = "\n\n".join(lemmas[: rng.randint(2, len(lemmas))])
    return f"import Mathlib.Tactic\n\nnamespace Demo\n\n{body}\n\nend Demo\n"


def _fib(n: int) -> int:
    x, y = 0, 1
    for _ in range(n):
        x, y = y, x + y
    return x


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# --- arxiv: LaTeX papers -----------------------------------------------------------------------------

def arxiv_paper(rng: random.Random) -> str:
    parts = ["\\documentclass{amsart}\n\\newtheorem{theorem}{Theorem}\n\\begin{document}\n"]
    parts.append(f"\\title{{Notes on polynomials of degree {rng.randint(2, 5)}}}\n\\maketitle\n")
    for section in range(rng.randint(2, 5)):
        a, b, c = rng.randint(1, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        x0 = rng.randint(-9, 9)
        value = a * x0 * x0 + b * x0 + c
        parts.append(
            f"\\section{{Example {section + 1}}}\n"
            f"Let $f(x) = {a}x^2 {b:+d}x {c:+d}$. Then $f'(x) = {2 * a}x {b:+d}$ and $f({x0}) = {value}$.\n"
            f"\\begin{{theorem}}\nThe polynomial $f$ has its minimum at $x = {-b}/{2 * a}$.\n\\end{{theorem}}\n"
            f"\\begin{{proof}}\nSince ${a} > 0$, $f$ is convex and $f'(x) = 0$ exactly when "
            f"$x = {-b}/{2 * a}$.\n\\end{{proof}}\n"
        )
        n = rng.randint(3, 60)
        parts.append(
            f"\\begin{{theorem}}\n$\\sum_{{k=1}}^{{{n}}} k^2 = {n * (n + 1) * (2 * n + 1) // 6}$.\n\\end{{theorem}}\n"
            f"\\begin{{proof}}\nBy induction, $\\sum_{{k=1}}^{{n}} k^2 = \\frac{{n(n+1)(2n+1)}}{{6}}$; "
            f"take $n = {n}$.\n\\end{{proof}}\n"
        )
    parts.append("\\end{document}\n")
    return "".join(parts)


# --- open-web-math: worked problems as on a web page ---------------------------------------------------

def web_page(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(5, 500)
        return (f"# Sum of the first {n} positive integers\n\nProblem. Find $1 + 2 + \\dots + {n}$.\n\n"
                f"Solution. Pair the terms: the sum is $\\frac{{{n} \\cdot {n + 1}}}{{2}} = {n * (n + 1) // 2}$.\n")
    if kind == 1:
        a, b = rng.randint(2, 300), rng.randint(2, 300)
        return (f"# GCD of {a} and {b}\n\nUsing the Euclidean algorithm, $\\gcd({a}, {b}) = {math.gcd(a, b)}$, "
                f"so $\\operatorname{{lcm}}({a}, {b}) = {a * b // math.gcd(a, b)}$.\n")
    if kind == 2:
        p, q = rng.randint(1, 20), rng.randint(1, 20)
        return (f"# Solving a linear equation\n\nSolve ${p}x + {q} = {p * 7 + q}$.\n\n"
                f"Subtract {q} from both sides: ${p}x = {p * 7}$. Divide by {p}: $x = 7$.\n")
    r = rng.randint(1, 30)
    return (f"# Area of a circle\n\nA circle of radius ${r}$ has area $\\pi r^2 = {r * r}\\pi "
            f"\\approx {math.pi * r * r:.4f}$ and circumference ${2 * r}\\pi$.\n")


GENERATORS = {
    "algebraic-stack": (("python", python_source), ("lean", lean_source)),
    "arxiv": (("arxiv", arxiv_paper),),
    "open-web-math": (("open-web-math", web_page),),
}
