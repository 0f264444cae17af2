"""Single flight: concurrent calls for one key share one run; nothing else is shared."""

from __future__ import annotations

import asyncio

import pytest

from shardd.coalesce import SingleFlight


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
