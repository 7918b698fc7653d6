"""A small math corpus in ProofPile II's released layout, generated here, and a tokenizer trained on it.

The demo and the tests need real-looking data without downloads: this module writes
`ROOT/{algebraic-stack,arxiv,open-web-math}/{train,validation,test}/<name>-0000.jsonl.zst` with records
`{"text": str, "meta": dict}` like ProofPile II, from templates filled with random numbers whose
arithmetic is worked out correctly (so a model has something true to learn), and trains a Llama-style
SentencePiece BPE model on the training split (unk 0, bos 1, eos 2, byte fallback, digits split).
Everything is a pure function of the seed.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import zstandard

SUBSETS = ("algebraic-stack", "arxiv", "open-web-math")
SPLITS = ("train", "validation", "test")


@dataclass
class DemoCorpusConfig:
    """What to generate."""

    documents_per_subset: int = 1000
    """Training documents of each subset; validation and test get 5 % each (at least 2)."""
    seed: int = 1234
    """Everything generated is a pure function of this seed."""
    vocab_size: int = 1024
    """Size of the demo SentencePiece model (an upper bound: templates have a small vocabulary)."""


# --- algebraic-stack: Python and Lean sources --------------------------------------------------------

def _python_source(rng: random.Random) -> str:
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


def _lean_source(rng: random.Random) -> str:
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

def _arxiv_paper(rng: random.Random) -> str:
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

def _web_page(rng: random.Random) -> str:
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


_GENERATORS = {
    "algebraic-stack": (("python", _python_source), ("lean", _lean_source)),
    "arxiv": (("arxiv", _arxiv_paper),),
    "open-web-math": (("open-web-math", _web_page),),
}


def _records(subset: str, split: str, count: int, rng: random.Random) -> dict[str, list[dict]]:
    """Records per shard name (`python`, `lean`, ...) of one subset and split."""
    shards: dict[str, list[dict]] = {name: [] for name, _ in _GENERATORS[subset]}
    for i in range(count):
        name, make = _GENERATORS[subset][i % len(_GENERATORS[subset])]
        meta = {"source": "megamath-demo", "generator": name, "split": split, "index": i}
        shards[name].append({"text": make(rng), "meta": meta})
    return shards


def write_demo_corpus(root: str | Path, config: DemoCorpusConfig = DemoCorpusConfig()) -> dict[tuple[str, str], int]:
    """Write the corpus under `root`; return the number of records per (subset, split)."""
    root = Path(root)
    counts: dict[tuple[str, str], int] = {}
    compressor = zstandard.ZstdCompressor(level=3)
    for subset_number, subset in enumerate(SUBSETS):
        for split_number, split in enumerate(SPLITS):
            rng = random.Random(config.seed * 1009 + subset_number * 31 + split_number)
            count = config.documents_per_subset if split == "train" else max(2, config.documents_per_subset // 20)
            folder = root / subset / split
            folder.mkdir(parents=True, exist_ok=True)
            for name, records in _records(subset, split, count, rng).items():
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                (folder / f"{name}-0000.jsonl.zst").write_bytes(compressor.compress(lines.encode("utf-8")))
            counts[(subset, split)] = count
    return counts


def _training_lines(root: Path):
    """Lines of the training split's texts: SentencePiece's trainer takes one sentence per item."""
    for path in sorted(root.glob("*/train/*.jsonl.zst")):
        with zstandard.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                for text_line in json.loads(line)["text"].splitlines():
                    if text_line.strip():
                        yield text_line


def train_demo_tokenizer(corpus_root: str | Path, model_path: str | Path, vocab_size: int = 1024) -> Path:
    """Train a Llama-style SentencePiece BPE model on the corpus' training split; write it to model_path."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(Path(corpus_root)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a template corpus may not support every requested piece
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's special ids
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return model_path
