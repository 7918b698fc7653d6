"""The result of converting another trainer's config: megamath's config, and every key left behind with why.

A conversion never drops a key silently. A key is either mapped (it sets a megamath field, maybe with a
note on how the two differ), listed as unmapped with its reason, or an error naming it when megamath
cannot train what it describes (pipeline parallelism, dropout, another architecture): a config that
converted is one megamath trains as the source described, up to the notes.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Callable

import yaml

from megamath.data.blending import parse_data_path
from megamath.data.splits import parse_split, part_names
from megamath.training.config import TrainConfig

# Reasons an unmapped key is listed with.
NO_EQUIVALENT = "no equivalent"
NOT_NEEDED = "not needed"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Unmapped:
    key: str
    kind: str
    """NO_EQUIVALENT, NOT_NEEDED or UNSUPPORTED."""
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.kind}: {self.reason}"


@dataclass
class Conversion:
    config: dict
    """The raw mapping of a megamath training config (what a YAML file holds)."""
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Mapped keys whose meaning differs in some detail, said once each."""
    source: str = ""

    def validate(self) -> TrainConfig:
        """The config as `megamath train --config` reads it (raises ValueError when it would be refused)."""
        return TrainConfig.from_dict(self.config)

    def report(self) -> str:
        lines = [f"notes ({len(self.notes)}):"] + [f"  - {n}" for n in self.notes]
        lines += [f"not converted ({len(self.unmapped)}):"] + [f"  - {u}" for u in self.unmapped]
        return "\n".join(lines)

    def to_yaml(self) -> str:
        """The config as YAML, headed by where it came from, and followed by the report as comments."""
        head = f"# Converted by `megamath config` from {self.source}.\n" if self.source else ""
        order = [f.name for f in dataclasses.fields(TrainConfig)]
        ordered = {k: self.config[k] for k in sorted(self.config, key=lambda k: order.index(k) if k in order else 99)}
        body = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
        tail = "".join(f"# {line}\n" for line in self.report().splitlines())
        return head + body + tail


class Keys:
    """The source's keys, each taken at most once; what is never taken is reported as unmapped."""

    def __init__(self, raw: dict) -> None:
        self.raw = dict(raw)
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def take(self, key: str, default=None):
        self.taken.add(key)
        return self.raw.get(key, default)

    def untaken(self) -> list[str]:
        return [k for k in self.raw if k not in self.taken]

    def check_spelling(self, spell: Callable[[str], str],
                       known: Callable[[str, str], bool] = lambda key, close: False) -> None:
        """Refuse an unread key that is one slip away from a key the conversion reads and the source lacks.

        Why: such a key is almost surely a typo of that one (`tensor_model_paralel_size`), and listing it as
        "not converted" would drop its setting while the conversion went on (TP silently 1); Megatron-LM's
        own argument parser refuses it too. `spell` writes a key as the user wrote it (`--flag-name`); `known(key,
        close)` says that the key is a real one the converter lists, not a typo of `close` (Megatron-LM's
        `mtp_hybrid_override_pattern` beside `hybrid_override_pattern`)."""
        wanted = [k for k in self.taken if k not in self.raw]
        for key in self.untaken():
            close = difflib.get_close_matches(key, wanted, n=1, cutoff=0.9)
            if close and not known(key, close[0]):
                raise ValueError(f"{spell(key)} is not a key this converter knows; did you mean {spell(close[0])}? "
                                 "(as written it would be left out, and its setting lost)")


class UnmappedTable:
    """The keys a converter knows and does not map, each with (kind, reason): by name, or by the prefix of a
    family of settings that only act with a switch megamath refuses (`moe_` without experts)."""

    def __init__(self, by_name: dict[str, tuple[str, str]], families: dict[str, str]) -> None:
        self.by_name, self.families = by_name, families

    def _family(self, key: str) -> str | None:
        return next((prefix for prefix in self.families if key.startswith(prefix)), None)

    def reason(self, key: str) -> tuple[str, str] | None:
        """(kind, reason) of `key`, or None for a key the converter does not know."""
        family = self._family(key)
        return self.by_name.get(key, (NOT_NEEDED, self.families[family]) if family else None)

    def not_a_typo(self, key: str, close: str) -> bool:
        """Whether `key`, one slip away from `close` (a key the converter reads), is a real key this table lists:
        by name, or in a family of settings other than `close`'s (a slip inside a family stays a typo)."""
        family = self._family(key)
        return key in self.by_name or (family is not None and not close.startswith(family))


def held_out_set_names(words: list[str]) -> dict:
    """{report name: prefix} of validation or test data given as prefixes, or as a blend's weights and prefixes
    (each set is reported on its own, so the weights drop): `.../arxiv_validation_text_document` -> `arxiv`."""
    prefixes = words[1::2] if len(words) > 1 and is_number(words[0]) else words
    suffixes = ("_text_document", "_document", "_validation", "_valid", "_val", "_test")
    return dict(zip(part_names(prefixes, suffixes=suffixes), prefixes))


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def held_out_sets(data: dict) -> int:
    """How many validation sets data.split cuts out of a converted `data` section: one per data_path prefix when
    its validation share is not 0."""
    if data.get("split") is None or not data.get("data_path"):
        return 0
    prefixes = parse_data_path([str(item) for item in data["data_path"]])[1]  # [PREFIX] or [W1, PREFIX1, ...]
    return len(set(prefixes)) if parse_split(data["split"])[1] > 0 else 0
