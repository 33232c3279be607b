"""`SamplingClient`: samples from a cispo server, on the training state's weights or saved ones.

    sampling_client = training_client.save_weights_and_get_sampling_client()
    future = sampling_client.sample(ModelInput.from_ints(prompt), num_samples=8,
                                    sampling_params=SamplingParams(max_tokens=32, temperature=1.0))
    for sequence in future.result().sequences:
        sequence.tokens, sequence.logprobs, sequence.stop_reason

With `model_path=None` a sample runs on the training run's current weights at its place in the
order of operations: it sees every optim_step submitted before it, none after. With a path (what
`save_weights_for_sampler` answered) it runs on those saved weights.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from cispo.v1 import training_pb2 as pb

from . import wire
from .connection import Connection
from .futures import APIFuture
from .types import ModelInput, SampleResponse, SamplingParams, SaveWeightsForSamplerResponse

__all__ = ["SamplingClient"]


class SamplingClient:
    """Sampling from one set of weights. Thread-safe; futures as `TrainingClient`'s."""

    def __init__(
        self,
        target: str | Connection,
        *,
        model_path: str | None = None,
        saved: APIFuture[SaveWeightsForSamplerResponse] | None = None,
        **connection: Any,
    ) -> None:
        """
        target: "host:port" (then `connection` takes TrainingClient's keyword arguments: token,
            root_certificates, ...), or a TrainingClient (any Connection) whose connection, and
            so whose order of operations, this client shares.
        model_path: saved sampler weights (a path `save_weights_for_sampler` answered, or the
            export's name); None samples the training run's current weights.
        saved: the pending save of those weights, which `result()` waits for.
        """
        if isinstance(target, Connection):
            if connection:
                raise TypeError("connection arguments go with a target address, not with a TrainingClient")
            self._client, self._owns_client = target, False
        else:
            self._client, self._owns_client = Connection(target, **connection), True
        self.model_path = model_path
        self._saved = saved

    def result(self, timeout: float | None = None) -> SamplingClient:
        """This client, once its weights are saved (raises the save's error). Tinker returns a
        future of the SamplingClient; this client is its own."""
        if self._saved is not None:
            self.model_path = self._saved.result(timeout).path
        return self

    async def result_async(self, timeout: float | None = None) -> SamplingClient:
        """`result()`, awaited."""
        if self._saved is not None:
            self.model_path = (await self._saved.result_async(timeout)).path
        return self

    def __await__(self) -> Generator[Any, None, SamplingClient]:
        return self.result_async().__await__()

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
    ) -> APIFuture[SampleResponse]:
        """Submit a sample of `num_samples` sequences continuing `prompt`; returns its future
        at once (`.result()`, `await`)."""
        request = pb.StreamRequest()
        wire.sample_request_to_pb(
            prompt,
            num_samples,
            sampling_params or SamplingParams(),
            include_prompt_logprobs,
            self.model_path or "",
            out=request.sample,
        )
        return self._client._submit(request, "sample", wire.sample_response_from_pb)

    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
    ) -> SampleResponse:
        """`sample`, awaited."""
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """The model's logprob (temperature 1) of each prompt token after the ones before it;
        None for the first. Returns a future."""
        request = pb.StreamRequest()
        wire.sample_request_to_pb(
            prompt, 1, SamplingParams(max_tokens=1), True, self.model_path or "", out=request.sample
        )
        return self._client._submit(
            request, "sample", lambda message: wire.sample_response_from_pb(message).prompt_logprobs
        )

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        """`compute_logprobs`, awaited."""
        return await self.compute_logprobs(prompt)

    def close(self, grace: float | None = None) -> None:
        """Close the connection if this client opened it (a shared one stays open)."""
        if self._owns_client:
            self._client.close(grace)

    def __enter__(self) -> SamplingClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(grace=0 if exc_type is not None else None)

    def __repr__(self) -> str:
        return f"SamplingClient({self._client.target!r}, model_path={self.model_path!r})"
