"""The reward model: a causal-LM decoder, a scalar head, and the LM head kept for imitation.

rewards = score(pool(decoder(input_ids))), with pooling read from the attention mask, so left
and right padding give the same reward. The causal LM's head stays attached: the imitation
loss (the paper's LM loss on the preferred response) is computed only on target positions, in
checkpointed chunks, so full [tokens, vocab] logits never exist.

Rows are either one per response or packed (`collate_packed`: each record one block
[prompt][resp_1][resp_2]..., blocks bin-packed into rows): then a 4-D mask keeps responses and
records apart, each prompt is computed once, and the rewards (one per response, same order)
equal the unshared ones. The flat layout puts every block in one unpadded row and keeps them
apart with span attention (rmkit/attention.py) instead of a mask. docs/benchmarks.md draws them.

A reward model saves as a Hugging Face `<Arch>ForSequenceClassification` folder that
`AutoModelForSequenceClassification.from_pretrained` loads with the same rewards (pooling
"last"/"eos"), or as a plain causal-LM folder (the BLT stage output).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rmkit.attention import SPAN_ATTENTION, Spans, enable_span_attention, no_mask
from rmkit.errors import RmkitError
from rmkit.io import atomic_file, atomic_write_json, atomic_write_text

POOLINGS = ("last", "eos", "mean", "max")
LM_HEAD_FILE = "lm_head.safetensors"  # an untied LM head beside a reward folder's weights
MAX_SHARD_SIZE = "2GB"


@dataclass
class RewardOutput:
    """rewards: [R] float32. lm_loss: sum(lm_weight * next-token NLL) over the imitation
    targets, i.e. the imitation loss itself (the batch's weights carry its reduction; None when
    no targets were given); lm_tokens: how many targets it runs over."""

    rewards: torch.Tensor
    lm_loss: torch.Tensor | None
    lm_tokens: int


def _sequence_arch(config: Any, causal_arch: str) -> str:
    """The `<Arch>ForSequenceClassification` class transformers maps this model type to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if name:
        return name
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if causal_arch.endswith(suffix):
            return causal_arch[: -len(suffix)] + "ForSequenceClassification"
    return causal_arch + "ForSequenceClassification"


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def _read_tensors(files: list[Path], keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in keys:
                if k in st.keys():
                    found[k] = st.get_tensor(k)
    return found


def _copy_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """param <- value (the model is built whole; engines partition it afterwards)."""
    with torch.no_grad():
        param.copy_(value.reshape(param.shape).to(param.dtype))


class RewardModel(nn.Module):
    """Decoder (`base_model`) + scalar head (`score`) + the causal LM head (`lm_head`)."""

    def __init__(self, causal_lm: Any, pooling: str = "last", head_seed: int = 0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise RmkitError(f"unknown pooling {pooling!r}", hint=f"choose one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.config = causal_lm.config
        self.generation_config = getattr(causal_lm, "generation_config", None)
        self.base_prefix: str = causal_lm.base_model_prefix
        self.base_model = getattr(causal_lm, self.base_prefix)
        self.lm_head = causal_lm.get_output_embeddings()
        self.lm_head_name = next(n for n, m in causal_lm.named_modules() if m is self.lm_head)
        self.causal_arch: str = type(causal_lm).__name__  # e.g. LlamaForCausalLM, GPT2LMHeadModel
        text = self.config.get_text_config()
        hidden = text.hidden_size
        weight = next(self.base_model.parameters())
        self.score = nn.Linear(hidden, 1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            g = torch.Generator().manual_seed(head_seed)
            self.score.weight.copy_(torch.randn((1, hidden), generator=g) / math.sqrt(hidden + 1))
        # The flat layout's attention, where this decoder's attention can take it (else None).
        self.span_attention_refusal: str | None = enable_span_attention(self.base_model)
        # Arch-specific logit transforms the causal LM's forward applies after lm_head.
        self._softcap = getattr(text, "final_logit_softcapping", None)
        self._logit_scale = getattr(text, "logit_scale", None)
        self._logits_scaling = getattr(text, "logits_scaling", None)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, pooling: str | None = None, dtype: torch.dtype = torch.float32,
                        head_seed: int = 0, trust_remote_code: bool = False) -> "RewardModel":
        """Load a causal-LM folder (new head, seeded) or a reward folder (its head and pooling).

        pooling=None takes the reward folder's saved pooling, else "last". A pooling that
        contradicts the folder's is an error: its head was trained for the other one.
        Local files and safetensors only; SDPA attention.
        """
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        path = Path(path)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
        arch = (config.architectures or [""])[0]
        is_reward = arch.endswith("ForSequenceClassification") or hasattr(config, "rmkit_pooling")
        saved_pooling = getattr(config, "rmkit_pooling", None) or ("last" if is_reward else None)
        if pooling is None:
            pooling = saved_pooling or "last"
        elif saved_pooling is not None and pooling != saved_pooling:
            raise RmkitError(f"{path} was trained with pooling {saved_pooling!r}, not {pooling!r}",
                             hint=f"set pooling to {saved_pooling!r} (or leave it unset) for this checkpoint")
        kwargs = dict(dtype=dtype, local_files_only=True, use_safetensors=True,
                      trust_remote_code=trust_remote_code, attn_implementation="sdpa")
        if not is_reward:
            causal = AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
            return cls(causal, pooling=pooling, head_seed=head_seed)

        if config.num_labels != 1:
            raise RmkitError(f"{path} is a classifier with {config.num_labels} labels, not a reward model",
                             hint="a reward folder has num_labels 1 (one scalar score)")
        causal_config = copy.deepcopy(config)
        causal_config.architectures = None  # the causal class comes from model_type
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # score.weight is "unexpected" for the causal class
        try:
            causal = AutoModelForCausalLM.from_pretrained(str(path), config=causal_config, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        model = cls(causal, pooling=pooling, head_seed=head_seed)
        files = _safetensor_files(path)
        head = _read_tensors(files, ["score.weight", "score.bias"])
        if "score.weight" not in head:
            raise RmkitError(f"{path} has no score.weight", hint="is this a reward folder saved by rmkit?")
        if "score.bias" in head:
            raise RmkitError(f"{path} has a score head with a bias; rmkit's head has none",
                             hint="convert the checkpoint or train a new head from its causal LM")
        _copy_param(model.score.weight, head["score.weight"])
        if not model.tied:
            if (path / LM_HEAD_FILE).is_file():
                lm = _read_tensors([path / LM_HEAD_FILE], [f"{model.lm_head_name}.weight"])
                _copy_param(model.lm_head.weight, lm[f"{model.lm_head_name}.weight"])
            else:
                warnings.warn(f"{path} has an untied LM head but no {LM_HEAD_FILE}: the LM head is random, "
                              "so an imitation loss would start from scratch", stacklevel=2)
        return model

    @property
    def span_attention(self) -> bool:
        """Whether this model runs the flat layout (`collate(layout="flat")`)."""
        return self.span_attention_refusal is None

    @property
    def tied(self) -> bool:
        """Whether the LM head shares its weight with the input embeddings."""
        return self.lm_head.weight is self.base_model.get_input_embeddings().weight

    def gradient_checkpointing_enable(self, every_n_layers: int = 1) -> None:
        """Recompute decoder activations in backward (memory for compute), in every
        `every_n_layers`-th layer. transformers 5.x renamed the method (the old name warns) and
        added every_n_layers; use whichever this version has, and say when it cannot skip layers."""
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(every_n_layers=every_n_layers)
        elif every_n_layers == 1:
            self.base_model.gradient_checkpointing_enable()
        else:
            raise RmkitError(f"checkpointing every {every_n_layers}-th layer needs a transformers version with "
                             "activation_checkpointing_enable(every_n_layers=...)",
                             where="train.gradient_checkpointing",
                             hint="upgrade transformers, or set train.gradient_checkpointing: true (every layer)")

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, lm_index: torch.Tensor | None = None,
                lm_token: torch.Tensor | None = None, lm_weight: torch.Tensor | None = None,
                lm_chunk_size: int = 1024, segment_ids: torch.Tensor | None = None,
                response_end: torch.Tensor | None = None, record_index: torch.Tensor | None = None,
                spans: torch.Tensor | None = None) -> RewardOutput:
        """Rewards for every response, plus the weighted imitation NLL when targets are given.

        Imitation targets (`Batch`): the hidden state at lm_index[k] = (row, position) must
        predict lm_token[k], weighted by lm_weight[k]; the same in both layouts. Packed layout
        (rows from `collate_packed`: segment_ids, response_end and record_index given,
        position_ids required): prompts are shared, the attention mask is built from
        segment_ids, and rewards are read per response.
        Flat layout (`spans` given as well: one unpadded row): attention runs span by span
        (rmkit/attention.py) and no mask is built.
        Under ZeRO-3 every rank must call lm_head equally often: the training step pads each
        rank's targets to the same count (`rmkit.train.loop.pad_lm_targets`).
        """
        if spans is not None:
            if segment_ids is None or position_ids is None or response_end is None or record_index is None:
                raise ValueError("the flat layout needs segment_ids, position_ids, response_end and record_index")
            if not self.span_attention:
                raise RmkitError(f"this model cannot take the flat layout: {self.span_attention_refusal}",
                                 hint="score it one row per response or packed (rmkit.data.collate.choose_layout)")
            read = Spans.from_tensor(spans, input_ids.device)
            dropped = RmkitError(f"{type(self.base_model).__name__} did not pass the attention spans to its attention",
                                 hint="set data.prefix_sharing: false for this model")
            try:
                hidden = self.base_model(input_ids=input_ids, attention_mask=no_mask(input_ids.device),
                                         position_ids=position_ids, use_cache=False, rmkit_spans=read)[0]
            except RuntimeError as e:  # another attention met the empty placeholder mask
                if read.calls == 0:
                    raise dropped from e
                raise
            if read.calls == 0:  # its layers never passed the spans on: every token saw the whole row
                raise dropped
            pooled = self._pool_packed(hidden, segment_ids, response_end, record_index)
        elif segment_ids is not None:
            if position_ids is None or response_end is None or record_index is None:
                raise ValueError("the packed layout needs position_ids, response_end and record_index")
            mask = self._packed_mask(segment_ids, record_index)
            out = self.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False)
            hidden = out[0]
            pooled = self._pool_packed(hidden, segment_ids, response_end, record_index)
        else:
            if position_ids is None:
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
            hidden = out[0]
            pooled = self._pool(hidden, attention_mask)
        rewards = self.score(pooled).squeeze(-1).float()
        lm_loss, lm_tokens = self._lm_loss(hidden, lm_index, lm_token, lm_weight, lm_chunk_size)
        return RewardOutput(rewards, lm_loss, lm_tokens)

    @property
    def attention_scale(self) -> float:
        """Per-token matmul FLOPs / attention FLOPs per (query, key) pair: past a row length of
        about this, attention costs more than the rest of the layer (see `packing_pays`)."""
        text = self.config.get_text_config()
        d = text.hidden_size
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or d // heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        ffn = getattr(text, "intermediate_size", None) or 4 * d
        n_ffn = 3 if getattr(text, "hidden_act", "silu") == "silu" else 2  # gated (SwiGLU) MLPs: 3 matrices
        matmul = 2 * d * heads * head_dim + 2 * d * kv * head_dim + n_ffn * d * ffn
        return matmul / (2 * heads * head_dim)

    def _packed_mask(self, segment_ids: torch.Tensor, record_index: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] mask for `collate_packed` rows: key k is visible from query q when k <= q
        and k is in q's own segment or is the prompt of q's record (segment_ids: r >= 0 response
        r, -2 - i record i's prompt, -1 pad). Padding queries see themselves only (no empty
        softmax row, so no NaN). Boolean for SDPA (True = attend), additive float for eager."""
        seg = segment_ids
        n = seg.shape[1]
        idx = torch.arange(n, device=seg.device)
        causal = idx[None, :] <= idx[:, None]  # [q, k]
        rec = record_index.to(seg.device)
        # the prompt segment each token may see: its own for prompt tokens, its record's for responses
        owner = torch.where(seg >= 0, -2 - rec[seg.clamp(min=0)] if rec.numel() else seg, seg)
        key, query, own = seg[:, None, :], seg[:, :, None], owner[:, :, None]
        allowed = causal[None] & (key != -1) & ((key == query) | (key == own))
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=seg.device)[None]
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl in ("sdpa", SPAN_ATTENTION):  # span attention is sdpa when no spans are given
            return allowed[:, None]
        if impl == "eager":
            dtype = self.score.weight.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)[:, None]
        raise RmkitError(f"prefix sharing needs sdpa or eager attention, and this model uses {impl!r}",
                         hint="set data.prefix_sharing: false in the recipe")

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()
        if self.pooling in ("last", "eos"):
            # Last attended position (argmax returns the first max of position * mask).
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (positions * mask).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.unsqueeze(-1)
        if self.pooling == "mean":
            # where(), not multiply: padded positions may hold NaN under left padding.
            total = torch.where(m, hidden, 0).float().sum(1)
            return (total / m.sum(1).clamp(min=1)).to(hidden.dtype)
        return hidden.masked_fill(~m, float("-inf")).max(1).values

    def _pool_packed(self, hidden: torch.Tensor, segment_ids: torch.Tensor, response_end: torch.Tensor,
                     record_index: torch.Tensor) -> torch.Tensor:
        """[R, H] per response: its last token ("last"/"eos"), or mean/max over its record's
        prompt tokens plus its own tokens, as its unshared row would pool them."""
        rows, ends = response_end[:, 0], response_end[:, 1]
        if self.pooling in ("last", "eos"):
            return hidden[rows, ends]
        b, n, h = hidden.shape
        r = rows.shape[0]
        n_rec = int(record_index.max()) + 1 if r else 0
        # Bucket per token: response r -> r, record i's prompt -> R + i, padding -> R + n_rec (unused).
        seg = segment_ids.reshape(-1)
        bucket = torch.where(seg >= 0, seg, r - 2 - seg)
        bucket = torch.where(seg == -1, torch.full_like(seg, r + n_rec), bucket)
        flat = hidden.reshape(b * n, h)
        own = torch.arange(r, device=seg.device)
        prompt = r + record_index.to(seg.device)
        size = r + n_rec + 1
        if self.pooling == "mean":
            sums = flat.new_zeros((size, h), dtype=torch.float32).index_add(0, bucket, flat.float())
            counts = torch.zeros(size, device=seg.device).index_add(0, bucket, torch.ones(b * n, device=seg.device))
            total = sums[own] + sums[prompt]
            return (total / (counts[own] + counts[prompt]).clamp(min=1)[:, None]).to(hidden.dtype)
        start = flat.new_full((size, h), float("-inf"))
        top = start.scatter_reduce(0, bucket[:, None].expand(-1, h), flat, "amax", include_self=True)
        return torch.maximum(top[own], top[prompt])

    def _lm_loss(self, hidden: torch.Tensor, index: torch.Tensor | None, token: torch.Tensor | None,
                 weight: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor | None, int]:
        if index is None or token is None or weight is None:
            return None, 0
        if chunk < 1:
            raise ValueError(f"lm_chunk_size must be >= 1, got {chunk}")
        n = int(token.shape[0])
        if n == 0:
            return None, 0
        h = hidden[index[:, 0], index[:, 1]]  # [n, H]: only the positions that predict a target
        w = weight.to(hidden.device, torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            total = total + checkpoint(self._ce_sum, h[part], token[part], w[part], use_reentrant=False)
        return total, n

    def _ce_sum(self, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # the module, so ZeRO-3 hooks gather its weight
        if self._logit_scale is not None:
            logits = logits * self._logit_scale
        if self._logits_scaling is not None:
            logits = logits / self._logits_scaling
        logits = logits.float()
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return (F.cross_entropy(logits, y, reduction="none") * w).sum()

    # ---- saving --------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, kind: str = "reward", tokenizer: Any = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a Hugging Face folder into out_dir (the caller makes it atomic).

        kind="reward": `<Arch>ForSequenceClassification` (num_labels 1, pad_token_id,
        rmkit_pooling), keys `<prefix>.*` + `score.weight`; an untied LM head goes to
        lm_head.safetensors so imitation can continue from this folder. kind="causal": a plain
        causal-LM folder. state_dict: full weights with this module's keys (base_model.*,
        lm_head.*, score.weight), e.g. gathered from ZeRO-3; default this module's own.
        """
        if kind not in ("reward", "causal"):
            raise ValueError(f"kind must be 'reward' or 'causal', got {kind!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        tensors = {f"{self.base_prefix}.{k[len('base_model.'):]}": v
                   for k, v in sd.items() if k.startswith("base_model.")}
        head = {f"{self.lm_head_name}.{k[len('lm_head.'):]}": v for k, v in sd.items() if k.startswith("lm_head.")}
        config = copy.deepcopy(self.config)
        text = config.get_text_config()
        pad_id = tokenizer.pad_token_id if tokenizer is not None else text.pad_token_id
        if pad_id is not None:
            text.pad_token_id = int(pad_id)
            if text is not config:
                config.pad_token_id = int(pad_id)

        if kind == "reward":
            if "score.weight" not in sd:
                raise ValueError("state_dict has no score.weight")
            tensors["score.weight"] = sd["score.weight"]
            config.architectures = [_sequence_arch(config, self.causal_arch)]
            config.num_labels = 1
            config.rmkit_pooling = self.pooling
            if not self.tied:
                _write_safetensors(out / LM_HEAD_FILE, head)
        else:
            config.architectures = [self.causal_arch]
            if "rmkit_pooling" in config.__dict__:
                del config.rmkit_pooling
            if not self.tied:
                tensors.update(head)
            if self.generation_config is not None:
                gen = self.generation_config.to_dict()
                if pad_id is not None:
                    gen["pad_token_id"] = int(pad_id)
                atomic_write_json(out / "generation_config.json", gen)
        floating = [v for v in tensors.values() if v.is_floating_point()]
        if floating:
            config.dtype = floating[0].dtype
        _write_weights(out, tensors)
        atomic_write_text(out / "config.json", config.to_json_string(use_diff=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    return t.detach().to("cpu").contiguous().clone()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    data = save({k: _cpu(v) for k, v in tensors.items()}, metadata={"format": "pt"})
    with atomic_file(path, "wb") as f:
        f.write(data)


def _write_weights(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """model.safetensors, or shards of at most MAX_SHARD_SIZE plus the index HF expects."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        _write_safetensors(out / filename, {k: tensors[k] for k in keys})
    if split.is_sharded:
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": split.metadata.get("total_size")},
                           "weight_map": split.tensor_to_filename})
