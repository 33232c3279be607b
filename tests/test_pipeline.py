"""The ordered operation pipeline: order, back-pressure, failure."""

import asyncio
import threading

import pytest

from cispo.service.pipeline import OperationPipeline


def test_runs_in_submission_order_one_at_a_time():
    async def main():
        pipeline = OperationPipeline(capacity=4)
        pipeline.start()
        seen, active = [], []

        def op(i):
            def run():
                active.append(i)
                assert len(active) == 1
                seen.append(i)
                active.pop()
                return i * i

            return run

        futures = [await pipeline.submit(op(i)) for i in range(20)]
        results = [await f for f in futures]
        await pipeline.close()
        return seen, results

    seen, results = asyncio.run(main())
    assert seen == list(range(20))
    assert results == [i * i for i in range(20)]


def test_submit_waits_when_full_so_readers_stop_reading():
    async def main():
        pipeline = OperationPipeline(capacity=2)
        pipeline.start()
        release = threading.Event()
        running = await pipeline.submit(release.wait)  # occupies the engine thread
        await asyncio.sleep(0.05)
        queued = [await pipeline.submit(lambda: "q") for _ in range(2)]
        blocked = asyncio.ensure_future(pipeline.submit(lambda: "late"))
        await asyncio.sleep(0.1)
        assert not blocked.done() and pipeline.depth == 2
        release.set()
        late = await (await blocked)
        await asyncio.gather(running, *queued)
        await pipeline.close()
        return late

    assert asyncio.run(main()) == "late"


def test_errors_reach_their_caller_and_the_pipeline_goes_on():
    async def main():
        pipeline = OperationPipeline()
        pipeline.start()
        bad = await pipeline.submit(lambda: 1 / 0)
        good = await pipeline.submit(lambda: "ok")
        with pytest.raises(ZeroDivisionError):
            await bad
        value = await good
        await pipeline.close()
        return value

    assert asyncio.run(main()) == "ok"


def test_fail_fails_running_queued_and_later_operations_without_waiting():
    async def main():
        pipeline = OperationPipeline()
        pipeline.start()
        stuck = threading.Event()
        running = await pipeline.submit(stuck.wait)  # e.g. a collective with a dead rank
        queued = await pipeline.submit(lambda: "never")
        await asyncio.sleep(0.05)
        pipeline.fail(RuntimeError("rank 1 lost"))
        for f in (running, queued):
            with pytest.raises(RuntimeError, match="rank 1 lost"):
                await f
        with pytest.raises(RuntimeError, match="rank 1 lost"):
            await pipeline.submit(lambda: "after")
        await asyncio.wait_for(pipeline.close(), 1)
        stuck.set()

    asyncio.run(main())


def test_batchable_operations_share_a_call_without_crossing_other_operations():
    """Samples queued back to back run as one batch (up to the budget); an operation between
    them keeps its place, so no sample sees a step submitted after it."""
    from cispo.service.pipeline import Batchable

    async def main():
        pipeline = OperationPipeline(capacity=4, batch_capacity=16)
        calls, state = [], {"weights": 0}
        release = threading.Event()

        def run_batch(items):
            calls.append(list(items))
            return [ValueError("bad") if item == "bad" else (item, state["weights"]) for item in items]

        def step():
            state["weights"] += 1
            return "stepped"

        blocker = await pipeline.submit(release.wait)  # holds the engine while the queue fills
        pipeline.start()
        futures = [await pipeline.submit(Batchable(i, run_batch, cost=1, budget=3)) for i in ("a", "b", "c", "d")]
        futures.append(await pipeline.submit(step))
        futures += [await pipeline.submit(Batchable(i, run_batch, cost=1, budget=3)) for i in ("e", "bad")]
        assert pipeline.batchable_depth == 6 and pipeline.depth == 7  # the blocker is running
        release.set()
        await blocker
        results = await asyncio.gather(*futures, return_exceptions=True)
        await pipeline.close()
        return calls, results, pipeline.batchable_depth

    calls, results, depth = asyncio.run(main())
    assert calls == [["a", "b", "c"], ["d"], ["e", "bad"]]
    assert results[:6] == [("a", 0), ("b", 0), ("c", 0), ("d", 0), "stepped", ("e", 1)]
    assert isinstance(results[6], ValueError) and depth == 0


def test_lanes_keep_their_own_order_and_take_turns():
    async def main():
        pipeline = OperationPipeline(capacity=8)
        pipeline.start()
        release = threading.Event()
        seen = []
        blocker = await pipeline.submit(release.wait, lane="a")
        await asyncio.sleep(0.05)
        futures = [await pipeline.submit(lambda i=i: seen.append(("a", i)), lane="a") for i in range(6)]
        futures += [await pipeline.submit(lambda i=i: seen.append(("b", i)), lane="b") for i in range(2)]
        release.set()
        await asyncio.gather(blocker, *futures)
        await pipeline.close()
        return seen

    seen = asyncio.run(main())
    # A long queue on lane a does not hold lane b back: they alternate while both wait.
    assert seen[:4] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert [i for lane, i in seen if lane == "a"] == list(range(6))
