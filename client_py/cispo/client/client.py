"""`TrainingClient`: the training operations of one run on a cispo server, Tinker's way.

    client = TrainingClient("localhost:50051")          # or ServiceClient(...).create_..._client()
    fwd_bwd_future = client.forward_backward(data, loss_fn="cispo")   # returns at once
    optim_future = client.optim_step(AdamParams(learning_rate=1e-5))  # queued behind it
    fwd_bwd_future.result().metrics["loss:sum"]                       # or: await fwd_bwd_future

Every operation returns its `APIFuture` at once (`.result()`, `await future`,
`await future.result_async()`) and operations run on the server in call order, pipelined on
one Stream, so many can be in flight and the server stays busy. The `_async` spellings
(`await client.forward_backward_async(...)`) give the same futures. Failures raise `CispoError`
subclasses that carry the server's field violations.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cispo.v1 import training_pb2 as pb

from . import wire
from .connection import DEFAULT_MAX_MESSAGE_BYTES, Connection
from .futures import APIFuture
from .ordering import Release
from .sampling_client import SamplingClient
from .types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadStateResponse,
    OptimStepResponse,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
    TensorData,
)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "CustomLossFn", "TrainingClient"]

CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, Mapping[str, float]]]
"""forward_backward_custom's loss: (data, per-datum torch logprobs (N_i,)) -> (torch scalar
loss, metrics)."""


class TrainingClient(Connection):
    """A client of one cispo server's training state.

    Thread-safe. Nothing connects until the first call; the connection and its I/O thread
    live until `close()` (or the end of a `with` / `async with` block). Its constructor's
    arguments are Connection's (target, token, TLS, limits, retries, model_id).
    """

    @staticmethod
    def _fwd_stream_request(
        op: str, data: Iterable[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> pb.StreamRequest:
        request = pb.StreamRequest()
        wire.forward_backward_input_to_pb(data, loss_fn, loss_fn_config, out=getattr(request, op))
        return request

    # --- operations: each returns its future at once, and they run in call order -----------

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Run the batch forward and backward through `loss_fn`; the gradient is added to the
        accumulated gradient.

        data: the batch, one Datum per sequence (lengths may differ); the tinker SDK's
            Datums are accepted too.
        loss_fn: "cispo", "importance_sampling", "ppo", "cross_entropy", "dro" or "gspo"
            (docs/losses.md).
        loss_fn_config: loss hyper-parameters, e.g. {"clip_low_threshold": 0.0,
            "clip_high_threshold": 4.0}; unset keys take the server's defaults.
        Returns the future of per-datum target logprobs (`loss_fn_outputs[i]["logprobs"]`,
        shape (N_i,)) and batch metrics (`metrics["loss:sum"]`, ...).
        """
        request = self._fwd_stream_request("forward_backward", data, loss_fn, loss_fn_config)
        return self._submit(request, "forward_backward", wire.forward_backward_output_from_pb)

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Like `forward_backward`, without the backward pass: no gradient is accumulated."""
        request = self._fwd_stream_request("forward", data, loss_fn, loss_fn_config)
        return self._submit(request, "forward", wire.forward_backward_output_from_pb)

    def forward_backward_custom(self, data: Sequence[Datum], loss_fn: CustomLossFn) -> APIFuture[ForwardBackwardOutput]:
        """A forward_backward through a loss computed here, on the client, as Tinker does it.

        loss_fn(data, logprobs) -> (loss, metrics): `logprobs[i]` is a torch tensor (N_i,) of
        datum i's target logprobs that requires grad; `loss` a torch scalar; `metrics` a dict
        of floats. The client runs a forward, calls loss_fn, differentiates it, then sends a
        backward through cross_entropy with weights -dloss/dlogprobs, whose gradient is the
        custom loss's. Operations submitted after this one wait for that backward, so an
        optim_step right after it steps on its gradient. If the loss fails, the future fails
        and so do the operations waiting behind it (they are not sent).
        The answer's metrics: loss_fn's, "loss:sum" (the custom loss) and
        "surrogate_loss:sum" (the cross_entropy surrogate's). Needs torch on the client.
        """
        try:
            import torch  # only here: the client does not depend on torch
        except ImportError:
            raise ImportError("forward_backward_custom differentiates the loss with torch: pip install torch") from None
        data = wire.as_data_list(data)
        forward_data = []
        for index, datum in enumerate(data):
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is None:
                raise ValueError(f"data[{index}].loss_fn_inputs: forward_backward_custom needs target_tokens")
            weights = datum.loss_fn_inputs.get("weights")
            if weights is None:
                weights = TensorData.from_numpy(np.zeros(len(targets), np.float32))
            forward_data.append(Datum(datum.model_input, {"target_tokens": targets, "weights": weights}))
        decode = wire.forward_backward_output_from_pb
        forward_request = self._fwd_stream_request("forward", forward_data, "cross_entropy", None)

        def start(release: Release) -> concurrent.futures.Future:
            forward = self._send(forward_request, "forward", decode)
            answer: concurrent.futures.Future = concurrent.futures.Future()
            answer.set_running_or_notify_cancel()

            def run() -> None:
                try:
                    logprobs = [
                        torch.tensor(out["logprobs"].to_numpy(), requires_grad=True)
                        for out in forward.result().loss_fn_outputs
                    ]
                    loss, metrics = loss_fn(data, logprobs)
                    loss.backward()
                    grads = [lp.grad if lp.grad is not None else torch.zeros_like(lp) for lp in logprobs]
                    backward_data = [
                        Datum(
                            d.model_input,
                            {
                                "target_tokens": d.loss_fn_inputs["target_tokens"],
                                "weights": TensorData.from_numpy(-g.detach().float().numpy()),
                            },
                        )
                        for d, g in zip(forward_data, grads)
                    ]
                    backward = self._send(
                        self._fwd_stream_request("forward_backward", backward_data, "cross_entropy", None),
                        "forward_backward",
                        decode,
                    )
                except BaseException as exc:
                    release(exc)
                    answer.set_exception(exc)
                    return
                release(None)
                try:
                    result = backward.result()
                except BaseException as exc:
                    answer.set_exception(exc)
                    return
                surrogate = result.metrics.pop("loss:sum")
                result.metrics.update({name: float(value) for name, value in metrics.items()})
                result.metrics["loss:sum"] = float(loss.detach().sum())
                result.metrics["surrogate_loss:sum"] = surrogate
                answer.set_result(result)

            threading.Thread(target=run, name="cispo-custom-loss", daemon=True).start()
            return answer

        return APIFuture(self._order.submit_holding(start))

    def optim_step(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradient with AdamW (AdamParams' defaults when None), then
        zero it. `adam_params=` is Tinker's keyword for the same argument. Returns the future
        of the pre-clip gradient norm, the step count and the step's metrics."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("pass optim_params or adam_params, not both")
        request = pb.StreamRequest()
        request.optim_step.SetInParent()
        wire.adam_params_to_pb(
            optim_params if optim_params is not None else adam_params, out=request.optim_step.adam_params
        )
        return self._submit(request, "optim_step", wire.optim_step_response_from_pb)

    def save_state(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveStateResponse]:
        """Save weights (a LoRA run: its adapter), optimizer state and step count under `name`
        (letters, digits, '.', '_', '-'; replaces an existing state atomically) in the server's
        --checkpoint-dir. The answer's `path` is what load_state and
        ServiceClient.create_training_client_from_state take. ttl_seconds: the server deletes
        the state this long after the save (None: kept until deleted). user_metadata: stored
        with it, for ServiceClient.list_checkpoints."""
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise ValueError(f"ttl_seconds: expected a positive int or None, got {ttl_seconds!r}")
        request = pb.StreamRequest(save_state=pb.SaveStateRequest(name=name, user_metadata=user_metadata))
        if ttl_seconds is not None:
            request.save_state.ttl_seconds = ttl_seconds
        return self._submit(request, "save_state", wire.save_state_response_from_pb)

    def load_state(self, path: str) -> APIFuture[LoadStateResponse]:
        """Load the weights saved at `path` (what save_state answered, or the state's name) and
        reset the optimizer (no moments, step 0); the accumulated gradient is dropped. Use
        `load_state_with_optimizer` to resume a run. Fails with NotFoundError/
        FailedPreconditionError if there is no such state."""
        request = pb.StreamRequest(load_state=pb.LoadStateRequest(name=path, with_optimizer=False))
        return self._submit(request, "load_state", wire.load_state_response_from_pb)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadStateResponse]:
        """Load the weights and the optimizer state (moments, step count) saved at `path`."""
        request = pb.StreamRequest(load_state=pb.LoadStateRequest(name=path, with_optimizer=True))
        return self._submit(request, "load_state", wire.load_state_response_from_pb)

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        merged: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Write the current weights, and nothing else, as a directory that vLLM (`--model
        path`) and transformers load as they are, in the server's --sampler-dir (replaces an
        export of that name atomically); a LoRA run writes its PEFT adapter directory, or with
        `merged` full weights with the adapter merged in. The answer's `path` is what
        create_sampling_client takes. ttl_seconds, user_metadata: as for save_state."""
        request = pb.StreamRequest(
            save_weights_for_sampler=pb.SaveWeightsForSamplerRequest(
                name=name, merged=merged, user_metadata=user_metadata
            )
        )
        if ttl_seconds is not None:
            request.save_weights_for_sampler.ttl_seconds = ttl_seconds
        return self._submit(request, "save_weights_for_sampler", wire.save_weights_for_sampler_response_from_pb)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """`save_weights_for_sampler(name)`, then a SamplingClient on those weights, sharing this
        client's connection; returns at once (its samples queue behind the save).
        `.result()` / `await` on it wait for the save and raise its error. None names the
        export `sampler-<random hex>`: each such call writes a new directory, which stays until
        removed from --sampler-dir."""
        name = name or f"sampler-{uuid.uuid4().hex[:16]}"
        return SamplingClient(self, model_path=name, saved=self.save_weights_for_sampler(name))

    def create_sampling_client(self, model_path: str | None = None) -> SamplingClient:
        """A SamplingClient sharing this client's connection and order of operations: on the
        saved weights at `model_path`, or (None) on the run's current weights."""
        return SamplingClient(self, model_path=model_path)

    def get_info(self) -> GetInfoResponse:
        """The run and the model: vocabulary size, limits, loss functions with their defaults,
        LoRA rank, step. Blocks until answered, in order: after every operation submitted
        before it (as Tinker's, it returns the answer, not a future)."""
        return self._get_info().result()

    def _get_info(self) -> APIFuture[GetInfoResponse]:
        request = pb.StreamRequest()
        request.get_info.SetInParent()
        return self._submit(request, "get_info", wire.get_info_response_from_pb)

    def get_tokenizer(self) -> Any:
        """Not offered: the client never downloads a tokenizer. Load the served model's own
        with `transformers.AutoTokenizer.from_pretrained(<model directory>)`."""
        raise NotImplementedError(
            "cispo's client has no get_tokenizer: load the served model directory's tokenizer "
            "with transformers.AutoTokenizer.from_pretrained(...)"
        )

    # --- Tinker's async spellings: the same operations ---------------------------------------

    async def forward_backward_async(
        self, data: Sequence[Datum], loss_fn: str = "cispo", loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """`forward_backward`: `await` gives its future."""
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_async(
        self, data: Sequence[Datum], loss_fn: str = "cispo", loss_fn_config: Mapping[str, float] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """`forward`: `await` gives its future."""
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """`forward_backward_custom`: `await` gives its future."""
        return self.forward_backward_custom(data, loss_fn)

    async def optim_step_async(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """`optim_step`: `await` gives its future."""
        return self.optim_step(optim_params, adam_params=adam_params)

    async def save_state_async(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveStateResponse]:
        """`save_state`: `await` gives its future."""
        return self.save_state(name, ttl_seconds)

    async def load_state_async(self, path: str) -> APIFuture[LoadStateResponse]:
        """`load_state`: `await` gives its future."""
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadStateResponse]:
        """`load_state_with_optimizer`: `await` gives its future."""
        return self.load_state_with_optimizer(path)

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, merged: bool = False
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """`save_weights_for_sampler`: `await` gives its future."""
        return self.save_weights_for_sampler(name, ttl_seconds, merged)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        """`save_weights_and_get_sampling_client`, once the weights are saved."""
        return await self.save_weights_and_get_sampling_client(name)

    async def get_info_async(self) -> GetInfoResponse:
        """`get_info` without blocking the running event loop."""
        return await self._get_info()

    # --- a client is its own resolved future (ServiceClient's creations) ---------------------

    def result(self, timeout: float | None = None) -> TrainingClient:
        """This client: Tinker's ServiceClient returns a future of the TrainingClient, so
        `create_lora_training_client(...).result()` and `await ...` work here too."""
        return self

    async def result_async(self, timeout: float | None = None) -> TrainingClient:
        return self

    def __await__(self):
        return self.result_async().__await__()

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving on an error: do not wait for answers nobody will read.
        self.close(grace=0 if exc_type is not None else None)

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close_async(grace=0 if exc_type is not None else None)

    def __repr__(self) -> str:
        return f"TrainingClient({self.target!r}, model_id={self.model_id!r})"
