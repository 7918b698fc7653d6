r"""demo-arith: held-out arithmetic from the demo corpus's own templates, so the demo can show an accuracy.

A problem is a document drawn from a template of megamath.data.demo_documents with a fresh seed (not one the
corpus used), cut just before a number the template computed: the model completes the document, and the
first integer it writes is its answer. Kinds, from easy to hard for a small model:

    derivative      arxiv       "Let $f(x) = 7x^2 …$. Then $f'(x) = " -> 14      (2a)
    linear          web page    "… Subtract 5 from both sides: $3x = " -> 21   (7p)
    circumference   web page    "… and circumference $" -> 24                  (2r)
    lean-add        Lean        "theorem demo_add_… : (31 : ℕ) + 12 = " -> 43   (a + b)
    area            web page    "… has area $\pi r^2 = " -> 144                (r²)
    gcd             web page    "… $\gcd(84, 120) = " -> 12
    sum             web page    "… $\frac{50 \cdot 51}{2} = " -> 1275          (n(n+1)/2)

The templates' number ranges are small, so some held-out problems also occur in the training split:
the accuracy says the model learnt the corpus's arithmetic, not that it generalises beyond it.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

# The corpus's template functions (private there: the corpus is their only other user).
from megamath.atomic_io import write_text_atomically
from megamath.data.demo_documents import arxiv_paper, lean_source, web_page

KINDS = {  # kind -> (template, regex: group 1 is the prompt, group 2 the answer)
    "derivative": (arxiv_paper, r"(^.*?Then \$f'\(x\) = )(\d+)"),
    "linear": (web_page, r"(^.*?Subtract \d+ from both sides: \$\d+x = )(\d+)"),
    "circumference": (web_page, r"(^.*? and circumference \$)(\d+)"),
    "lean-add": (lean_source, r"(^.*?theorem demo_add_\d+ : \(\d+ : ℕ\) \+ \d+ = )(\d+)"),
    "area": (web_page, r"(^.*?has area \$\\pi r\^2 = )(\d+)"),
    "gcd": (web_page, r"(^.*?\$\\gcd\(\d+, \d+\) = )(\d+)"),
    "sum": (web_page, r"(^.*?\\cdot \d+\}\{2\} = )(\d+)"),
}
STOP = ("\n",)
_FIRST_INTEGER = re.compile(r"^\s*(-?\d+)")


def make_problems(count: int, seed: int = 0) -> list[dict]:
    """`count` problems, kinds in turn: {"id", "kind", "prompt", "answer"}; a pure function of the seed."""
    rng = random.Random(f"megamath-demo-arith-{seed}")  # string seeds: no overlap with the corpus' int seeds
    problems = []
    kinds = list(KINDS)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        template, pattern = KINDS[kind]
        for _ in range(1000):
            match = re.search(pattern, template(rng), flags=re.DOTALL)
            if match:
                break
        else:
            raise RuntimeError(f"demo-arith: the {kind} template never matched {pattern!r}")
        problems.append({"id": f"demo-arith-{i}", "kind": kind, "prompt": match.group(1), "answer": match.group(2)})
    return problems


def write_problems(path: str | Path, count: int = 140, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in make_problems(count, seed)))
    return path


def extract_answer(completion: str) -> str | None:
    match = _FIRST_INTEGER.match(completion)
    return match.group(1) if match else None


def is_correct(extracted: str | None, gold: str) -> bool:
    return extracted is not None and int(extracted) == int(gold)
