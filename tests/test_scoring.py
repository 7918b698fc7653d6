"""Scoring: GSM8K answer extraction, MATH's Minerva normalisation and equivalence on hand-written pairs,
majority voting and its tie rule, the task readers."""
from __future__ import annotations

import functools
import json

import pytest

from megamath.evaluation import demo_arith, equivalence, gsm8k, minerva_math
from megamath.evaluation.equivalence import latex_to_python, symbolic_equal, to_sympy
from megamath.evaluation.tasks import get_task
from megamath.evaluation.voting import majority_vote


# ---- SymPy's time limit, counted in CPU time ---------------------------------------------------------------------

WALL_CLOCK_LIMIT = {"test_symbolic_equality_is_bounded"}  # the library's own timer, as it runs


@pytest.fixture(autouse=True)
def cpu_time_limit(request, monkeypatch):
    """The pairs below must compare equal (or not) by their math, within the library's limits (2 s, 1 s for a
    vote's number), but on the wall clock those limits also counted the time the process waited for a CPU: on
    a loaded 2-core machine (the other xdist worker, its gloo ranks) `0.5 = \\frac{1}{2}` (SymPy's import,
    0.45 s of CPU) and `x^2+2x+1 = (x+1)^2` (0.2 s) ran past 2 s and counted as unequal. The limits are kept,
    in CPU seconds, and SymPy is imported before the first one starts (once per process in eval, it is no
    comparison's work). The test of the limit itself keeps the wall-clock timer: load only makes it give up
    sooner."""
    import sympy  # noqa: F401

    if request.node.originalname not in WALL_CLOCK_LIMIT:
        monkeypatch.setattr(equivalence, "_time_limit", functools.partial(equivalence._time_limit, cpu=True))


# ---- GSM8K -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,expected", [
    (" Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", "18"),
    (" The answer is $1,234.", "1234"),
    (" The answer is 18.00.", "18"),
    (" The answer is -7", "-7"),
    (" The answer is 0.5.", "0.5"),
    (" He pays 3 + 4 = 7 dollars, so 7 in all.", "7"),  # no "The answer is": the last number
    (" The answer is 5. Then 3 more questions follow with 9.", "5"),  # the stated answer wins
    (" I do not know.", None),
    (" The answer is $-5. Then 3 more.", "-5"), (" The answer is -$5.", "-5"), (" The answer is $ 12.", "12"),
    (" So he gave 20 - 12", "12"),  # the last number, not "- 12"
    (" The answer is 5.\nWait, she had 9. The answer is 7.", "5"),  # the first statement is graded
    (" The answer is .5.", "0.5"),  # a leading point is part of the number, not the 5 after it
])
def test_gsm8k_extraction(completion, expected):
    assert gsm8k.extract_answer(completion) == expected


def test_gsm8k_gold_and_comparison():
    assert gsm8k.gold_answer("Janet sells 9 eggs.\nShe makes $18.\n#### 18") == "18"
    assert gsm8k.gold_answer("... #### 1,000") == "1000"
    assert gsm8k.is_correct("$1,000.", "1000") and gsm8k.is_correct("18.0", "18")
    assert not gsm8k.is_correct("17", "18") and not gsm8k.is_correct(None, "18")
    assert not gsm8k.is_correct(".5", "5") and gsm8k.is_correct("0.50", ".5")
    assert not gsm8k.is_correct("12345678901234567", "12345678901234568")  # exact, not as floats
    assert gsm8k.normalize_number("1e99999") == "1e99999"  # no 100000-digit integer is spelled out
    with pytest.raises(ValueError, match="####"):
        gsm8k.gold_answer("no marker")


def test_gsm8k_prompt_is_eight_shot_chain_of_thought():
    prompt = gsm8k.build_prompt("How many?")
    assert prompt.count("Q: ") == 9 and prompt.count("The answer is") == 8 and prompt.endswith("Q: How many?\nA:")
    assert gsm8k.build_prompt("How many?", 0) == "Q: How many?\nA:"
    with pytest.raises(ValueError, match="0..8"):
        gsm8k.build_prompt("x", 9)


# ---- MATH -----------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("0.5", r"\frac{1}{2}"),  # fractions vs decimals
    (r"\frac{3}{4}", "0.75"),
    (r"\dfrac{1}{2}", r"\frac12"),  # \dfrac, shorthand \frac12
    (r"\tfrac{2}{3}", r"\frac{2}{3}"),
    (r"-\dfrac{2}{3}", r"-\frac{2}{3}"),
    (r"10^\circ", "10"),  # degrees
    (r"30^{\circ}", "30"),
    (r"5\text{ cm}", "5"),  # units
    ("12 inches", "12"),
    (r"\$18.90", "18.9"),
    (r"\text{(C)}", r"\text{(C)}"),  # \text{}
    (r"\text{Evelyn}", "Evelyn"),
    (r"\textbf{8}", "8"),
    ("[2,5)", "[2, 5)"),  # intervals
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\left( \frac{1}{2}, 3 \right)", "(0.5,3)"),
    ("x = 3", "3"),  # equation vs value
    ("y=-2", "-2"),
    (r"50\%", "50"),  # percentages
    ("25%", "25"),
    ("1,000", "1000"),
    ("-1,000", "-1000"), ("1,234.5", "1234.5"), (r"12,\!345", "12345"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\frac{\pi}{2}", r"\pi/2"),
    (r"2\pi", r"\pi \cdot 2"),
    ("2x+1", "1+2x"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(1,2)", "(1, 2)"),
    (r"\boxed{7}", "7"),
    ("$7$", "7"),
    (r"3\sqrt{3}", r"\sqrt{27}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    ("(x+2)(x-2)", "(x-2)(x+2)"),  # a product of groups is no tuple: factored forms in either order
    ("(2x-5)(x+3)", "2x^2+x-15"),
    ("(5)", "5"),  # parentheses around one value only group it
    (r"2\sqrt[3]{2}", r"\sqrt[3]{16}"),  # a cube root survives the \sqrt2 shorthand rule
    (r"\text{(C)}", "C"),
    (r"1\,000", "1000"), (r"5\,\text{cm}", "5"), (r"2\,\sqrt{3}", r"2\sqrt{3}"),  # LaTeX spacing
    (r"\frac{1}{2}\quad", "0.5"), (r"3\:", "3"), (r"x \qquad", "x"),
    ("08", "8"), ("007", "7"), ("0.05", r"\frac{1}{20}"),  # leading zeros: 08 is eight, not 0·8
    (r"\left(2^{1024}\right)^{2}", "2^{2048}"), (r"(10^{400})^{1}", "10^{400}"),  # bases past a float's range
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
]
DIFFERENT = [
    ("3", "4"),
    ("(2,5)", "[2,5)"),  # open vs half-open
    ("[2,5]", "[2,5)"),
    (r"\frac{1}{3}", "0.333"),  # a rounded decimal is not the fraction
    ("(1,2)", "(2,1)"),
    ("(1,2)", "(1,2,3)"),
    ("2x", "2y"),
    (r"\sqrt{2}", "1.414"),
    ("5", "-5"),
    ("12", "1.2"),
    (r"\text{odd}", r"\text{even}"),
    ("1000000007", "1000000008"),  # exact numbers that differ are different, however large
    (r"10^{10}+1", r"10^{10}"),
    ("(x+1)(x-2)", "(x-1)(x+2)"),
    ("(1,2)", "1"),
    ("2, 3", "23"),  # a list of two solutions is not the number twenty-three
    ("2,3", "3,2"),  # lists compare in order, as in Minerva's check
    # A decimal is exact as written: no tolerance makes a rounded or nearby decimal right.
    ("0.3333333333", r"\frac{1}{3}"), ("1000000008.0", "1000000007"), ("2000000.001", "2000000"),
    ("3.14159265359", r"\pi"), ("0.000000001", "0"), ("1.41421356237", r"\sqrt{2}"),
    ("08", "0"), ("0012", "0"),  # Python would read 08 as 0 times 8
    ("10112", "1011_2"),  # a base subscript is not a digit separator
]


@pytest.mark.parametrize("predicted,gold", EQUIVALENT)
def test_math_equivalent_pairs(predicted, gold):
    assert minerva_math.is_equiv(predicted, gold), (minerva_math.normalize_final_answer(predicted),
                                                    minerva_math.normalize_final_answer(gold))
    assert minerva_math.is_equiv(gold, predicted)


@pytest.mark.parametrize("predicted,gold", DIFFERENT)
def test_math_different_pairs(predicted, gold):
    assert not minerva_math.is_equiv(predicted, gold)
    assert not minerva_math.is_equiv(gold, predicted)


def test_minerva_normalisation_steps():
    norm = minerva_math.normalize_final_answer
    assert norm(r"5 \text{ dollars}") == "5" and norm(r"\text{an apple}") == "apple"  # Minerva drops "an "
    assert norm(r"x = \frac{a}{b}") == r"\frac{a}{b}"
    assert norm("100,000") == "100000"
    assert norm(r"\frac{\sqrt{3}}{2}") == r"\frac{\sqrt{3}}{2}"
    assert norm(r"\sqrt3") == r"\sqrt{3}"
    assert norm(r"\sqrt[3]{2}") == r"\sqrt[3]{2}"


def test_math_extraction_and_gold():
    completion = " The domain is $[2,5)$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."
    assert minerva_math.extract_answer(completion) == "$[2,5)$"
    cut_at_stop = " So $n = 16$.\nFinal Answer: The final answer is $16$. "  # the stop string was removed
    assert minerva_math.extract_answer(cut_at_stop) == "$16$"
    assert minerva_math.extract_answer(r" so the answer is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert minerva_math.extract_answer(" no idea") is None
    assert minerva_math.extract_answer(r" so $\boxed{}$.") is None
    # Only Minerva's line is the answer: "the final answer is" in the reasoning is not.
    reasoned = (" At first I thought the final answer is 4.\nBut I double counted: $6$.\n"
                "Final Answer: The final answer is $6$. ")
    assert minerva_math.extract_answer(reasoned) == "$6$"
    assert minerva_math.extract_answer(" Since $x<0$, the final answer is negative. So $\\boxed{-3}$.") == "-3"
    ran_on = ("Final Answer: The final answer is $5$.\nBut $2+4$ is $6$.\n"
              "Final Answer: The final answer is $6$.")  # the first answer is graded, as Minerva's search does
    assert minerva_math.extract_answer(ran_on) == "$5$"
    assert minerva_math.gold_answer(r"Thus $x = \boxed{\frac{\sqrt{3}}{2}}$ and $\boxed{5}$.") == "5"
    assert minerva_math.gold_answer(r"Thus $\boxed{\frac{\sqrt{3}}{2}}$.") == r"\frac{\sqrt{3}}{2}"
    assert minerva_math.last_boxed(r"\boxed 5$") == "5"
    with pytest.raises(ValueError, match="boxed"):
        minerva_math.gold_answer("no box")


def test_math_prompt_is_minervas_four_shot():
    prompt = minerva_math.build_prompt("What is $1+1$?")
    assert prompt.count("Problem:\n") == 5 and prompt.count("I hope it is correct.") == 4
    assert prompt.endswith("Problem:\nWhat is $1+1$?\n\nSolution:")
    # Minerva's text, spacing included: the fourth problem breaks its line before "find" (a model continues
    # the layout it is shown).
    assert "are both nonzero,\nfind $\\frac{a}{b},$" in prompt and "\n\n$$-\\frac{3}{2}a=b" in prompt


@pytest.mark.parametrize("module", [gsm8k, minerva_math])
def test_a_problem_is_never_its_own_exemplar(module):
    # Its worked solution and answer would sit in the prompt: the next exemplar takes its place, if any.
    own = module.EXEMPLARS[1][0]
    prompt = module.build_prompt("  " + own.replace(" ", "  ") + "\n", 2)
    assert module.EXEMPLARS[1][1] not in prompt
    assert module.EXEMPLARS[0][1] in prompt and module.EXEMPLARS[2][1] in prompt
    assert module.EXEMPLARS[-1][1] not in module.build_prompt(module.EXEMPLARS[-1][0])


def test_symbolic_equality_is_bounded():
    assert latex_to_python(r"\frac{1}{\sqrt{2}}") == "((1)/(((2)**(1/(2)))))"
    assert not symbolic_equal("x" * 500, "x" * 500)  # too long: not attempted (exact match handles equal strings)
    assert not symbolic_equal(r"\unknown{3}", "3")  # unreadable LaTeX is "not shown equal"
    assert not symbolic_equal("(x+1)^(10**9)", "1", timeout_s=0.5)  # gives up, does not hang


def test_a_models_answer_never_reaches_python_attributes():
    # SymPy's parser evaluates Python; "(1).__class__" would be the class One, and worse is reachable.
    for answer in ["(1).__class__", "(1) . real", "x.__dict__", "__import__"]:
        with pytest.raises(ValueError, match="attribute access"):
            to_sympy(answer)
        assert not symbolic_equal(answer, "1")
    assert symbolic_equal("2.50", r"\frac{5}{2}") and symbolic_equal("x_1 + 1", "1 + x_1")  # decimals, subscripts


def test_what_sympy_deprecates_is_an_unreadable_answer_not_a_console_warning():
    """A tuple inside a product printed SymPy's deprecation text in the middle of an evaluation."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # inputs of this test alone: SymPy caches a product once built, and a cached one warns no more
        assert not symbolic_equal("(w+3)^(10**7)", "1") and not symbolic_equal("v(5,6)", "v")
    assert [str(w.message) for w in caught] == []


def test_a_models_answer_reaches_no_python_function(capsys):
    # SymPy's default namespace holds Python's builtins: eval(chr(..)+..) built any code from letters and digits.
    for answer in ["eval(chr(49)+chr(43)+chr(49))", "print(7)", "open(1)", "len(chr(49))"]:
        assert not symbolic_equal(answer, "2") and not symbolic_equal(answer, "1")
        assert to_sympy(answer).free_symbols  # read as a product of letters, nothing called
    assert capsys.readouterr().out == ""


def test_huge_powers_are_refused_before_evaluation_in_any_thread():
    # Off the main thread there is no alarm, and a big-integer power runs in C holding the GIL (minutes, or
    # memory exhausted): a child process, so that a regression fails on the timeout instead of hanging pytest.
    import subprocess
    import sys
    script = ("import threading\nfrom megamath.evaluation.equivalence import symbolic_equal\nout = []\n"
              "answers = [r'10^{10^{10}}', r'9^{9^{9}}', r'(x+y+z)^{1000}', r'\\frac{1}{2}^{10^{9}}', 'factorial(10^9)']\n"
              "t = threading.Thread(target=lambda: out.extend(symbolic_equal(a, '1') for a in answers))\n"
              "t.start(); t.join(); print(out)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str([False] * 5), done.stderr
    assert symbolic_equal(r"2^{2005}", r"2 \cdot 2^{2004}")  # a power of ordinary size still compares


# ---- voting -----------------------------------------------------------------------------------------------------

def test_majority_vote_and_tie_rule():
    assert majority_vote(["4", "5", "4"], [-9.0, -1.0, -9.0]) == "4"  # most votes beat a higher log-prob
    # 2 votes each: "5"'s samples sum to -3, "4"'s to -6: "5" wins the tie.
    assert majority_vote(["4", "5", "4", "5"], [-3.0, -1.0, -3.0, -2.0]) == "5"
    assert majority_vote(["4", "5"], [-2.0, -2.0]) == "4"  # exact tie: first sampled
    assert majority_vote([None, None], [-1.0, -1.0]) is None
    assert majority_vote([None, "7"], [-1.0, -50.0]) == "7"  # abstentions do not vote
    # Grouped by the task's canonical form: "$1,000" and "1000" are one answer.
    assert majority_vote(["$1,000", "999", "1000"], [-1.0, -0.5, -1.0], gsm8k.normalize_number) == "$1,000"
    with pytest.raises(ValueError):
        majority_vote(["1"], [])


def test_math_votes_pool_equal_numbers_however_written():
    canonical = get_task("math").canonical
    # 1/2 written three ways is three votes for one answer and beats 2/5 written two ways (string keys: a tie of
    # five single votes, won by the first sampled, 0.4).
    answers = ["0.4", "1/2", r"\frac{2}{5}", r"\dfrac12", "0.5"]
    assert majority_vote(answers, [-1.0] * 5, canonical) == "1/2"
    assert canonical(r"\sqrt{8}") == canonical(r"2\sqrt2") and canonical("1,000") == canonical("1000")
    assert canonical(r"\frac{1}{3}") != canonical("0.333") and canonical("x+1") == "x+1"  # not numbers: strings
    assert canonical("1000000000007") != canonical("1000000000008") and canonical("0.25") == canonical(r"\frac14")
    assert canonical("[2,5)") == "[2,5)" and canonical(r"10^{10^{10}}") == r"10^{10^{10}}"  # refused: its string


# ---- readers -----------------------------------------------------------------------------------------------------

def test_math_reader_takes_the_release_layout_and_jsonl(tmp_path):
    for i, (subject, level) in enumerate([("algebra", "Level 2"), ("geometry", "Level 5")]):
        folder = tmp_path / "MATH" / "test" / subject
        folder.mkdir(parents=True)
        (folder / f"{i}.json").write_text(json.dumps({"problem": f"P{i}", "level": level, "type": subject.title(),
                                                      "solution": rf"so $\boxed{{{i + 1}}}$."}))
    problems = get_task("math").read(tmp_path / "MATH")
    assert [(p.id, p.answer, p.meta["level"]) for p in problems] == [("test/algebra/0", "1", "Level 2"),
                                                                     ("test/geometry/1", "2", "Level 5")]
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "P", "solution": r"$\boxed{3}$", "level": "Level 1"})
                                      + "\n")
    assert get_task("math").read(tmp_path / "m.jsonl")[0].answer == "3"
    (tmp_path / "bad.jsonl").write_text('{"problem": "P"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing string field"):
        get_task("math").read(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "2 + \\ud800", "answer": "#### 4"}\n')  # JSON's escape
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field\(s\) question hold a lone surrogate escape"):
        get_task("gsm8k").read(tmp_path / "bad.jsonl")


def test_gsm8k_reader_errors(tmp_path):
    (tmp_path / "g.jsonl").write_text('{"question": "q", "answer": "a #### 5"}\n\nnot json\n')
    with pytest.raises(ValueError, match="g.jsonl:3: invalid JSON"):
        get_task("gsm8k").read(tmp_path / "g.jsonl")
    with pytest.raises(FileNotFoundError):
        get_task("gsm8k").read(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mmlu")


def test_demo_arith_problems_come_from_the_corpus_templates():
    problems = demo_arith.make_problems(70, seed=3)
    assert problems == demo_arith.make_problems(70, seed=3) and problems != demo_arith.make_problems(70, seed=4)
    assert {p["kind"] for p in problems} == set(demo_arith.KINDS)
    for p in problems:  # the answer is the arithmetic the template computed
        if p["kind"] == "linear":
            assert int(p["answer"]) % 7 == 0
        if p["kind"] == "derivative":
            a = int(p["prompt"].rsplit("Let $f(x) = ", 1)[1].split("x^2")[0])
            assert int(p["answer"]) == 2 * a
        if p["kind"] == "lean-add":
            a, b = p["prompt"].rsplit("(", 1)[1].replace(": ℕ)", "").replace("=", "").split("+")
            assert int(p["answer"]) == int(a) + int(b)
    assert demo_arith.extract_answer(" 42$. Divide") == "42" and demo_arith.extract_answer(" x") is None
    assert demo_arith.is_correct("042", "42") and not demo_arith.is_correct(None, "42")
