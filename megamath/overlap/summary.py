"""What an overlap run found: per test item and per corpus subset, printed and saved as JSON.

Counts are per (field, n): a test item "is hit" when at least one corpus document shares an n-gram of
that field with it; "documents hit" counts documents sharing an n-gram with at least one test item
(the figures of LLEMMA's table: 348 MATH problems, 717 OpenWebMath documents at n = 30).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megamath.data.sources import EMPTY_TEXT, InputGroup, skipped_counts


@dataclass
class _SubsetStats:
    documents: int = 0
    text_bytes: int = 0
    documents_hit: dict[tuple[int, int], int] = field(default_factory=dict)
    """(field, j) -> documents with at least one hit."""
    items_hit: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    """(field, j) -> test item indices hit."""
    skipped: dict[str, int] = field(default_factory=dict)
    """reason -> corpus lines skipped."""


@dataclass
class OverlapSummary:
    test: str
    fields: tuple[str, ...]
    ns: tuple[int, ...]
    ids: list[Any]
    """Test item ids, by item index."""
    without_ngrams: dict[tuple[int, int], int]
    corpus: list[str]
    subsets: dict[str, _SubsetStats] = field(default_factory=dict)
    items: dict[tuple[int, int, int], dict[str, int]] = field(default_factory=dict)
    """(item, field, j) -> {subset: documents}."""
    skipped: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    text_bytes: int = 0
    hit_lines: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, config, index, groups: list[InputGroup]) -> "OverlapSummary":
        summary = cls(str(config.test), index.fields, index.ns, [item.id for item in index.items],
                      dict(index.without_ngrams), [str(c) for c in config.corpus])
        for group in groups:
            summary.subsets.setdefault(group.subset or group.name, _SubsetStats())
        return summary

    def add_batch(self, group: InputGroup, result, hits: dict[tuple[int, int, int, int], Any]) -> None:
        name = group.subset or group.name
        stats = self.subsets[name]
        stats.documents += result.documents
        stats.text_bytes += result.text_bytes
        self.documents += result.documents
        self.text_bytes += result.text_bytes
        self.hit_lines += len(hits)
        for _, reason, _ in result.bad:
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        docs_per_key: dict[tuple[int, int], set[int]] = {}
        for line, item, fld, j in hits:
            docs_per_key.setdefault((fld, j), set()).add(line)
            stats.items_hit.setdefault((fld, j), set()).add(item)
            per_subset = self.items.setdefault((item, fld, j), {})
            per_subset[name] = per_subset.get(name, 0) + 1
        for key, lines in docs_per_key.items():
            stats.documents_hit[key] = stats.documents_hit.get(key, 0) + len(lines)

    def check_scanned(self, json_key: str) -> None:
        """Refuse a subset whose every line was skipped (e.g. a wrong --json-key): its '0 items hit' would
        read as a clean corpus. Empty texts alone are no fault: there was nothing to scan."""
        for name, stats in self.subsets.items():
            if not stats.documents and set(stats.skipped) - {EMPTY_TEXT}:
                raise ValueError(f"{name}: every corpus line was skipped ({skipped_counts(stats.skipped)}); nothing written: check "
                                 f"--json-key {json_key!r} and the corpus")

    def _keys(self) -> list[tuple[int, int]]:
        return [(f, j) for f in range(len(self.fields)) for j in range(len(self.ns))]

    def to_json(self) -> dict:
        """The summary file's content (`HITS.summary.json`)."""
        totals = []
        for f, j in self._keys():
            hit = {item for (item, ff, jj) in self.items if (ff, jj) == (f, j)}
            totals.append({"field": self.fields[f], "n": self.ns[j], "test_items": len(self.ids),
                           "items_hit": len(hit),
                           "documents_hit": sum(s.documents_hit.get((f, j), 0) for s in self.subsets.values()),
                           "items_without_ngrams": self.without_ngrams.get((f, j), 0)})
        subsets = []
        for name, stats in self.subsets.items():
            for f, j in self._keys():
                subsets.append({"subset": name, "field": self.fields[f], "n": self.ns[j],
                                "documents": stats.documents, "text_bytes": stats.text_bytes,
                                "items_hit": len(stats.items_hit.get((f, j), ())),
                                "documents_hit": stats.documents_hit.get((f, j), 0)})
        items = [{"test_id": self.ids[item], "field": self.fields[f], "n": self.ns[j],
                  "documents": sum(per_subset.values()), "by_subset": dict(sorted(per_subset.items()))}
                 for (item, f, j), per_subset in sorted(self.items.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0]))]
        return {"test": self.test, "fields": list(self.fields), "ns": list(self.ns), "corpus": self.corpus,
                "documents": self.documents, "text_bytes": self.text_bytes, "hit_lines": self.hit_lines,
                "seconds": round(self.seconds, 3), "mb_per_s": round(self.text_bytes / max(self.seconds, 1e-9) / 1e6, 2),
                "skipped_lines": self.skipped, "totals": totals, "subsets": subsets, "items": items}

    def format(self, max_items: int = 20) -> str:
        """The printed summary: per subset, totals per field and n, and the most-hit items."""
        data = self.to_json()
        header = ("subset", "field", "n", "documents", "text MB", "items hit", "documents hit")
        rows = [(s["subset"], s["field"], str(s["n"]), f"{s['documents']:,}", f"{s['text_bytes'] / 1e6:,.1f}",
                 f"{s['items_hit']:,}", f"{s['documents_hit']:,}") for s in data["subsets"]]
        rows += [("total", t["field"], str(t["n"]), f"{self.documents:,}", f"{self.text_bytes / 1e6:,.1f}",
                  f"{t['items_hit']:,}", f"{t['documents_hit']:,}") for t in data["totals"]]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for t in data["totals"]:
            lines.append(f"{t['field']} n={t['n']}: {t['items_hit']:,} of {t['test_items']:,} test items hit by "
                         f"{t['documents_hit']:,} documents ({t['items_without_ngrams']:,} items have fewer than "
                         f"{t['n']} words and cannot hit)")
        top = sorted(data["items"], key=lambda it: -it["documents"])[:max_items]
        if top:
            lines.append(f"most-hit test items (of {len(data['items']):,} hit (item, field, n)):")
            lines += [f"  id {it['test_id']!r} {it['field']} n={it['n']}: {it['documents']:,} documents "
                      f"({', '.join(f'{k} {v:,}' for k, v in it['by_subset'].items())})" for it in top]
        if self.skipped:
            lines.append("skipped corpus lines: " + ", ".join(f"{r}: {c:,}" for r, c in sorted(self.skipped.items())))
        lines.append(f"{self.text_bytes / 1e6:,.1f} MB of text, {self.documents:,} documents in {self.seconds:,.1f} s: "
                     f"{data['mb_per_s']:,.1f} MB/s")
        return "\n".join(lines)
