"""Packed attention at linear cost: each datum of a packed micro-batch attends only to itself.

A MicroBatch (worker.batch) concatenates datums into one (1, T) sequence whose position ids
restart at 0 at each datum. Stock "sdpa" turns those positions into a dense (T x T)
block-diagonal mask and SDPA then runs its math kernel over all of it: T^2 time and memory.
This module registers an implementation, PACKED_ATTENTION, with transformers'
AttentionInterface and AttentionMaskInterface (no model code is patched):

- mask: none at all when there is no padding and no cache offset (a training forward). Datum
  boundaries, causality and a sliding window are then the attention function's business, as
  with transformers' flash-attention path. Anything else (the padded, KV-cached batches of
  sampling) gets the stock sdpa mask.
- attention: with no mask, every datum on its own, sum(len^2) instead of T^2:
  - CUDA in fp16/bf16: `torch.nn.attention.varlen.varlen_attn` over cu_seqlens, one kernel;
  - elsewhere (the CPU, fp32): SDPA with is_causal=True per datum, datums of equal length
    batched into one call. flex_attention was measured on the CPU and not chosen: torch 2.13
    has no flex backward on the CPU, and its compiled forward is slower than per-datum SDPA
    (BENCHMARKS.md, "Packing at linear cost").
  With a mask it is the stock sdpa attention, unchanged.

Datum boundaries come from `cu_seq_lens_q` (transformers' FlashAttentionKwargs, which
PolicyModel.hidden_states passes from MicroBatch.lengths) or, without it, from the position-id
resets. The implementation is used only for models that declare flash-attention support: their
masks are then plain causal (or sliding-window) per datum, which is what this computes.
"""

from collections import defaultdict
from itertools import accumulate
from typing import cast

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the per-datum SDPA path everywhere
    varlen_attn = None  # type: ignore[assignment]  # the optional import's fallback: None marks it missing

PACKED_ATTENTION = "cispo_packed"


def packed_attention_kwargs(lengths: list[int], device: torch.device) -> dict:
    """The decoder kwargs that name the datums of a packed (1, T) sequence: cumulative
    lengths (int32 on `device`, as flash-attention takes them) and the longest datum."""
    cu_B1, longest = _cumulative(lengths, device), max(lengths)
    return {"cu_seq_lens_q": cu_B1, "cu_seq_lens_k": cu_B1, "max_length_q": longest, "max_length_k": longest}


def use_packed_attention(model: PreTrainedModel) -> bool:
    """Switch `model` to PACKED_ATTENTION when its architecture supports flash-attention (a
    plain causal mask per datum); otherwise leave it as it is. Whether it switched."""
    if not getattr(model, "_supports_flash_attn", False):
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask interface: None (no mask is built) when every query sees exactly the keys of
    its own sequence, no padding and no cache; the stock sdpa mask otherwise."""
    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention interface. query (B, H, T, Dh), key/value (B, Hkv, S, Dh) ->
    ((B, T, H, Dh), None), as transformers' attention functions answer."""
    B, H, T, _ = query.shape
    if attention_mask is not None or key.shape[2] != T or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_ids=position_ids,
            sliding_window=sliding_window,
            **kwargs,
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Token-major (B*T, H, Dh): the datums are consecutive rows, split without copying.
    q_tHD, k_tHD, v_tHD = (x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3]) for x in (query, key, value))
    if _use_varlen(q_tHD, dropout, causal):
        if cu_seq_lens_q is None or max_length_q is None:
            lengths = _datum_lengths(B, T, position_ids)
            cu_seq_lens_q, max_length_q = _cumulative(lengths, q_tHD.device), max(lengths)
        out_tHD = _varlen(q_tHD, k_tHD, v_tHD, cu_seq_lens_q, max_length_q, scaling, sliding_window)
    else:
        lengths = (
            torch.diff(cu_seq_lens_q).tolist() if cu_seq_lens_q is not None else _datum_lengths(B, T, position_ids)
        )
        out_tHD = _per_datum_sdpa(q_tHD, k_tHD, v_tHD, lengths, dropout, scaling, causal, sliding_window)
    return out_tHD.reshape(B, T, H, value.shape[-1]), None


def _per_datum_sdpa(q_tHD, k_tHD, v_tHD, lengths, dropout, scaling, causal, sliding_window) -> torch.Tensor:
    """SDPA over each datum, the datums of one length batched into one call: fewer than
    sqrt(2T) calls per layer, since no more distinct lengths fit in T tokens. The tokens are
    reordered so that each length's datums are consecutive, unless they already are (the
    micro-batch planner packs longest first)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_length[n].append(i)
    order = [i for members in by_length.values() for i in members]
    reorder = order != list(range(len(lengths)))
    if reorder:  # token indices in the grouped order
        starts = [0, *accumulate(lengths)]
        perm_t = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(q_tHD.device)
        q_tHD, k_tHD, v_tHD = (x.index_select(0, perm_t) for x in (q_tHD, k_tHD, v_tHD))
    sizes = [n * len(members) for n, members in by_length.items()]
    gqa = {"enable_gqa": True} if q_tHD.shape[1] != k_tHD.shape[1] else {}
    outs = []
    for (n, members), q, k, v in zip(by_length.items(), *(x.split(sizes) for x in (q_tHD, k_tHD, v_tHD))):
        q, k, v = (x.view(len(members), n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # (G, H, n, Dh)
        band_nn = None
        if causal and sliding_window is not None and n > sliding_window:
            i_n = torch.arange(n, device=q.device)
            back_nn = i_n[:, None] - i_n[None, :]  # how far back each key is
            band_nn = (back_nn >= 0) & (back_nn < sliding_window)
        o_GHnD = scaled_dot_product_attention(
            q, k, v, attn_mask=band_nn, dropout_p=dropout, scale=scaling, is_causal=causal and band_nn is None, **gqa
        )
        G, H, _, Dh = o_GHnD.shape
        outs.append(o_GHnD.transpose(1, 2).reshape(G * n, H, Dh))  # one copy, token-major
    out_tHD = outs[0] if len(outs) == 1 else torch.cat(outs)
    if reorder:
        out_tHD = out_tHD.index_select(0, torch.argsort(perm_t))  # back to the packed order
    return out_tHD


def _use_varlen(q_tHD: torch.Tensor, dropout: float, causal: bool) -> bool:
    """The varlen flash kernel: CUDA (sm80+), half precision (also under autocast), no dropout,
    causal, head dim at most 256."""
    if varlen_attn is None or not q_tHD.is_cuda or dropout or not causal or q_tHD.shape[-1] > 256:
        return False
    half = _compute_dtype(q_tHD) in (torch.float16, torch.bfloat16)
    return half and torch.cuda.get_device_capability(q_tHD.device) >= (8, 0)


def _varlen(q_tHD, k_tHD, v_tHD, cu_B1, longest, scaling, sliding_window) -> torch.Tensor:
    """One varlen flash-attention call over all datums. Untested here (no GPU on the dev box)."""
    dtype = _compute_dtype(q_tHD)  # RoPE's fp32 cos/sin promote q and k out of autocast's dtype
    cu_B1 = cu_B1.to(torch.int32)
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out_tHD = varlen_attn(
        q_tHD.to(dtype),
        k_tHD.to(dtype),
        v_tHD.to(dtype),
        cu_B1,
        cu_B1,
        longest,
        longest,
        scale=scaling,
        window_size=window,
        enable_gqa=q_tHD.shape[1] != k_tHD.shape[1],
    )
    return cast(torch.Tensor, out_tHD)  # a (output, aux) tuple only when asked for with return_aux


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _datum_lengths(B: int, T: int, position_ids: torch.Tensor | None) -> list[int]:
    """Lengths of the datums in the B*T token rows: a datum starts where the position ids do
    not continue, and at every batch row."""
    if position_ids is None or T == 1:
        return [T] * B
    positions_BT = position_ids.expand(B, T)
    starts_BT = torch.ones_like(positions_BT, dtype=torch.bool)
    starts_BT[:, 1:] = positions_BT[:, 1:] != positions_BT[:, :-1] + 1
    starts = torch.nonzero(starts_BT.reshape(-1))[:, 0].tolist()
    return [b - a for a, b in zip(starts, [*starts[1:], B * T])]


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    """(N+1,) int32 cumulative lengths, as flash-attention takes them."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)


def _is_zero(offset) -> bool:
    """A plain 0 (a static cache's tensor offset is not: it gets the stock mask)."""
    return isinstance(offset, int) and offset == 0


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_mask)
