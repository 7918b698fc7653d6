r"""MATH (Hendrycks et al., 2021) with Minerva's 4-shot prompt and final-answer normalisation.

The prompt is Minerva's (Lewkowycz et al., 2022): four worked problems, each solution ending with
"Final Answer: The final answer is $…$. I hope it is correct." The model's answer is what follows the
first "Final Answer: The final answer is" (else its last `\boxed{}`); the gold answer is the last
`\boxed{}` of the dataset's solution. Both go through `normalize_final_answer`, Minerva's normalisation
(appendix D: keep the right-hand side of an equation, drop units and filler words, unwrap `\text{}`,
`\boxed{}`, `$…$`, complete shorthand like `\frac12`), with additions it lacks: `\dfrac`/`\tfrac` read as
`\frac`, `\%`, `%`, `\!`, `\left`/`\right` and spacing (`\,` `\:` `\quad`) dropped, `\mathrm{}`/`\mathbf{}`
unwrapped too, braces matched when unwrapping (Minerva's regexes stop at the first `}`), a trailing period
dropped, `\sqrt[n]{x}` kept whole, and commas dropped only as thousands separators (Minerva's turns the
list "2,3" into 23). Equivalence (equivalence.py) is equality of the normalised strings, then symbolic
equality through SymPy under a timeout. Where Minerva's scoring finds no "Final Answer" line it counts the
problem wrong; the `\boxed{}` fallback here is more lenient.
"""
from __future__ import annotations

import re

from megamath.evaluation.equivalence import numeric_key, symbolic_equal

EXEMPLARS = [
    (r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
     "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
    (r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]
STOP = ("\n\nProblem:", "I hope it is correct.")

# Minerva's normalisation tables (Lewkowycz et al., 2022, appendix D).
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
]
# Additions: spellings Minerva's table does not cover, applied first.
EXTRA_SUBSTITUTIONS = [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                       ("\\%", ""), ("%", ""), ("\\!", ""), ("\\qquad", ""), ("\\quad", ""), ("\\,", ""),
                       ("\\:", "")]  # spacing: 1\,000 is 1000 (SymPy's LaTeX grammar skips these too)


def build_prompt(problem: str, shots: int = 4) -> str:
    if not 0 <= shots <= len(EXEMPLARS):
        raise ValueError(f"math has {len(EXEMPLARS)} exemplars; --shots must be 0..{len(EXEMPLARS)}, got {shots}")
    same = " ".join(problem.split())  # a test problem is never its own exemplar (its answer would be shown)
    exemplars = [(p, s) for p, s in EXEMPLARS if " ".join(p.split()) != same][:shots]
    parts = [f"Problem:\n{p}\n\nSolution:\n{s}\n\n" for p, s in exemplars]
    return "".join(parts) + f"Problem:\n{problem.strip()}\n\nSolution:"


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{…}` (or `\fbox{…}`), braces matched; `\boxed 5` gives "5"."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.index("\\", start) + (6 if text.startswith("\\boxed", start) else 5)
    if text.startswith(" ", i):
        return text[i + 1:].split("$")[0].strip() or None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def gold_answer(solution: str) -> str:
    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError("MATH solution without \\boxed{} answer")
    return boxed


def extract_answer(completion: str) -> str | None:
    """What follows the first "Final Answer: The final answer is" (Minerva's line), else the last `\\boxed{}`.

    The line itself, not the phrase anywhere: reasoning that says "at first I thought the final answer is 4"
    must not be graded. The first such line, as Minerva's scoring searches for it: a second one belongs to
    text the model ran on into.
    """
    match = re.search(r"Final Answer: The final answer is(.*)", completion)
    if match:
        answer = match.group(1).split("I hope it is correct")[0].strip()
        answer = answer[:-1].strip() if answer.endswith(".") else answer
        return answer or None
    return last_boxed(completion) or None  # an empty \boxed{} is no answer (it would vote)


def _unwrap(text: str, command: str) -> str:
    r"""`\command{X}` -> X for every occurrence, braces matched (Minerva uses a regex; nesting needs this)."""
    key = "\\" + command + "{"
    while key in text:
        start = text.index(key)
        depth, end = 0, None
        for j in range(start + len(key) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                end = j
                break
        if end is None:
            break
        text = text[:start] + text[start + len(key):end] + text[end + 1:]
    return text


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (see the module docstring)."""
    answer = answer.split("=")[-1]
    for before, after in EXTRA_SUBSTITUTIONS + SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in REMOVED_EXPRESSIONS:
        answer = answer.replace(expression, "")
    dollars = re.findall(r"\$(.*?)\$", answer)  # keep the math of "… $x$ …"
    if dollars:
        answer = dollars[0]
    for command in ("text", "textbf", "overline", "boxed", "mathrm", "mathbf"):
        answer = _unwrap(answer, command)
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{[])", r"sqrt{\2}", answer)  # \sqrt2 -> \sqrt{2}; \sqrt[3]{2} kept (Minerva: \sqrt{[}3]{2})
    answer = answer.replace("$", "").strip()
    # 100,000 -> 100000, also -1,000 and 1,234.5; Minerva drops the commas of any digits, making the solution
    # list "2,3" the number 23: only groups of three digits are a thousands separator here.
    if re.fullmatch(r"-?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?", answer):
        answer = answer.replace(",", "")
    if answer.endswith(".") and not answer.endswith("\\."):
        answer = answer[:-1]
    return answer


def is_equiv(predicted: str | None, gold: str, timeout_s: float = 2.0) -> bool:
    """Normalised strings equal, or symbolically equal (SymPy, under `timeout_s`)."""
    if predicted is None:
        return False
    a, b = normalize_final_answer(predicted), normalize_final_answer(gold)
    if a == b:
        return True
    return symbolic_equal(a, b, timeout_s)


def canonical_answer(answer: str) -> str:
    """The form votes are pooled by: the numeric value of a number (`1/2`, `\\frac12` and `0.5` pool, as the
    reference vote pools answers it finds equivalent), else the normalised string."""
    normalized = normalize_final_answer(answer)
    key = numeric_key(normalized)
    return normalized if key is None else "= " + key
