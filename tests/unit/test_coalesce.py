"""Single flight: concurrent calls for one key share one run; nothing else is shared.
Groups: items that come while their group waits to start share its one run."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram

from shardd import errors
from shardd.coalesce import GroupFailed, Groups, SingleFlight
from shardd.dataplane import _again_alone


def test_concurrent_calls_share_one_run_and_later_ones_start_anew() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        runs = 0
        release = asyncio.Event()

        async def query() -> int:
            nonlocal runs
            runs += 1
            await release.wait()
            return runs

        waiting = [asyncio.create_task(flights.run("k", query)) for _ in range(10)]
        other = asyncio.create_task(flights.run("other", query))
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*waiting) == [1] * 10
        assert await other == 2  # another key: a run of its own
        assert await flights.run("k", query) == 3  # the flight landed: a new run

    asyncio.run(scenario())


def test_a_failure_reaches_every_caller_and_a_caller_leaving_stops_nobody() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        release = asyncio.Event()

        async def failing() -> int:
            await release.wait()
            raise LookupError("shard down")

        callers = [asyncio.create_task(flights.run("k", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        callers[0].cancel()  # the caller that started the query goes away
        release.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert all(isinstance(o, LookupError) for o in outcomes[1:])

        async def fine() -> int:
            return 7

        assert await flights.run("k", fine) == 7

    asyncio.run(scenario())


@pytest.mark.parametrize("callers", [1, 5])
def test_the_answer_is_the_one_run_s(callers: int) -> None:
    async def scenario() -> list[object]:
        flights: SingleFlight[int, object] = SingleFlight()
        answer = object()

        async def query() -> object:
            await asyncio.sleep(0)
            return answer

        results = await asyncio.gather(*(flights.run(1, query) for _ in range(callers)))
        return [r is answer for r in results]

    assert asyncio.run(scenario()) == [True] * callers


def groups(max_size: int = 100) -> tuple[Groups[str, str, list[str]], Gauge, Histogram]:
    registry = CollectorRegistry()
    waiting = Gauge("waiting", "", registry=registry)
    sizes = Histogram("sizes", "", buckets=(1, 2, 4), registry=registry)
    return Groups(max_size=max_size, max_weight=100, waiting=waiting, sizes=sizes), waiting, sizes


def test_items_that_come_while_a_group_waits_share_its_run_and_later_ones_start_anew() -> None:
    async def scenario() -> None:
        grouping, waiting, sizes = groups()
        turn = asyncio.Event()  # the group's turn: a connection in hand
        runs: list[list[str]] = []

        async def run(take: object) -> list[str]:
            await turn.wait()
            items = take()  # type: ignore[operator]
            assert take() is items  # taken once: the same items when sent again
            runs.append(list(items))
            return [item.upper() for item in items]

        first = [
            asyncio.create_task(grouping.submit("s1", item, run, deadline=1.0)) for item in "abc"
        ]
        other = asyncio.create_task(grouping.submit("s2", "x", run, deadline=1.0))
        await asyncio.sleep(0)
        assert waiting._value.get() == 4
        turn.set()
        assert await asyncio.gather(*first) == [(["A", "B", "C"], i) for i in range(3)]
        assert await other == (["X"], 0)  # another key: a group of its own
        assert waiting._value.get() == 0
        assert sorted(runs) == [["a", "b", "c"], ["x"]]
        assert await grouping.submit("s1", "d", run, deadline=1.0) == (
            ["D"],
            0,
        )  # started: a new group
        assert sizes._sum.get() == 5

    asyncio.run(scenario())


def test_a_full_group_closes() -> None:
    async def scenario() -> None:
        grouping, _, _ = groups(max_size=2)
        turn = asyncio.Event()

        async def run(take: object) -> list[str]:
            await turn.wait()
            return list(take())  # type: ignore[operator]

        tasks = [
            asyncio.create_task(grouping.submit("s1", item, run, deadline=1.0)) for item in "abcde"
        ]
        await asyncio.sleep(0)
        turn.set()
        assert [await task for task in tasks] == [
            (["a", "b"], 0),
            (["a", "b"], 1),
            (["c", "d"], 0),
            (["c", "d"], 1),
            (["e"], 0),
        ]

    asyncio.run(scenario())


def test_a_failure_is_the_item_s_own_alone_and_a_group_failure_otherwise() -> None:
    async def scenario() -> None:
        grouping, waiting, _ = groups()
        turn = asyncio.Event()

        async def failing(take: object) -> list[str]:
            await turn.wait()
            take()  # type: ignore[operator]
            raise LookupError("slot 7 is frozen")

        shared = [
            asyncio.create_task(grouping.submit("s1", item, failing, deadline=1.0)) for item in "ab"
        ]
        await asyncio.sleep(0)
        shared[0].cancel()  # the caller whose item opened the group goes away
        turn.set()
        outcomes = await asyncio.gather(*shared, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert isinstance(outcomes[1], GroupFailed)
        assert isinstance(outcomes[1].__cause__, LookupError)
        with pytest.raises(LookupError):  # alone: its own failure, as it is
            await grouping.submit("s1", "c", failing, deadline=1.0)

        async def before_sending(take: object) -> list[str]:
            await turn.wait()
            raise LookupError("no primary")  # fails without taking the group

        with pytest.raises(LookupError):
            await grouping.submit("s2", "d", before_sending, deadline=1.0)
        unsent = [grouping.submit("s3", item, before_sending, deadline=1.0) for item in "ef"]
        outcomes = await asyncio.gather(*unsent, return_exceptions=True)
        assert all(isinstance(o, GroupFailed) and not o.sent for o in outcomes)
        assert all(isinstance(o, GroupFailed) and o.deadline == 1.0 for o in outcomes)
        assert waiting._value.get() == 0

    asyncio.run(scenario())


def test_an_earlier_deadline_opens_a_group_of_its_own_and_weight_closes_one() -> None:
    async def scenario() -> None:
        grouping, _, _ = groups()
        turn = asyncio.Event()

        async def run(take: object) -> list[str]:
            await turn.wait()
            return list(take())  # type: ignore[operator]

        late = asyncio.create_task(grouping.submit("s1", "late", run, deadline=9.0))
        await asyncio.sleep(0)
        early = asyncio.create_task(grouping.submit("s1", "early", run, deadline=3.0))
        await asyncio.sleep(0)
        after = asyncio.create_task(grouping.submit("s1", "after", run, deadline=5.0))
        heavy = asyncio.create_task(grouping.submit("s2", "heavy", run, deadline=1, weight=100))
        await asyncio.sleep(0)
        light = asyncio.create_task(grouping.submit("s2", "light", run, deadline=1, weight=1))
        await asyncio.sleep(0)
        half = asyncio.create_task(grouping.submit("s3", "half", run, deadline=1, weight=60))
        await asyncio.sleep(0)
        more = asyncio.create_task(grouping.submit("s3", "more", run, deadline=1, weight=60))
        await asyncio.sleep(0)
        turn.set()
        # A group runs under its earliest deadline: "early" did not join "late"'s.
        assert await late == (["late"], 0)
        assert await early == (["early", "after"], 0)
        assert await after == (["early", "after"], 1)
        assert await heavy == (["heavy"], 0)  # full by weight
        assert await light == (["light"], 0)
        assert await half == (["half"], 0)  # "more" would take it past max_weight
        assert await more == (["more"], 0)

    asyncio.run(scenario())


def test_a_group_cancelled_before_it_began_answers_its_items() -> None:
    async def scenario() -> None:
        grouping, waiting, _ = groups()

        async def run(take: object) -> list[str]:
            return list(take())  # type: ignore[operator]

        items = [asyncio.create_task(grouping.submit("s1", i, run, deadline=1.0)) for i in "ab"]
        await asyncio.sleep(0)
        for task in list(grouping._tasks):
            task.cancel()  # before its first step: its code never runs
        outcomes = await asyncio.wait_for(asyncio.gather(*items, return_exceptions=True), 5)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert waiting._value.get() == 0
        assert await grouping.submit("s1", "c", run, deadline=1.0) == (["c"], 0)

    asyncio.run(scenario())


def failed_group(cause: BaseException, *, sent: bool = True, deadline: float = 5.0) -> GroupFailed:
    try:
        raise GroupFailed(str(cause), sent=sent, deadline=deadline) from cause
    except GroupFailed as failed:
        return failed


@pytest.mark.parametrize(
    ("cause", "sent", "own_deadline", "alone"),
    [
        (errors.OutcomeUnknown("maybe"), True, 9.0, False),  # it may have committed
        (errors.OutcomeUnknown("maybe"), False, 9.0, True),  # never sent: nothing was
        (errors.StaleMap("slot 7 is frozen"), True, 5.0, True),  # maybe another's slot
        (errors.ConflictRetry("lock_timeout"), True, 5.0, True),  # maybe another's row
        (errors.ShardUnavailable("s1", "no primary"), True, 5.0, False),  # its answer too
        (errors.ShardUnavailable("s1", "no primary"), True, 9.0, True),  # it has more time
        (errors.WritesRefused("s1", "no_sync_standby"), True, 5.0, False),
        # Never sent (no primary until the group's deadline): only a later deadline helps.
        (errors.ShardUnavailable("s1", "no primary"), False, 5.0, False),
        (errors.ShardUnavailable("s1", "no primary"), False, 9.0, True),
        (RuntimeError("a bug"), True, 9.0, False),  # nobody knows what was written
    ],
)
def test_a_write_goes_again_alone_only_when_nothing_was_written(
    cause: BaseException, sent: bool, own_deadline: float, alone: bool
) -> None:
    assert _again_alone(failed_group(cause, sent=sent), own_deadline) is alone
