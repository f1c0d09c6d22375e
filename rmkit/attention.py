"""Span attention: the flat layout's attention, each response against its own prompt only.

The flat layout (`collate(layout="flat")`) lays every group of a micro-batch end to end in ONE
row with no padding, [prompt_0][resp_0a][resp_0b][prompt_1][resp_1a]..., so the decoder's
matmuls run over exactly the distinct tokens, whatever the records' lengths. Attention is the
only part of the decoder that mixes tokens; here it runs per span instead of over the row:

  span (q0, q1, p0, p1): queries q0..q1-1 see the prefix p0..p1-1 whole, then themselves causally.
  a group's prompt and first response: one causal span with an empty prefix (p0 == p1);
  every further response:              a span whose prefix is its group's prompt.

So each response sees what its own unshared row holds (its prompt, then itself) at the positions
that row would give it (`position_ids`), and nothing of other responses or records; no query-key
pair outside a span is computed (a masked [L, L] row computes them all). Each span goes through
torch's `scaled_dot_product_attention` with `enable_gqa` (a GQA model's keys and values are
not copied to every query head, as transformers' sdpa does when a mask is given).

transformers 5.x routes attention through `AttentionInterface`: `enable_span_attention` registers
"rmkit_spans" there (and sdpa's mask builder under the same name), and switches a model to it when
its attention goes through that interface. Without spans the function IS sdpa, so every other
layout (one row per response, packed rows with a 4-D mask) runs unchanged. The spans reach the
attention function as the keyword argument `rmkit_spans` that every decoder layer passes down;
`Spans.calls` counts the layers that read them, so a model that dropped them is caught. A flat
forward passes `no_mask`, so transformers builds no [T, T] mask that nothing would read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SPAN_ATTENTION = "rmkit_spans"


@dataclass
class Spans:
    """One forward's spans: (q0, q1, p0, p1) per span as Python ints, covering the row's
    positions in order, and each span's boolean mask ([1, 1, q, p + q], True = attend; None for
    a plain causal span), built once per forward, shared by every layer."""

    items: list[tuple[int, int, int, int]]
    masks: list[torch.Tensor | None] = field(default_factory=list)
    calls: int = 0  # attention layers that read these spans in this forward

    @classmethod
    def from_tensor(cls, spans: torch.Tensor, device: torch.device) -> "Spans":
        items = [tuple(int(v) for v in row) for row in spans.tolist()]
        masks: list[torch.Tensor | None] = []
        for q0, q1, p0, p1 in items:
            if p1 == p0:
                masks.append(None)
                continue
            n, p = q1 - q0, p1 - p0
            m = torch.ones((n, p + n), dtype=torch.bool, device=device)
            m[:, p:] = torch.ones((n, n), dtype=torch.bool, device=device).tril()
            masks.append(m[None, None])
        return cls(items, masks)  # type: ignore[arg-type]


def span_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   rmkit_spans: Spans | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa when no spans are given; else attention span by span over one row ([1, heads, T, d]
    in, [1, T, heads, d] out, as every attention function returns)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rmkit_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or kwargs.get("sliding_window") or kwargs.get("softcap") is not None:
        raise ValueError("span attention takes one row, no sliding window and no softcap")
    rmkit_spans.calls += 1
    outs = []
    for (q0, q1, p0, p1), mask in zip(rmkit_spans.items, rmkit_spans.masks):
        if mask is None:
            k, v = key[:, :, q0:q1], value[:, :, q0:q1]
        else:
            k = torch.cat([key[:, :, p0:p1], key[:, :, q0:q1]], dim=2)
            v = torch.cat([value[:, :, p0:p1], value[:, :, q0:q1]], dim=2)
        # torch's SDPA directly: transformers repeats a GQA model's keys and values to every query
        # head whenever a mask is given, and autograd would keep those copies for backward
        out = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, q0:q1], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None,
            enable_gqa=query.shape[1] != key.shape[1])
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def no_mask(device: torch.device) -> torch.Tensor:
    """The attention_mask a flat forward passes: an empty 4-D tensor, which transformers hands to
    the attention function as it is (`_preprocess_mask_arguments`) instead of building a [T, T]
    mask from the position ids (they restart per response, which it would read as packed
    sequences); span attention ignores it."""
    return torch.ones((1, 1, 0, 0), dtype=torch.bool, device=device)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SPAN_ATTENTION, span_attention)
    AttentionMaskInterface.register(SPAN_ATTENTION, sdpa_mask)


def span_attention_refusal(decoder: Any) -> str | None:
    """Why this decoder cannot run span attention (None when it can): its attention must go
    through transformers' AttentionInterface as sdpa, with no sliding window."""
    config = decoder.config
    text = config.get_text_config()
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", SPAN_ATTENTION):
        return f"its attention is {impl!r}, not sdpa"
    if not getattr(type(decoder), "_supports_attention_backend", False):
        return f"{type(decoder).__name__} does not route attention through transformers' AttentionInterface"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "it uses a sliding attention window"
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or ())):
        return "not every layer is full attention"
    return None


def enable_span_attention(decoder: Any) -> str | None:
    """Switch `decoder` to span attention when it can run it; returns the refusal otherwise
    (and leaves the model as it was)."""
    why = span_attention_refusal(decoder)
    if why is None:
        _register()
        decoder.set_attn_implementation(SPAN_ATTENTION)
    return why
