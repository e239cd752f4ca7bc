"""Multi-process jobs under ``fmi run``: every call checked against numpy references
(tests/workers/suites.py)."""

from __future__ import annotations

import pytest

from conftest import HERE

SUITES = HERE / "workers" / "suites.py"


def assert_all_ok(out: str, ranks: int, suite: str) -> None:
    for r in range(ranks):
        line = f"[{r}] rank {r}/{ranks}: {suite} ok"
        assert line in out.splitlines(), f"missing {line!r} in:\n{out}"


@pytest.mark.parametrize("suite", ["p2p", "objects", "buffers", "userops", "errors"])
def test_suite_on_four_ranks(run_job, suite: str) -> None:
    assert_all_ok(run_job(4, SUITES, suite), 4, suite)


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_all_suites_on_other_sizes(run_job, ranks: int) -> None:
    suites = ["p2p", "objects", "buffers", "userops", "errors"]
    out = run_job(ranks, SUITES, *suites)
    for suite in suites:
        assert_all_ok(out, ranks, suite)
