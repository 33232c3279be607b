"""AdamW with Tinker's AdamParams, set per step; the pre-clip gradient norm; steps that are
all or nothing.

A step is checked before it is kept: every hyper-parameter is finite and in range in float32
(`AdamParams`) and the accumulated gradient is finite. The update is then applied to the
weights in place, one parameter at a time with its Adam moments on copies, after the weights
were copied (the undo). It is refused, and the copied weights put back, when a weight or moment
would be inf or NaN, or when the caller's check of the updated weights refuses them (the engine
probes the policy: `Engine.degenerate`). A kept step then writes moments and step count by the
same `torch.optim.adam.adam` call on the copy, now scratch: the same arithmetic, so it gives
the weights already in place. So a refused step leaves weights, moments, step count and
(unless it was not finite) the gradient exactly as they were.

Why this undo: the check needs every updated weight at once, so something of the weights' size
must be held; one copy of the weights, plus one parameter's moments at a time, is the least.
A snapshot of weights and moments, or an update computed into copies and swapped in, would
hold three. forward_backward's "exact" accumulation already holds a second gradient of this
size, so with it the step does not raise the run's peak. The Adam arithmetic runs twice (the
trial, then the moments), as the dry run it replaces did.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.optim.adam import adam

from cispo.worker.errors import FieldViolation, InvalidInput, StepRefused
from cispo.worker.losses import FLOAT32_MAX
from cispo.worker.sharding import all_reduce_sum, like, local

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyper-parameters for one step (Tinker's names and defaults).

    Every field must be finite and keep its meaning in float32, where the step computes:
    betas in [0, 1), eps > 0 (not 0 in float32), the others >= 0.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0  # decoupled, as in AdamW
    grad_clip_norm: float = 0.0  # clip the global L2 norm to this; 0 = no clipping

    def __post_init__(self):
        violations = [
            FieldViolation(f"adam_params.{name}", problem)
            for name, value in asdict(self).items()
            if (problem := _adam_field_problem(name, value)) is not None
        ]
        if violations:
            raise InvalidInput(violations)


def _adam_field_problem(name: str, value: float) -> str | None:
    """Why `value` is no good for AdamParams.`name` (None if it is good)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    value32 = float(np.float32(value)) if math.isfinite(value) and abs(value) <= FLOAT32_MAX else math.inf
    if not math.isfinite(value) or not math.isfinite(value32):
        return f"must be finite in float32 (|value| <= 3.4e38), got {value:g}"
    if name in ("beta1", "beta2"):
        if not 0.0 <= value32 < 1.0:
            return f"must lie in [0, 1) in float32, got {value!r}" + (" (rounds to 1.0)" if value < 1.0 else "")
    elif name == "eps":
        if not value32 > 0.0:
            return f"must be > 0 in float32, got {value:g}" + (" (rounds to 0)" if value > 0 else "")
    elif value32 < 0.0:
        return f"must be >= 0, got {value:g}"
    return None


def global_grad_norm(params: list[torch.nn.Parameter], sharded: bool = False) -> torch.Tensor:
    """fp32 L2 norm over all accumulated gradients (0 when there are none); `sharded`: over
    every rank's shards (a collective)."""
    norms = [torch.linalg.vector_norm(local(p.grad), dtype=torch.float32) for p in params if p.grad is not None]
    if not sharded:
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return all_reduce_sum(torch.stack(norms).square().sum()).sqrt()


class Optimizer:
    """AdamW over named parameters; hyper-parameters come with each step.

    state[name] holds "exp_avg", "exp_avg_sq" (like the parameter) and "step" (a float32 scalar
    tensor), created on a parameter's first step; parameters without a gradient are skipped.

    `sharded` (FSDP2, worker.sharding): parameters, gradients and moments are DTensors; each
    rank updates its shards, and the norm and the all-or-nothing check span the group (every
    rank must step together).
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], sharded: bool = False):
        self.named_params = named_params
        self.sharded = sharded
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.step_count = 0

    def step(self, adam_params: AdamParams, check: Callable[[], str | None] | None = None) -> float:
        """Clip (if asked), apply the accumulated gradient, zero it; returns the pre-clip norm.

        `check`, called on every rank with the updated weights in place, says why they are
        unusable (None: they are fine); a reason refuses the step. Then it is called again on
        the weights put back: if they were unusable already, the error blames them, not the step.

        Raises StepRefused, having changed nothing, when the gradient or the update is not
        finite or `check` refuses; a non-finite gradient is dropped (it could never be applied)."""
        names = [n for n, p in self.named_params.items() if p.grad is not None]
        params = [self.named_params[n] for n in names]
        grads = [p.grad for p in params if p.grad is not None]  # each param's, the same tensors throughout
        if not params:
            self.step_count += 1
            return 0.0
        norm = global_grad_norm(params, self.sharded)
        if not bool(torch.isfinite(norm)):
            self.zero_grad()
            raise StepRefused(
                f"the accumulated gradient is not finite (its L2 norm is {float(norm)} in float32); it was dropped. "
                "Weights, moments and step count are unchanged; run forward_backward again"
            )
        scale = None
        if adam_params.grad_clip_norm > 0:
            scale = (adam_params.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
        weights = [local(p.detach()) for p in params]
        undo = [w.clone() for w in weights]
        ok = torch.ones((), dtype=torch.bool, device=norm.device)
        for name, p, g, weight in zip(names, params, grads, weights):  # the trial: weights in place, moments on copies
            grad = local(g) if scale is None else local(g) * scale.to(g.device)
            trial = {k: local(v).clone() for k, v in self._moments(name, p).items()}
            try:
                self._adam([weight], [grad], [trial], adam_params)
            except RuntimeError:  # e.g. lr / (1 - beta1^t) overflows float32
                ok = torch.zeros_like(ok)
                break
            for t in (weight, trial["exp_avg"], trial["exp_avg_sq"]):
                ok &= torch.isfinite(t).all().to(ok.device)
        if self.sharded:  # all or nothing across the group
            ok = all_reduce_sum((~ok).float()) == 0
        stepped = (
            f"learning_rate={adam_params.learning_rate:g}, eps={adam_params.eps:g}, "
            f"weight_decay={adam_params.weight_decay:g}, gradient norm {float(norm):g}"
        )
        if not bool(ok):
            self._put_back(weights, undo)
            raise StepRefused(
                f"this step would make weights or Adam moments non-finite ({stepped}); nothing changed and the "
                "accumulated gradient is kept: retry with smaller values, or with grad_clip_norm set"
            )
        if check is not None:
            try:
                after = check()
            except BaseException:  # e.g. out of memory in the check: put back, as for a refusal
                self._put_back(weights, undo)
                raise
            if after is not None:
                self._put_back(weights, undo)
                before = check()
                if before is not None:
                    raise StepRefused(
                        f"the policy is degenerate already, before this step ({before}); nothing changed and the "
                        "accumulated gradient is kept: load an earlier state"
                    )
                raise StepRefused(
                    f"this step would make the policy degenerate ({after}; {stepped}); nothing changed and the "
                    "accumulated gradient is kept: retry with a smaller learning_rate, or with grad_clip_norm set"
                )
        if scale is not None:
            for g in grads:
                local(g).mul_(scale.to(g.device))
        self._adam(
            undo,
            [local(g) for g in grads],  # the moments; `undo` is scratch now
            [{k: local(v) for k, v in self._moments(n, p, create=True).items()} for n, p in zip(names, params)],
            adam_params,
        )
        self.zero_grad()
        self.step_count += 1
        return float(norm)

    @staticmethod
    def _put_back(weights: list[torch.Tensor], undo: list[torch.Tensor]) -> None:
        """The weights as they were before the trial."""
        with torch.no_grad():
            torch._foreach_copy_(weights, undo)

    def _moments(self, name: str, p: torch.nn.Parameter, create: bool = False) -> dict[str, torch.Tensor]:
        """The AdamW state of `name` (zeros at step 0; stored only if `create`)."""
        state = self.state.get(name)
        if state is None:
            state = {
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                "step": torch.zeros((), dtype=torch.float32),
            }
            if create:
                self.state[name] = state
        return state

    @staticmethod
    def _adam(
        params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]], a: AdamParams
    ) -> None:
        """torch's AdamW arithmetic, in place on `params` and `states`."""
        with torch.no_grad():
            adam(
                [p.detach() for p in params],
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                foreach=params[0].device.type == "cuda",
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=a.beta1,
                beta2=a.beta2,
                lr=a.learning_rate,
                weight_decay=a.weight_decay,
                eps=a.eps,
                maximize=False,
            )

    def zero_grad(self) -> None:
        for p in self.named_params.values():
            p.grad = None

    def moments(self) -> dict[str, torch.Tensor]:
        """AdamW moments keyed "<param name>/<exp_avg|exp_avg_sq|step>", as held (DTensors when sharded)."""
        return {f"{name}/{key}": value for name, state in self.state.items() for key, value in state.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`moments`, on the CPU (for saving a whole state)."""
        return {key: value.detach().cpu().contiguous() for key, value in self.moments().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Replace the AdamW state by `tensors` (as from `moments`: whole, or laid out as the
        parameters already)."""
        self.state = {}
        for key, value in tensors.items():
            name, _, field = key.rpartition("/")
            p = self.named_params[name]
            self.state.setdefault(name, {})[field] = like(p, value) if field != "step" else value.clone()
        self.step_count = step_count

    def reset(self) -> None:
        """Fresh state: no moments, step 0."""
        self.state = {}
        self.step_count = 0
