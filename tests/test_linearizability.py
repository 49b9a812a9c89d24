"""The linearizability checker (tests/linearizability.py) on histories whose
verdict is known: made by hand, or generated from a sequential run of the model
with intervals drawn around each call's moment of effect (always
linearizable), then broken by one wrong answer."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from tests.linearizability import UNKNOWN, Call, State, check, check_key


def call(op: str, argument: object, answer: object, invoked: float, completed: float, key: str = "k") -> Call:
    return Call(key, op, argument, answer, invoked, completed)  # type: ignore[arg-type]


def test_a_sequential_history_that_a_single_copy_gives() -> None:
    assert check_key(
        [
            call("set", "a", 1, 0, 1),
            call("get", None, ("a", 1), 2, 3),
            call("cas", (1, "b"), ("applied", 2), 4, 5),
            call("cas", (1, "c"), ("failed", 2), 6, 7),
            call("delete", None, True, 8, 9),
            call("get", None, None, 10, 11),
            call("delete", None, False, 12, 13),
        ]
    )


def test_a_read_that_misses_a_write_completed_before_it_began_is_refused() -> None:
    assert not check_key([call("set", "a", 1, 0, 1), call("get", None, None, 2, 3)])
    assert not check_key([call("set", "a", 1, 0, 1), call("set", "b", 2, 2, 3), call("get", None, ("a", 1), 4, 5)])


def test_a_read_concurrent_with_a_write_may_see_either() -> None:
    for seen in (None, ("a", 1)):
        assert check_key([call("set", "a", 1, 0, 10), call("get", None, seen, 1, 2)])


def test_reads_may_not_go_back_in_time() -> None:
    write = call("set", "a", 1, 0, 10)
    assert check_key([write, call("get", None, None, 1, 2), call("get", None, ("a", 1), 3, 4)])
    assert not check_key([write, call("get", None, ("a", 1), 1, 2), call("get", None, None, 3, 4)])


def test_a_write_of_unknown_outcome_may_or_may_not_have_happened() -> None:
    lost = call("set", "a", UNKNOWN, 0, math.inf)
    assert check_key([lost, call("get", None, None, 5, 6)])
    assert check_key([lost, call("get", None, ("a", 7), 5, 6), call("get", None, ("a", 7), 8, 9)])
    assert not check_key([lost, call("get", None, ("a", 7), 5, 6), call("get", None, ("a", 8), 8, 9)])
    assert not check_key([lost, call("get", None, ("b", 7), 5, 6)])  # a value nobody wrote


def test_keys_are_checked_apart() -> None:
    history = [
        call("set", "a", 1, 0, 1, key="x"),
        call("get", None, ("a", 1), 2, 3, key="x"),
        call("set", "a", 1, 0, 1, key="y"),
        call("get", None, None, 2, 3, key="y"),
    ]
    assert check(history) == ["y"]


# -- generated histories -------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "get", "delete", "cas"]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(0, 25),  # how long before its moment of effect it was invoked (calls 10 apart overlap)
        st.floats(0, 25),  # how long after it, it completed
    ),
    min_size=1,
    max_size=25,
)


def sequential(ops: list[tuple[str, str, float, float]]) -> list[Call]:
    """Run the ops one after another on a single copy (the i-th takes effect at moment 10 * i), answering as
    FluxKV does; each call's interval is drawn around its moment, so they overlap."""
    state: State = None
    revision = 0
    history = []
    for i, (op, value, before, after) in enumerate(ops):
        moment = 10.0 * i
        current = 0 if state is None else state[1]
        answer: object
        argument: object = value
        if op == "set":
            revision += 1
            state, answer = (value, revision), revision
        elif op == "get":
            argument, answer = None, state
        elif op == "delete":
            revision += 1
            argument, answer, state = None, state is not None, None
        else:
            expected = current if i % 2 else current + 1  # half of them fail
            argument = (expected, value)
            if expected == current:
                revision += 1
                state, answer = (value, revision), ("applied", revision)
            else:
                answer = ("failed", current)
        history.append(call(op, argument, answer, moment - before, moment + after))
    return history


@given(OPS)
def test_every_history_made_by_a_single_copy_is_accepted(ops: list[tuple[str, str, float, float]]) -> None:
    assert check_key(sequential(ops))


@given(OPS, st.data())
def test_a_read_of_a_value_never_written_is_refused(
    ops: list[tuple[str, str, float, float]], data: st.DataObject
) -> None:
    history = sequential(ops)
    at = data.draw(st.integers(0, len(history)))
    moment = 10.0 * at + 1
    history.insert(at, call("get", None, ("never written", 1), moment, moment))
    assert not check_key(history)
