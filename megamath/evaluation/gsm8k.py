"""GSM8K: grade-school word problems, 8-shot chain of thought (Wei et al., 2022), answers compared as numbers.

The exemplars are the standard eight "Q: ... A: ... The answer is N." pairs every GSM8K few-shot
evaluation uses (LLEMMA's too). The gold answer is what follows `####` in the dataset's solution.
Answers are compared after removing commas, `$` and a trailing period, as numbers when both parse.
"""
from __future__ import annotations

import decimal
import re

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
STOP = ("\n\nQ:", "\nQ:", "\n\n\n")
# 5, -5, $5, -$5, $-5, .5; the "-" of "20 - 12" is no sign
_NUMBER = r"(?:-?[$]\s*-?|-)?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"
_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*(" + _NUMBER + ")")


def build_prompt(question: str, shots: int = 8) -> str:
    if not 0 <= shots <= len(EXEMPLARS):
        raise ValueError(f"gsm8k has {len(EXEMPLARS)} exemplars; --shots must be 0..{len(EXEMPLARS)}, got {shots}")
    same = " ".join(question.split())  # a test question is never its own exemplar (its answer would be shown)
    exemplars = [(q, a) for q, a in EXEMPLARS if " ".join(q.split()) != same][:shots]
    parts = [f"Q: {q}\nA: {a}\n\n" for q, a in exemplars]
    return "".join(parts) + f"Q: {question.strip()}\nA:"


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234'; '18.00' -> '18'; '.50' -> '0.5'; text that is not a number comes back stripped of
    the same marks. Decimal, not float: 12345678901234567 and 12345678901234568 stay two answers."""
    text = text.strip().replace(",", "").replace("$", "").strip().rstrip(".").strip()
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return text
    if not value.is_finite() or abs(value.adjusted()) > 1000:  # inf, nan, 1e99999: no digits to spell out
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gold_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution."""
    if "####" not in solution:
        raise ValueError("GSM8K answer without '####'")
    return normalize_number(solution.split("####")[-1])


def extract_answer(completion: str) -> str | None:
    """The number after the first "The answer is", else the last number of the completion, else None.

    The first statement is the answer (as lm-evaluation-harness's gsm8k-cot strict match takes it): what a
    model writes after it, past the stop strings, is a continuation, not a correction to be graded.
    """
    found = _ANSWER_IS.search(completion)
    if found:
        return normalize_number(found.group(1))
    numbers = re.findall(_NUMBER, completion)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(extracted: str | None, gold: str) -> bool:
    return extracted is not None and normalize_number(extracted) == normalize_number(gold)
