"""AdamW with Tinker's AdamParams, set per step, and the pre-clip gradient norm."""

import math
from dataclasses import asdict, dataclass

import torch

from cispo.worker.errors import FieldViolation, InvalidInput


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyper-parameters for one step (Tinker's names and defaults)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0  # decoupled, as in AdamW
    grad_clip_norm: float = 0.0  # clip the global L2 norm to this; 0 = no clipping

    def __post_init__(self):
        bounds = {
            "learning_rate": (0.0, math.inf, "be >= 0"),
            "beta1": (0.0, 1.0 - 1e-12, "lie in [0, 1)"),
            "beta2": (0.0, 1.0 - 1e-12, "lie in [0, 1)"),
            "eps": (1e-300, math.inf, "be > 0"),
            "weight_decay": (0.0, math.inf, "be >= 0"),
            "grad_clip_norm": (0.0, math.inf, "be >= 0"),
        }
        violations = [
            FieldViolation(f"adam_params.{name}", f"must {rule}, got {value}")
            for name, value in asdict(self).items()
            for lo, hi, rule in [bounds[name]]
            if not (math.isfinite(value) and lo <= value <= hi)
        ]
        if violations:
            raise InvalidInput(violations)


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """fp32 L2 norm over all accumulated gradients (0 when there are none)."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class Optimizer:
    """torch.optim.AdamW over named parameters; hyper-parameters come with each step."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter]):
        self.named_params = named_params
        self.adamw = torch.optim.AdamW(list(named_params.values()), lr=AdamParams.learning_rate)
        self.step_count = 0

    def step(self, adam: AdamParams) -> float:
        """Clip (if asked), apply the accumulated gradient, zero it; returns the pre-clip norm."""
        params = list(self.named_params.values())
        norm = global_grad_norm(params)
        if adam.grad_clip_norm > 0:
            scale = (adam.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.device))
        for group in self.adamw.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(norm)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW moments keyed "<param name>/<exp_avg|exp_avg_sq|step>" (CPU, for saving)."""
        out = {}
        for name, p in self.named_params.items():
            for key, value in self.adamw.state.get(p, {}).items():
                out[f"{name}/{key}"] = value.detach().cpu().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Replace the AdamW state by `tensors` (as from `state_tensors`)."""
        self.adamw.state.clear()
        for key, value in tensors.items():
            name, _, field = key.rpartition("/")
            p = self.named_params[name]
            self.adamw.state[p][field] = value.to(p.device) if field != "step" else value.clone()
        self.step_count = step_count

    def reset(self) -> None:
        """Fresh state: no moments, step 0."""
        self.adamw.state.clear()
        self.step_count = 0
