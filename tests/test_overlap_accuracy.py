"""`megamath overlap-accuracy`: accuracy on hit vs non-hit problems, overall and per level."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamath.cli import main
from megamath.overlap.accuracy import accuracy_by_hit, read_hits, read_results


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def files(tmp_path):
    hits = _write(tmp_path / "hits.jsonl", [
        {"test_id": 0, "field": "problem", "n": 30}, {"test_id": 0, "field": "problem", "n": 30},
        {"test_id": 2, "field": "solution", "n": 30}, {"test_id": 5, "field": "problem", "n": 20}])
    levels = ["Level 1", "Level 1", "Level 5", "Level 5", "Level 5", "Level 1"]
    correct = [True, False, False, True, False, True]
    results = _write(tmp_path / "results.jsonl", [{"id": str(i), "correct": c, "level": lv}
                                                  for i, (c, lv) in enumerate(zip(correct, levels))])
    return tmp_path, hits, results


def test_accuracy_on_hits_and_non_hits(files):
    _, hits, results = files
    rows, unmatched = accuracy_by_hit(read_hits(hits).ids(), read_results(results, "level"))
    by = {r.group: r for r in rows}
    assert [r.group for r in rows] == ["Level 1", "Level 5", "all"] and not unmatched
    # hits: ids 0, 2, 5 (the int test ids match the results' string ids)
    assert (by["all"].hit_n, by["all"].hit_correct, by["all"].nonhit_n, by["all"].nonhit_correct) == (3, 2, 3, 1)
    assert (by["Level 1"].hit_n, by["Level 1"].hit_accuracy, by["Level 1"].nonhit_accuracy) == (2, 1.0, 0.0)
    assert (by["Level 5"].hit_n, by["Level 5"].hit_accuracy, by["Level 5"].nonhit_accuracy) == (1, 0.0, 0.5)
    # narrowed to problem-field 30-gram hits: only id 0
    assert read_hits(hits).ids(fields=["problem"], ns=[30]) == {"0"}


def test_cli_prints_the_table(files, capsys):
    _, hits, results = files
    assert main(["overlap-accuracy", "--hits", str(hits), "--results", str(results), "--by", "level"]) == 0
    out = capsys.readouterr().out
    assert "Level 5" in out and "66.67%" in out and "33.33%" in out


def test_missing_fields_are_clear_errors(files, capsys):
    tmp, hits, results = files
    bad = _write(tmp / "bad.jsonl", [{"id": 1, "acc": 1}])
    assert main(["overlap-accuracy", "--hits", str(hits), "--results", str(bad)]) == 2
    assert "bad.jsonl:1: no 'correct' field" in capsys.readouterr().err
    assert main(["overlap-accuracy", "--hits", str(hits), "--results", str(results), "--by", "type"]) == 2
    assert "no 'type' field" in capsys.readouterr().err
    other = _write(tmp / "other.jsonl", [{"id": "x", "correct": True}])
    assert main(["overlap-accuracy", "--hits", str(hits), "--results", str(other)]) == 2
    assert "no hit test id appears in the results" in capsys.readouterr().err


def _scan_and_join(tmp_path, capsys, test, field: str, n: int, corpus_text: str, task: str, correct: str):
    """overlap of `test` against a one-document corpus, then overlap-accuracy of eval-style results (a problem
    is correct when its answer is `correct`); returns the hits file and the table's last row."""
    from megamath.evaluation.tasks import get_task

    (tmp_path / "corpus").mkdir()
    corpus = _write(tmp_path / "corpus" / "web.jsonl", [{"text": corpus_text}])
    hits = tmp_path / "hits.jsonl"
    assert main(["overlap", "--test", str(test), "--field", field, "--corpus", str(corpus), "--n", str(n),
                 "--workers", "1", "--output", str(hits), "--no-progress"]) == 0
    results = _write(tmp_path / "results.jsonl", [{"id": p.id, "correct": p.answer == correct}
                                                  for p in get_task(task).read(test)])
    capsys.readouterr()
    assert main(["overlap-accuracy", "--hits", str(hits), "--results", str(results)]) == 0
    return hits, capsys.readouterr().out.splitlines()[-1].split()


def test_eval_results_join_the_hits_of_test_files_without_ids(tmp_path, capsys):
    """GSM8K's and MATH's jsonl records have no id field: megamath overlap names them by 0-based position, so
    megamath eval must too, or the README's overlap -> eval -> overlap-accuracy pipeline joins nothing."""
    from megamath.evaluation.tasks import get_task
    from megamath.overlap.ngrams import load_test_items

    gsm8k = _write(tmp_path / "gsm8k.jsonl", [{"question": f"How many apples does person number {i} have now?",
                                               "answer": f"#### {i}"} for i in range(3)])
    math = _write(tmp_path / "math.jsonl", [{"problem": f"Compute {i} + {i}.", "solution": rf"$\boxed{{{2 * i}}}$"}
                                            for i in range(3)])
    for task, path, field in (("gsm8k", gsm8k, "question"), ("math", math, "problem")):
        assert [p.id for p in get_task(task).read(path)] == [str(item.id) for item in load_test_items(path, [field])]
    _, row = _scan_and_join(tmp_path, capsys, gsm8k, "question", 8,
                            "Forum post: How many apples does person number 1 have now? Nobody knows.", "gsm8k", "1")
    assert row == ["all", "1", "100.00%", "2", "0.00%"]


def test_a_filter_naming_nothing_the_overlap_run_checked_is_refused(files, capsys):
    """`--field questoin` or `--n 13` against hits of a run that checked question at n=30 kept no hit line, and
    the table said every problem was clean: the opposite of a contamination finding, from a typo."""
    tmp, hits, results = files
    (tmp / "hits.summary.json").write_text(json.dumps({"fields": ["problem", "solution"], "ns": [20, 30]}))
    argv = ["overlap-accuracy", "--hits", str(hits), "--results", str(results)]
    assert main([*argv, "--field", "problme"]) == 2
    assert capsys.readouterr().err == ("megamath overlap-accuracy: error: --field 'problme': the overlap run "
                                       "checked the fields 'problem', 'solution' (hits.summary.json)\n")
    assert main([*argv, "--n", "13"]) == 2
    assert capsys.readouterr().err == ("megamath overlap-accuracy: error: --n 13: the overlap run checked n = 20, 30 "
                                       "(hits.summary.json)\n")
    assert main([*argv, "--field", "solution", "--n", "20"]) == 0  # checked, and no hit: a real zero
    # A summary that does not cover the hits' own fields is another run's: only the warning then.
    (tmp / "hits.summary.json").write_text(json.dumps({"fields": ["problem"], "ns": [30]}))
    assert main([*argv, "--n", "20"]) == 0
    capsys.readouterr()
    # Nor is one that counts another number of hit lines (two runs into one output, each file whole).
    lines = len(hits.read_text().splitlines())
    (tmp / "hits.summary.json").write_text(json.dumps({"fields": ["problem", "solution"], "ns": [20, 30],
                                                       "hit_lines": lines + 1}))
    assert main([*argv, "--field", "problme"]) == 0
    assert "warning: no hit line has --field 'problme'" in capsys.readouterr().err
    (tmp / "hits.summary.json").write_text(json.dumps({"fields": ["problem", "solution"], "ns": [20, 30],
                                                       "hit_lines": lines}))
    assert main([*argv, "--field", "problme"]) == 2
    capsys.readouterr()
    # Without the summary nothing says what was checked: a filter no hit line matches is a warning.
    (tmp / "hits.summary.json").unlink()
    assert main([*argv, "--field", "problme"]) == 0
    assert "warning: no hit line has --field 'problme' (the hits name the fields 'problem', 'solution')" in \
        capsys.readouterr().err


def test_math_records_named_by_unique_id_join_the_eval_results(tmp_path, capsys):
    """MATH as MATH-500 / PRM800K ship it names each problem by `unique_id` ("test/algebra/1.json") and has no
    `id`: megamath eval uses unique_id, and overlap used the 0-based position, so overlap-accuracy joined nothing
    and blamed the files for describing different test sets."""
    from megamath.evaluation.tasks import get_task
    from megamath.overlap.ngrams import load_test_items

    math = _write(tmp_path / "math500.jsonl", [
        {"problem": f"Find the value of x such that x minus {i} equals zero here.", "answer": str(i),
         "unique_id": f"test/algebra/{100 + i}.json"} for i in range(3)])
    assert [p.id for p in get_task("math").read(math)] == [str(item.id) for item in load_test_items(math, ["problem"])]
    homework = "Homework: Find the value of x such that x minus 2 equals zero here. Thanks!"
    hits, row = _scan_and_join(tmp_path, capsys, math, "problem", 10, homework, "math", "2")
    assert [json.loads(line)["test_id"] for line in hits.read_text().splitlines()] == ["test/algebra/102.json"]
    assert row == ["all", "1", "100.00%", "2", "0.00%"]
