"""The rule book: which rule runs a job, by longest matching prefix."""

from __future__ import annotations

from collections.abc import Iterator

from ztick_tw.model import Rule


class RuleBook:
    """Rules by id, indexed by pattern length for a fast longest-prefix match.

    ``match`` looks a job id up once per distinct pattern length, longest first, so it
    costs a handful of dict lookups however many rules there are.  The empty pattern
    matches every job (it is the shortest, so any other matching rule wins).  When two
    rules have the same pattern, the one with the smallest id wins, so the choice does
    not depend on the order rules were set.
    """

    def __init__(self) -> None:
        self._rules: dict[str, Rule] = {}
        # pattern length -> pattern -> rules with that pattern, by id
        self._by_length: dict[int, dict[str, dict[str, Rule]]] = {}
        self._lengths: list[int] = []  # distinct pattern lengths, longest first

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[Rule]:
        """Rules in the order they were first set."""
        return iter(self._rules.values())

    def get(self, rule_id: str) -> Rule | None:
        """The rule with this id, or ``None``."""
        return self._rules.get(rule_id)

    def set(self, rule: Rule) -> None:
        """Add a rule, or replace the rule with the same id."""
        if rule.id in self._rules:
            self._unindex(self._rules[rule.id])
        self._rules[rule.id] = rule
        length = len(rule.pattern)
        patterns = self._by_length.get(length)
        if patterns is None:
            patterns = self._by_length[length] = {}
            self._lengths = sorted(self._by_length, reverse=True)
        patterns.setdefault(rule.pattern, {})[rule.id] = rule

    def remove(self, rule_id: str) -> bool:
        """Delete a rule; ``False`` if there was no such rule."""
        rule = self._rules.pop(rule_id, None)
        if rule is None:
            return False
        self._unindex(rule)
        return True

    def match(self, job_id: str) -> Rule | None:
        """The rule whose pattern is the longest prefix of ``job_id``, or ``None``."""
        size = len(job_id)
        by_length = self._by_length
        for length in self._lengths:
            if length > size:
                continue
            same = by_length[length].get(job_id[:length])
            if same is not None:
                if len(same) == 1:
                    return next(iter(same.values()))
                return same[min(same)]
        return None

    def _unindex(self, rule: Rule) -> None:
        length = len(rule.pattern)
        patterns = self._by_length[length]
        same = patterns[rule.pattern]
        del same[rule.id]
        if not same:
            del patterns[rule.pattern]
            if not patterns:
                del self._by_length[length]
                self._lengths = sorted(self._by_length, reverse=True)
