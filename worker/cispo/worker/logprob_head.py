"""Target log-probabilities through the LM head without materialising [tokens x vocab] logits.

    logp_T[i] = log_softmax(hidden_TD[i] @ weight_VD.T)[targets_T[i]]

The head, log-softmax, gather and their backward run over chunks of tokens, so the extra
peak memory is a few (chunk x V) buffers instead of (T x V). Autograd carries the per-token
upstream gradient (e.g. -coef * A for CISPO) into each chunk's logits gradient before it is
summed into the weight gradient. Torch >= 2.13 does this in `F.linear_cross_entropy`;
`ChunkedTargetLogprobs` is the same computation for older torch and gives the same numbers.

Both recompute each chunk's logits in backward: four (T x D x V) matmuls to naive's three.
For training, `fused_head_gradients` avoids that: every loss is a sum of per-token terms, so
the gradient w.r.t. logp_T[i] is known as soon as logp_T[i] is, and the head's gradients are
computed in the forward chunk loop itself (three matmuls, like naive).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

HAS_LINEAR_CROSS_ENTROPY = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def default_chunk_tokens(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: (chunk x V) logits about the size of the (T x d) hidden states, but at
    least d tokens, since every chunk makes a pass over the (V x d) weight gradient (see
    BENCHMARKS.md: 512 tokens at d=512 halves the time overhead of 131 at the same memory)."""
    by_memory = math.ceil(num_tokens / math.ceil(vocab_size / hidden_size))
    return max(1, min(num_tokens, max(hidden_size, by_memory)))


def target_logprobs(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    chunk_tokens: int | None = None,
    use_torch_op: bool = HAS_LINEAR_CROSS_ENTROPY,
) -> torch.Tensor:
    """(T,) log-probabilities (fp32, or fp64 for an fp64 model) of `targets_T` (int64) under softmax(hidden_TD @ weight_VD.T).

    Differentiable w.r.t. hidden_TD and weight_VD. `chunk_tokens` bounds the logits buffer;
    None picks `default_chunk_tokens`. `use_torch_op=False` forces the portable fallback.
    """
    T, D = hidden_TD.shape
    chunk = chunk_tokens or default_chunk_tokens(T, D, weight_VD.shape[0])
    if use_torch_op:
        low_precision = hidden_TD.dtype in (torch.float16, torch.bfloat16)
        options = torch.nn.LinearCrossEntropyOptions(
            batch_chunk_size=chunk, chunking_method=None, acc_dtype=torch.float32 if low_precision else None
        )
        nll_T = F.linear_cross_entropy(hidden_TD, weight_VD, targets_T, reduction="none", options=options)
        return -nll_T.to(_acc_dtype(hidden_TD.dtype))
    return ChunkedTargetLogprobs.apply(hidden_TD, weight_VD, targets_T, chunk)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 models; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden_CD: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    """(C, V) logits of one chunk in the accumulation dtype."""
    return (hidden_CD @ weight_VD.T).to(_acc_dtype(hidden_CD.dtype))


def _shifted_exp_(logits_CV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(logits - row max) in logits_CV's own buffer (torch.logsumexp would make a second
    (C, V) one); returns the row max and the row sum of that, (C,) each: the log-sum-exp is
    max + log(sum)."""
    max_C1 = logits_CV.amax(dim=-1, keepdim=True)
    return max_C1[:, 0], logits_CV.sub_(max_C1).exp_().sum(dim=-1)


class ChunkedTargetLogprobs(torch.autograd.Function):
    """Chunked head + log-softmax + gather; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, targets_T, chunk_tokens):
        logp_T = torch.empty(hidden_TD.shape[0], dtype=_acc_dtype(hidden_TD.dtype), device=hidden_TD.device)
        lse_T = torch.empty_like(logp_T)
        for start in range(0, hidden_TD.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            logits_CV = _chunk_logits(hidden_TD[sl], weight_VD)
            target_C = logits_CV.gather(1, targets_T[sl, None])[:, 0]
            max_C, sum_C = _shifted_exp_(logits_CV)
            log_sum_C = sum_C.log()
            lse_T[sl] = max_C + log_sum_C
            logp_T[sl] = (target_C - max_C) - log_sum_C
        ctx.save_for_backward(hidden_TD, weight_VD, targets_T, lse_T)
        ctx.chunk_tokens = chunk_tokens
        return logp_T

    @staticmethod
    def backward(ctx, grad_logp_T):
        hidden_TD, weight_VD, targets_T, lse_T = ctx.saved_tensors
        grad_hidden_TD = torch.empty_like(hidden_TD) if ctx.needs_input_grad[0] else None
        acc = _acc_dtype(hidden_TD.dtype)
        grad_weight_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
        for start in range(0, hidden_TD.shape[0], ctx.chunk_tokens):
            sl = slice(start, start + ctx.chunk_tokens)
            h_CD, g_C = hidden_TD[sl], grad_logp_T[sl].to(acc)
            # d logp / d logits = onehot(target) - softmax; scaled per token before any sum.
            grad_logits_CV = _chunk_logits(h_CD, weight_VD).sub_(lse_T[sl, None]).exp_().mul_(-g_C[:, None])
            grad_logits_CV.scatter_add_(1, targets_T[sl, None], g_C[:, None])
            grad_logits_CV = grad_logits_CV.to(hidden_TD.dtype)  # matmuls in the model dtype
            if grad_hidden_TD is not None:
                grad_hidden_TD[sl] = grad_logits_CV @ weight_VD
            if acc == hidden_TD.dtype:
                grad_weight_VD.addmm_(grad_logits_CV.T, h_CD)
            else:
                grad_weight_VD += grad_logits_CV.T @ h_CD
        return grad_hidden_TD, grad_weight_VD.to(weight_VD.dtype) if ctx.needs_input_grad[1] else None, None, None


# (logp of the tokens in `sl`, `sl`) -> d loss / d logp for those tokens, same shape.
TokenGradient = Callable[[torch.Tensor, slice], torch.Tensor]


def fused_head_gradients(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    token_gradient: TokenGradient,
    chunk_tokens: int | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate, logp_T): logp_T as `target_logprobs` gives it (no gradient), and a zero
    scalar whose backward carries the loss gradient into hidden_TD and weight_VD.

    `token_gradient` must be the per-token gradient of a loss that is a sum over tokens.

    `weight_grad_into`: a leaf parameter in the accumulation dtype (fp32 for an fp32, bf16 or
    fp16 head) whose value weight_VD is, or is cast from (the compute dtype). The weight
    gradient is then accumulated in fp32 straight into its `.grad` (created, or added to) in
    the chunk loop itself, with no (V x D) scratch buffer, and weight_VD gets none through
    autograd; the surrogate must be backpropagated with its default gradient 1
    (`surrogate.backward()`).
    """
    T, D = hidden_TD.shape
    chunk = chunk_tokens or default_chunk_tokens(T, D, weight_VD.shape[0])
    return FusedHeadGradients.apply(hidden_TD, weight_VD, targets_T, chunk, token_gradient, weight_grad_into)


class FusedHeadGradients(torch.autograd.Function):
    """One chunk loop: logits, logp, the loss's per-token gradient, and the head's gradients,
    chunk by chunk: one chunk's (chunk x V) buffers at a time (the fp32 logits, taken in place
    through softmax to the gradient; in bf16 also the matmul's bf16 output and the gradient's
    bf16 copy), freed before the next chunk's are made.

    The weight gradient is written once: the first chunk's product goes straight into its
    buffer (no zeros(V, D)), later chunks add into it with addmm_; the backward scales the
    gradients in place (no second (V x D) copy)."""

    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, targets_T, chunk_tokens, token_gradient, weight_grad_into=None):
        acc = _acc_dtype(hidden_TD.dtype)
        logp_T = torch.empty(hidden_TD.shape[0], dtype=acc, device=hidden_TD.device)
        grad_hidden_TD = torch.empty_like(hidden_TD)
        into_grad = weight_grad_into is not None
        if into_grad and (not weight_grad_into.is_leaf or weight_grad_into.dtype != acc):
            raise ValueError(
                f"weight_grad_into must be a leaf in {acc}, got a {weight_grad_into.dtype} "
                f"{'leaf' if weight_grad_into.is_leaf else 'non-leaf'}"
            )
        # A frozen head (LoRA without train_unembed) needs no (V x D) gradient.
        need_weight = into_grad or ctx.needs_input_grad[1]
        # The (V, D) buffer the chunks accumulate into; None until the first chunk writes it.
        grad_weight_VD = weight_grad_into.grad if into_grad else None
        for start in range(0, hidden_TD.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h_CD, tgt_C1 = hidden_TD[sl], targets_T[sl, None]
            exp_CV = grad_logits_CV = None  # the last chunk's buffers go before the next is made
            exp_CV = _chunk_logits(h_CD, weight_VD)
            target_C = exp_CV.gather(1, tgt_C1)[:, 0]
            max_C, sum_C = _shifted_exp_(exp_CV)
            logp_T[sl] = (target_C - max_C) - sum_C.log()
            g_C = token_gradient(logp_T[sl], sl).to(acc)
            # d logp / d logits = onehot(target) - softmax; scaled per token before any sum.
            grad_logits_CV = exp_CV.mul_((-g_C / sum_C)[:, None])
            grad_logits_CV.scatter_add_(1, tgt_C1, g_C[:, None])
            grad_logits_CV = grad_logits_CV.to(hidden_TD.dtype)  # matmuls in the model dtype
            grad_hidden_TD[sl] = grad_logits_CV @ weight_VD
            if not need_weight:
                continue
            if grad_weight_VD is None:
                grad_weight_VD = (grad_logits_CV.T @ h_CD).to(acc)
            elif acc == hidden_TD.dtype:
                grad_weight_VD.addmm_(grad_logits_CV.T, h_CD)
            else:
                grad_weight_VD += grad_logits_CV.T @ h_CD
        if into_grad:
            weight_grad_into.grad = grad_weight_VD
            grad_weight_VD = None
        elif need_weight:
            if grad_weight_VD is None:  # no tokens
                grad_weight_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        ctx.gradients = (grad_hidden_TD, grad_weight_VD)
        ctx.mark_non_differentiable(logp_T)
        return logp_T.new_zeros(()), logp_T

    @staticmethod
    def backward(ctx, grad_surrogate, _grad_logp):
        grad_hidden_TD, grad_weight_VD = ctx.gradients
        del ctx.gradients
        scale = grad_surrogate.to(grad_hidden_TD.dtype)
        if grad_weight_VD is not None:
            grad_weight_VD.mul_(scale.to(grad_weight_VD.dtype))
        return grad_hidden_TD.mul_(scale), grad_weight_VD, None, None, None, None
