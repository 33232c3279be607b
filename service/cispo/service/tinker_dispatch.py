"""The Tinker front's way into the operations layer (cispo.service.data_plane.Operations).

Every operation goes through the same layer as gRPC's, named by its typed entry in
cispo.service.operations (FORWARD_BACKWARD, OPTIM_STEP, ..., REMOVE_EXPORT): the same
validation, runs, pipeline lanes, idempotency (X-Idempotency-Key), metrics and log line.

- `call`: run one operation now and wait for its response (an HttpError if it fails);
- `submit`: validate now (a refusal is the request's own answer, at once), then a request id,
  whose operation starts in its model's order (or at once) even if the server begins to drain,
  and whose answer retrieve_future gives.
"""

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.rpc import code_pb2, status_pb2
from starlette.responses import Response

from cispo.service.data_plane import Operations
from cispo.service.errors import OperationFailed, to_status
from cispo.service.operation import Operation, Req, Resp
from cispo.service.tinker_errors import future_error, refused
from cispo.service.tinker_futures import FutureTable
from cispo.service.tinker_order import SeqOrder, take_turn


class Dispatch:
    """Calls and submits of the Tinker front, over one server's operations."""

    def __init__(self, operations: Operations, futures: FutureTable) -> None:
        self.operations, self.futures = operations, futures
        self._tasks: set[asyncio.Task] = set()  # owned: the loop holds tasks weakly

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task of its own, kept until it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def call(self, op: Operation[Req, Resp], request: Req) -> Resp:
        """Run `op` now and wait for it; HttpError if it fails."""
        try:
            return await self.operations.call(op, request)
        except OperationFailed as exc:
            raise refused(exc.status) from None

    async def submit(
        self,
        op: Operation[Req, Resp],
        request: Req,
        encode: Callable[[Resp], Response],
        order: SeqOrder | None = None,
        seq_id: int = 0,
    ) -> str:
        """Validate now (a refusal is this request's answer: HttpError); queue in `order` by
        `seq_id` (or at once). The request id, whose result retrieve_future answers: from then on
        the request is started even if the server begins to drain."""
        operations = self.operations
        decoded = await operations.prepare(op, request)
        if decoded.error is not None:  # counted and logged as every door's refusals are
            status = await (await operations.accept(decoded, time.perf_counter()))
            raise refused(status if isinstance(status, status_pb2.Status) else to_status(decoded.error))
        request_id, answer = self.futures.new()
        context = contextvars.copy_context()

        def settle(response: Response) -> None:
            if not answer.done():
                answer.set_result(response)

        async def finish(pending: asyncio.Future) -> None:
            result = await pending
            if isinstance(result, status_pb2.Status):
                settle(future_error(result))
                return
            try:
                settle(encode(result))
            except Exception as exc:
                status = to_status(exc)
                settle(future_error(status, user=status.code == code_pb2.INVALID_ARGUMENT))

        async def start() -> None:
            if answer.done():  # abandoned by a drain: never started
                return
            self.futures.started(request_id)
            accepted = asyncio.create_task(
                operations.accept(decoded, time.perf_counter(), promised=True), context=context
            )
            pending = await accepted
            task = asyncio.create_task(finish(pending), context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if order is None:
            await start()
        else:
            take_turn()
            self.spawn(order.put(seq_id, start))
        return request_id
