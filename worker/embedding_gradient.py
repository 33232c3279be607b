"""The input embedding's weight gradient, added straight into its `.grad`.

Autograd's embedding backward makes a dense (V, D) gradient, which AccumulateGrad then adds into
an accumulated `.grad`: a second (V x D) buffer on every forward_backward that accumulates (the
largest gradient of a model with a big vocabulary). `add_into_grad` hooks the model's input
embedding so that its backward index-adds the token gradients into `.grad` itself (creating it
as zeros when there is none, as autograd would), with the rows of `padding_idx` left out as
nn.Embedding leaves them. Values and gradients are the embedding's own; only where the weight
gradient is summed changes. Not for sharded models, whose gradients FSDP2 takes from autograd.
"""

import torch
import torch.nn.functional as F


class _EmbeddingIntoGrad(torch.autograd.Function):
    """F.embedding whose weight gradient goes into weight.grad, not through autograd."""

    @staticmethod
    def forward(ctx, ids, weight_VD, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight_VD, padding_idx
        return F.embedding(ids, weight_VD, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        ids_N, grad_ND = ids.reshape(-1), grad_out.reshape(-1, weight.shape[1]).to(weight.dtype)
        if ctx.padding_idx is not None:
            keep = ids_N != ctx.padding_idx
            ids_N, grad_ND = ids_N[keep], grad_ND[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids_N, grad_ND)
        return None, None, None


def add_into_grad(model: torch.nn.Module) -> bool:
    """Hook `model`'s input embedding (a plain nn.Embedding: no max_norm, scale_grad_by_freq or
    sparse gradient); whether it did."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None or \
            embedding.scale_grad_by_freq or embedding.sparse:
        return False

    def hook(module, args, kwargs, output):
        weight = module.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return output
        ids = args[0] if args else kwargs["input"]
        return _EmbeddingIntoGrad.apply(ids, weight, module.padding_idx)

    embedding.register_forward_hook(hook, with_kwargs=True)
    return True
