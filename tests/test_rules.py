"""Tests for ``ztick_tw.scheduler.rules.RuleBook``: longest-prefix rule matching."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from ztick_tw.model import Rule, ShellSpec
from ztick_tw.scheduler.rules import RuleBook


def rule(rule_id: str, pattern: str) -> Rule:
    """A shell rule with a command naming the rule."""
    return Rule(rule_id, pattern, ShellSpec(f"run {rule_id}"))


def reference_match(rules: dict[str, Rule], job_id: str) -> Rule | None:
    """The obvious definition: longest matching pattern, ties to the smallest id."""
    matching = [r for r in rules.values() if job_id.startswith(r.pattern)]
    if not matching:
        return None
    return min(matching, key=lambda r: (-len(r.pattern), r.id))


def test_empty_book_matches_nothing() -> None:
    """With no rules, no job has a rule."""
    book = RuleBook()
    assert book.match("anything") is None
    assert book.match("") is None
    assert len(book) == 0


def test_prefix_match() -> None:
    """A rule matches a job whose id starts with its pattern, and no other."""
    book = RuleBook()
    book.set(rule("r", "backup."))
    r = book.get("r")
    assert book.match("backup.daily") is r
    assert book.match("backup.") is r
    assert book.match("backup") is None
    assert book.match("xbackup.daily") is None


def test_pattern_is_literal_not_glob() -> None:
    """``*`` in a pattern is a literal character, not a wildcard."""
    book = RuleBook()
    book.set(rule("r", "a*"))
    assert book.match("abc") is None
    assert book.match("a*c") is book.get("r")


def test_longest_prefix_wins() -> None:
    """When several patterns match, the longest one wins, whatever the set order."""
    book = RuleBook()
    book.set(rule("long", "app.db."))
    book.set(rule("short", "app."))
    book.set(rule("mid", "app.d"))
    assert book.match("app.db.backup") == rule("long", "app.db.")
    assert book.match("app.dx") == rule("mid", "app.d")
    assert book.match("app.web") == rule("short", "app.")


def test_empty_pattern_matches_everything_but_loses_to_others() -> None:
    """The empty pattern matches every job id (even the empty one) but is the shortest."""
    book = RuleBook()
    book.set(rule("all", ""))
    assert book.match("x") == rule("all", "")
    assert book.match("") == rule("all", "")
    book.set(rule("x", "x"))
    assert book.match("xy") == rule("x", "x")
    assert book.match("y") == rule("all", "")


def test_equal_patterns_smallest_id_wins() -> None:
    """Rules with the same pattern: the smallest rule id wins, regardless of set order."""
    book = RuleBook()
    book.set(rule("b", "job"))
    book.set(rule("c", "job"))
    book.set(rule("a", "job"))
    assert book.match("job1") == rule("a", "job")
    book.remove("a")
    assert book.match("job1") == rule("b", "job")


def test_replace_rule_reindexes_pattern() -> None:
    """Setting a rule id again replaces its pattern and runner everywhere."""
    book = RuleBook()
    book.set(rule("r", "old."))
    book.set(Rule("r", "new.", ShellSpec("other")))
    assert len(book) == 1
    assert book.match("old.1") is None
    assert book.match("new.1") == Rule("r", "new.", ShellSpec("other"))
    # same pattern, new runner
    book.set(Rule("r", "new.", ShellSpec("third")))
    assert book.match("new.1") == Rule("r", "new.", ShellSpec("third"))


def test_remove() -> None:
    """``remove`` deletes a rule and reports whether it existed."""
    book = RuleBook()
    book.set(rule("r", "p"))
    assert book.remove("r") is True
    assert book.remove("r") is False
    assert book.match("p1") is None
    assert book.get("r") is None
    assert len(book) == 0


def test_iteration_is_first_set_order() -> None:
    """Iterating yields rules in the order they were first set; a replace keeps the place."""
    book = RuleBook()
    book.set(rule("z", "1"))
    book.set(rule("a", "2"))
    book.set(rule("m", "3"))
    book.set(rule("z", "4"))
    assert [r.id for r in book] == ["z", "a", "m"]
    assert book.get("z") == rule("z", "4")


def test_unicode_prefixes() -> None:
    """Prefixes are compared by characters, so non-ASCII ids match correctly."""
    book = RuleBook()
    book.set(rule("r", "jöb"))
    assert book.match("jöb.1") == rule("r", "jöb")
    assert book.match("job.1") is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "set", "remove"]),
            st.sampled_from("abcdef"),
            st.text(alphabet="xy", max_size=4),
        ),
        max_size=40,
    ),
    st.lists(st.text(alphabet="xy", max_size=6), min_size=1, max_size=10),
)
def test_matches_reference_model(ops: list[tuple[str, str, str]], job_ids: list[str]) -> None:
    """After any sequence of sets and removes, ``match`` agrees with a brute-force search."""
    book = RuleBook()
    model: dict[str, Rule] = {}
    for op, rule_id, pattern in ops:
        if op == "set":
            book.set(rule(rule_id, pattern))
            model[rule_id] = rule(rule_id, pattern)
        else:
            assert book.remove(rule_id) == (model.pop(rule_id, None) is not None)
        assert len(book) == len(model)
    for job_id in job_ids:
        assert book.match(job_id) == reference_match(model, job_id)


def test_many_rules_random() -> None:
    """A seeded random mix of thousands of rules still matches the brute-force answer."""
    rnd = random.Random(1234)
    book = RuleBook()
    model: dict[str, Rule] = {}
    for i in range(3000):
        rule_id = f"r{rnd.randrange(500)}"
        if rnd.random() < 0.2:
            book.remove(rule_id)
            model.pop(rule_id, None)
        else:
            pattern = "".join(rnd.choice("ab.") for _ in range(rnd.randrange(6)))
            book.set(rule(rule_id, pattern))
            model[rule_id] = rule(rule_id, pattern)
        if i % 100 == 0:
            for _ in range(20):
                job_id = "".join(rnd.choice("ab.") for _ in range(rnd.randrange(8)))
                assert book.match(job_id) == reference_match(model, job_id)
