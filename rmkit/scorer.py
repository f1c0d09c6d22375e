"""Loading a checked model folder for scoring: weights, tokenizer, device, and which loader ran.

Two loaders, chosen before anything loads, and recorded on the `Scorer` (`rmkit eval` reports it):
- "rmkit-reward": `rmkit.model.RewardModel` (last-token pooling unless the checkpoint says
  otherwise). Every rmkit checkpoint, and every plain decoder folder whose head is a bias-free
  `score` layer (Llama, Qwen, Mistral, Gemma, GPT-2, ...: what TRL and OpenRLHF save). Same weights
  and last-token rule as its sequence-classification class, plus what that class lacks: records
  sharing a prompt computed once, padding on either side.
- "hf-sequence-classification": `AutoModelForSequenceClassification`, right-padded, one row per
  text. Plain folders RewardModel cannot hold, for a reason named in `Scorer.loader_reason`: a
  head that is not `score` (encoders have `classifier`), a score head with a bias, or a model
  type with no causal-LM class. Anything else that fails while loading is an error, never a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rmkit.data.records import Record
from rmkit.errors import RmkitError
from rmkit.inspection import Checkpoint, Encoding, read_json_object, tensor_names

if TYPE_CHECKING:
    import torch

    from rmkit.data.collate import EncodedRecord

DEFAULT_BATCH_SIZE = 16  # records per forward on a GPU; every response of a record rides in the same batch
FALLBACK_MAX_LENGTH = 2048  # plain folders whose config and tokenizer name no length limit
RMKIT_REWARD = "rmkit-reward"  # rmkit.model.RewardModel
HF_SEQUENCE_CLASSIFICATION = "hf-sequence-classification"  # transformers' AutoModelForSequenceClassification
LOADERS = (RMKIT_REWARD, HF_SEQUENCE_CLASSIFICATION)
LOAD_HINT = "check that the folder loads with transformers; re-save or re-download it"


@dataclass
class Scorer:
    """A loaded model, its tokenizer, how it turns records into token rows, and which loader
    made it (`loader`, one of LOADERS; `loader_reason` says why that one)."""

    checkpoint: Checkpoint
    model: Any  # forward(input_ids, attention_mask, position_ids) -> object with .rewards [N]
    tokenizer: Any
    pad_id: int
    device: "torch.device"
    dtype: "torch.dtype"
    encoding: Encoding = field(init=False)
    strip_id: int | None = None  # HF pools at the last token that is not the config's pad id
    loader: str = RMKIT_REWARD
    loader_reason: str = "rmkit checkpoint"

    def __post_init__(self) -> None:
        self.encoding = self.checkpoint.encoding
        if self.loader not in LOADERS:
            raise ValueError(f"unknown loader {self.loader!r}; one of {', '.join(LOADERS)}")

    def encode(self, record: Record) -> "EncodedRecord":
        e = self.encoding
        assert e.max_length is not None
        if e.style == "prompt+response":
            from rmkit.data.collate import encode_record

            return encode_record(record, self.tokenizer, e.max_length, e.truncation_side, e.append_eos)
        from rmkit.data.whole_text import encode_whole_text

        return encode_whole_text(record, self.tokenizer, e.max_length, e.truncation_side, self.strip_id)


class _HFReward:
    """Wraps an AutoModelForSequenceClassification so `score_shard` reads `.rewards` from it.

    Position ids are left to the model (right padding makes them those of the lone text). It
    reads one row per response: a packed (prefix-shared) batch is refused, never misread.
    """

    supports_packing = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                 position_ids: "torch.Tensor | None" = None, segment_ids: "torch.Tensor | None" = None,
                 **_: Any) -> Any:
        from rmkit.model import RewardOutput

        if segment_ids is not None:
            raise ValueError("a plain Hugging Face reward model scores one row per response; "
                             "score_shard must not pack its batches")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return RewardOutput(logits.squeeze(-1).float(), None, 0)


def default_batch_size(device: "torch.device") -> int:
    """Records per forward when --batch-size is not given: 16 on a GPU, where one text leaves the
    device idle; 1 on a CPU, where one text already keeps the cores multiplying and time follows
    the token positions computed. The flat layout computes no padding at any batch size, and
    batches of 4 or 16 prompt units ran inside batch 1's spread (bench/eval_throughput.py, 64 DSP
    business pairs, 2-core EPYC, 2026-12-06; docs/benchmarks.md), so 1 keeps memory smallest."""
    return DEFAULT_BATCH_SIZE if device.type == "cuda" else 1


def default_device() -> tuple["torch.device", "torch.dtype"]:
    """The first GPU when there is one, else the CPU, in the precision training's `launch.precision:
    auto` picks there (bf16 on a GPU and with AMX or avx512_bf16, else fp32; RMKIT_PRECISION pins
    it: `rmkit.hardware`)."""
    import torch

    from rmkit.hardware import resolve_precision

    on_gpu = torch.cuda.is_available()
    precision, _ = resolve_precision("auto", on_gpu=on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return device, torch.bfloat16 if precision == "bf16" else torch.float32


def decoder_reward_refusal(ckpt: Checkpoint, trust_remote_code: bool = False) -> str | None:
    """Why a plain folder cannot load as a RewardModel, or None when it can. Read from the
    safetensors headers and config.json (no weights load), so the choice of loader is made
    before loading and a failure while loading is never mistaken for "another kind of folder"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = tensor_names(ckpt.path)
    if "score.weight" not in names:
        heads = sorted({n.split(".")[0] for n in names if n.endswith(".weight") and n.count(".") == 1})
        return f"its head is {', '.join(f'`{h}`' for h in heads)}, not `score`" if heads else "it has no `score` head"
    if "score.bias" in names:
        return "its score head has a bias; RewardModel's has none"
    config = read_json_object(ckpt.path / "config.json")
    model_type = config.get("model_type")
    remote = trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        return f"model type {model_type!r} has no causal-LM class"
    return None


def load_scorer(ckpt: Checkpoint, device: "torch.device | None" = None, dtype: "torch.dtype | None" = None,
                trust_remote_code: bool = False) -> Scorer:
    """Load weights and tokenizer onto the device, in eval mode; a folder that passed the checks
    but still fails to load (damaged weights, weights of another shape) is a clear error too."""
    try:
        return _load_scorer(ckpt, device, dtype, trust_remote_code)
    except RmkitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise RmkitError(f"could not load {ckpt.label}: {type(e).__name__}: {first}", hint=LOAD_HINT) from None


def _load_scorer(ckpt: Checkpoint, device: "torch.device | None", dtype: "torch.dtype | None",
                 trust_remote_code: bool) -> Scorer:
    from transformers.utils import logging as hf_logging

    from rmkit.tokenizer import load_tokenizer

    if device is None or dtype is None:
        d, t = default_device()
        device, dtype = device or d, dtype or t
    refusal = None if ckpt.kind == "rmkit" else decoder_reward_refusal(ckpt, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # load reports and over-length warnings: we count truncation ourselves
    hf_logging.disable_progress_bar()  # our own bar is the progress display
    try:
        tokenizer = load_tokenizer(ckpt.path, trust_remote_code)  # no pad token: EOS pads, as training does
        if ckpt.kind == "rmkit":
            from rmkit.model import RewardModel

            model = RewardModel.from_pretrained(ckpt.path, pooling=ckpt.meta.get("pooling"), dtype=dtype,
                                                trust_remote_code=trust_remote_code)
            model.to(device).eval()
            return Scorer(ckpt, model, tokenizer, int(tokenizer.pad_token_id), device, dtype)
        model = (_load_decoder_reward(ckpt, dtype, trust_remote_code) if refusal is None
                 else _load_sequence_classifier(ckpt, dtype, trust_remote_code))
    finally:
        hf_logging.set_verbosity(verbosity)
    if ckpt.encoding.max_length is None:
        text = model.config.get_text_config()
        limits = [int(v) for v in (getattr(text, "max_position_embeddings", None), getattr(text, "n_positions", None),
                                   tokenizer.model_max_length) if isinstance(v, int) and 1 < v < 1_000_000]
        ckpt.encoding.max_length = min(limits) if limits else FALLBACK_MAX_LENGTH
    config_pad = ckpt.meta["pad_token_id"]  # HF's pooling skips it
    pad = tokenizer.pad_token_id
    pad = int(config_pad if config_pad is not None else (pad if pad is not None else 0))
    model.to(device).eval()
    if refusal is None:
        return Scorer(ckpt, model, tokenizer, pad, device, dtype, strip_id=config_pad, loader=RMKIT_REWARD,
                      loader_reason="decoder with a bias-free score head")
    text = model.config.get_text_config()
    if getattr(text, "pad_token_id", None) is None:
        # HF pools at the last token that is not padding; batching needs some pad id.
        text.pad_token_id = pad
        model.config.pad_token_id = pad
    return Scorer(ckpt, _HFReward(model), tokenizer, pad, device, dtype, loader=HF_SEQUENCE_CLASSIFICATION,
                  loader_reason=refusal)


def _load_decoder_reward(ckpt: Checkpoint, dtype: "torch.dtype", trust_remote_code: bool) -> Any:
    """A plain decoder reward folder as a `RewardModel` (last-token pooling), its `score` head
    loaded as it is; `decoder_reward_refusal` said it fits, so any failure here is an error."""
    import warnings

    from rmkit.model import RewardModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untied LM head without weights: scoring never uses it
        return RewardModel.from_pretrained(ckpt.path, pooling="last", dtype=dtype,
                                           trust_remote_code=trust_remote_code)


def _load_sequence_classifier(ckpt: Checkpoint, dtype: "torch.dtype", trust_remote_code: bool) -> Any:
    """The folder as its own `AutoModelForSequenceClassification` (one right-padded row per text)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(ckpt.path), dtype=dtype, local_files_only=True, use_safetensors=True,
        trust_remote_code=trust_remote_code)
