"""The models a server (or `rmkit.load`) holds, and the domains that name them.

A domain is one reward function: a full checkpoint (an rmkit checkpoint or any Hugging Face reward
folder, loaded by `rmkit.scorer.load_scorer` exactly as `rmkit eval` loads it), or a LoRA adapter
checkpoint of `rmkit train` with `model.lora`. Adapters of one base share ONE copy of that base in
memory: the base is loaded once, every adapter is injected into it with peft under its own
adapter name, and each domain keeps its own reward head (a [1, hidden] vector). Before a forward
the registry switches every LoRA layer to the domain's adapter (or disables them all for the base
itself) and puts the domain's head in place. A mixed batch is therefore scored grouped by domain:
peft's per-sample adapters split a batch by row, and a packed row (`rmkit.data.collate`) can hold
records of several domains, so one forward per domain is the exact choice.

`score` runs in one thread only (the server's model thread): switching adapters is not
thread-safe, and one thread keeps the forwards from fighting over the cores.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmkit.data.records import Record
from rmkit.errors import RmkitError

if TYPE_CHECKING:
    import torch

    from rmkit.data.collate import EncodedRecord
    from rmkit.scorer import Scorer

DEFAULT_DOMAIN = "default"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # also a valid peft adapter name
FP_SHOWN = 16


@dataclass
class Domain:
    """One servable reward function; `adapter` None means the model's own weights."""

    name: str
    scorer: "Scorer"  # model shared by every domain of one base; encoding and tokenizer are this domain's
    model_id: str  # which loaded model (base) the domain runs on
    adapter: str | None
    head: Any  # the reward head module put in place before this domain's forward
    lineage: dict[str, Any]


@dataclass
class LoadedModel:
    """One set of weights in memory and the LoRA layers injected into it (if any)."""

    model_id: str
    model: Any
    lora_layers: list[Any] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    active: tuple[str | None, int] | None = None  # (adapter, id(head)) now in place


def parse_domain_arg(arg: str) -> tuple[str, str]:
    """NAME=CKPT_OR_ADAPTER -> (name, path); the name must be a plain identifier."""
    name, sep, path = arg.partition("=")
    if not sep or not path:
        raise RmkitError(f"--domain {arg!r} is not NAME=CKPT", where="--domain",
                         hint="e.g. --domain business=runs/crft-business/final")
    if not NAME_RE.match(name):
        raise RmkitError(f"domain name {name!r} must start with a letter and hold only letters, digits, _ or -",
                         where=f"--domain {arg}")
    return name, path


def _is_adapter(path: Path) -> bool:
    import json

    from rmkit.checkpoint import META_FILE

    meta = path / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("kind") == "adapter"
    except (OSError, ValueError, AttributeError):
        return False  # inspect_checkpoint reports the damage with its own message


class Registry:
    """Loaded models and the domains that name them."""

    def __init__(self, device: "torch.device", dtype: "torch.dtype") -> None:
        self.device = device
        self.dtype = dtype
        self.models: dict[str, LoadedModel] = {}
        self.domains: dict[str, Domain] = {}
        self.default = DEFAULT_DOMAIN

    # ---- loading ----------------------------------------------------------------------------
    def add(self, name: str, path: str | Path, trust_remote_code: bool = False) -> Domain:
        """Load a full checkpoint or attach an adapter (its base loaded once, shared)."""
        if name in self.domains:
            raise RmkitError(f"domain {name!r} is given twice", where="--domain", hint="name each domain once")
        folder = Path(path).expanduser()
        domain = (self._add_adapter(name, folder) if folder.is_dir() and _is_adapter(folder)
                  else self._add_full(name, folder, trust_remote_code))
        self.domains[name] = domain
        return domain

    def _add_full(self, name: str, folder: Path, trust_remote_code: bool) -> Domain:
        from rmkit.inspection import inspect_checkpoint
        from rmkit.scorer import load_scorer

        ckpt = inspect_checkpoint(folder)
        model_id = str(folder.resolve())
        loaded = self.models.get(model_id)
        if loaded is not None:  # already loaded as some adapter's base: share it
            scorer = self._scorer_on(loaded.model, ckpt, "the base an adapter loaded")
        else:
            scorer = load_scorer(ckpt, self.device, self.dtype, trust_remote_code)
            loaded = self.models[model_id] = LoadedModel(model_id, scorer.model)
        head = getattr(scorer.model, "score", None)
        lineage = {"kind": ckpt.kind, "path": model_id, "loader": scorer.loader, "encoding": ckpt.encoding.as_dict(),
                   **{k: ckpt.meta.get(k) for k in ("stage", "domain", "step", "parent", "pooling",
                                                    "base_model", "merged_from", "architectures")
                      if ckpt.meta.get(k) is not None}}
        return Domain(name, scorer, model_id, None, head, lineage)

    def _scorer_on(self, model: Any, ckpt: Any, reason: str) -> "Scorer":
        """A Scorer for `ckpt` that runs on an already loaded RewardModel (its tokenizer loaded here)."""
        from rmkit.scorer import RMKIT_REWARD, Scorer
        from rmkit.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ckpt.path)  # no pad token: EOS pads, as training does
        if ckpt.encoding.max_length is None:
            text = model.config.get_text_config()
            ckpt.encoding.max_length = int(getattr(text, "max_position_embeddings", 2048))
        return Scorer(ckpt, model, tokenizer, int(tokenizer.pad_token_id), self.device, self.dtype,
                      loader=RMKIT_REWARD, loader_reason=reason)

    def _base_for(self, base: Path, pooling: str | None) -> LoadedModel:
        """The loaded model of `base`, loading it (as a RewardModel) the first time it is named."""
        from rmkit.model import RewardModel

        model_id = str(base.resolve())
        loaded = self.models.get(model_id)
        if loaded is None:
            model = RewardModel.from_pretrained(base, pooling=pooling, dtype=self.dtype)
            model.to(self.device).eval()
            loaded = self.models[model_id] = LoadedModel(model_id, model)
        if not hasattr(loaded.model, "base_model") or not hasattr(loaded.model, "score"):
            raise RmkitError(f"{base} is served as a plain sequence classifier; its adapters need it as a decoder "
                             "reward model", hint="serve the adapter's domain from a merged folder (`rmkit merge`)")
        if pooling is not None and getattr(loaded.model, "pooling", pooling) != pooling:
            raise RmkitError(f"an adapter of {base} was trained with pooling {pooling!r}, but the base is loaded "
                             f"with {loaded.model.pooling!r}", hint="serve it from a merged folder (`rmkit merge`)")
        return loaded

    def _add_adapter(self, name: str, folder: Path) -> Domain:
        import torch
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        from rmkit.inspection import Checkpoint, Encoding
        from rmkit.lora import ADAPTER_NAME, HEAD_KEY, adapter_fingerprint, read_adapter
        from rmkit.merge import check_base, read_adapter_meta

        meta = read_adapter_meta(folder)
        base, base_fp = check_base(meta, folder, None)  # the base on disk must be the one trained on
        loaded = self._base_for(base, meta.get("pooling"))
        model = loaded.model
        config, tensors = read_adapter(folder, model.base_prefix)
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                          target_modules=list(config["target_modules"]), bias="none")
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
            warnings.simplefilter("ignore")
            inject_adapter_in_model(lora, model.base_model, adapter_name=name)
        params = dict(model.named_parameters())
        own = {n for n in params if ".lora_" in n and re.search(rf"\.{re.escape(name)}(\.|$)", n)}
        renamed = {re.sub(rf"(\.lora_[A-Za-z_]+)\.{ADAPTER_NAME}(\.|$)", rf"\1.{name}\2", k): v
                   for k, v in tensors.items() if k != HEAD_KEY}
        if set(renamed) != own or HEAD_KEY not in tensors:
            missing, extra = sorted(own - set(renamed))[:3], sorted(set(renamed) - own)[:3]
            raise RmkitError(f"adapter {folder} does not fit its base {base}: missing {missing}, unexpected {extra}",
                             where=f"--domain {name}", hint="the adapter was trained on another architecture")
        with torch.no_grad():
            for key, value in renamed.items():
                params[key].copy_(value.to(params[key].dtype))
        head = torch.nn.Linear(model.score.in_features, 1, bias=False, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            head.weight.copy_(tensors[HEAD_KEY].reshape(head.weight.shape).to(self.dtype))
        head.requires_grad_(False)
        model.requires_grad_(False)
        model.eval()
        loaded.lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        loaded.adapters.append(name)
        loaded.active = None
        enc = meta.get("encoding") or {}
        encoding = Encoding("prompt+response", int(enc.get("max_length", 512)), enc.get("truncation_side", "left"),
                            enc.get("padding_side", "right"), bool(enc.get("append_eos", False)))
        ckpt = Checkpoint(folder, str(folder), "rmkit", {k: v for k, v in meta.items() if k != "files"}, encoding, None)
        scorer = self._scorer_on(model, ckpt, "a LoRA adapter on its base")
        lineage = {"kind": "adapter", "path": str(folder.resolve()), "loader": scorer.loader,
                   "encoding": encoding.as_dict(),
                   **{k: meta.get(k) for k in ("stage", "domain", "step", "parent", "pooling", "lora")
                      if meta.get(k) is not None},
                   "base": {"path": str(base.resolve()), "fingerprint": base_fp},
                   "adapter_fingerprint": adapter_fingerprint(folder, base_fp)}
        return Domain(name, scorer, loaded.model_id, name, head, lineage)

    # ---- scoring (the model thread only) --------------------------------------------------
    def get(self, name: str | None) -> Domain:
        domain = self.domains.get(self.default if name is None else name)
        if domain is None:
            raise KeyError(name)
        return domain

    def encode(self, domain: str | None, record: Record) -> "EncodedRecord":
        return self.get(domain).scorer.encode(record)

    def _activate(self, domain: Domain) -> None:
        """Put the domain's adapter and head in place on its shared model (no-op when already)."""
        loaded = self.models[domain.model_id]
        state = (domain.adapter, id(domain.head))
        if not loaded.lora_layers or loaded.active == state:
            return
        for layer in loaded.lora_layers:
            on = domain.adapter is not None and domain.adapter in layer.lora_A
            layer.enable_adapters(on)
            if on:
                layer.set_adapter(domain.adapter)
        loaded.model.score = domain.head
        loaded.active = state

    def score(self, domain: str | None, encoded: list["EncodedRecord"], batch_size: int | None = None) -> list[list[float]]:
        """Rewards per record (one per response), in order; `batch_size` records per forward (all
        of them when None: the caller already bounded the batch by its token budget)."""
        import torch

        from rmkit.score import score_shard

        if not encoded:
            return []
        d = self.get(domain)
        self._activate(d)
        s = d.scorer
        packs = getattr(s.model, "supports_packing", True)
        with torch.inference_mode():
            out = score_shard(s.model, encoded, batch_size or len(encoded), s.pad_id, s.encoding.padding_side,
                              rank=0, world=1, device=s.device, prefix_sharing=packs)
        rewards: list[list[float]] = [[] for _ in encoded]
        for i, r in out:
            rewards[i] = r
        return rewards

    # ---- reports ----------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Each domain with its lineage (what /v1/models lists)."""
        out = []
        for name, d in self.domains.items():
            shared = [n for n, o in self.domains.items() if o.model_id == d.model_id and n != name]
            out.append({"id": name, "default": name == self.default, "model": d.model_id,
                        "shares_base_with": shared, **d.lineage})
        return out

    def memory_bytes(self) -> int:
        """Bytes of every distinct parameter and buffer storage held (shared storage counted once)."""
        seen: dict[int, int] = {}
        modules = [m.model for m in self.models.values()] + [d.head for d in self.domains.values() if d.head is not None]
        import torch

        for m in modules:
            inner = m if isinstance(m, torch.nn.Module) else m.model  # _HFReward wraps the HF model
            for t in list(inner.parameters()) + list(inner.buffers()):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())


def build_registry(main: str | Path, domains: list[tuple[str, str]] | None = None, device: Any = None,
                   dtype: Any = None, trust_remote_code: bool = False) -> Registry:
    """Check every folder first (a bad one fails before any weights load), then load each once."""
    from rmkit.inspection import inspect_checkpoint
    from rmkit.scorer import default_device

    pairs = [(DEFAULT_DOMAIN, str(main))] + list(domains or [])
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RmkitError(f"domain {dup[0]!r} is given twice", where="--domain",
                         hint=f"'{DEFAULT_DOMAIN}' is CKPT itself; name each --domain once")
    for name, path in pairs:
        folder = Path(path).expanduser()
        where = "CKPT" if name == DEFAULT_DOMAIN else f"--domain {name}={path}"
        try:
            if folder.is_dir() and _is_adapter(folder):
                from rmkit.merge import read_adapter_meta

                read_adapter_meta(folder)
            else:
                inspect_checkpoint(folder)
        except RmkitError as e:
            e.where = e.where or where
            raise
    d, t = default_device()
    registry = Registry(device or d, dtype or t)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Full checkpoints first, so a base that is also served keeps the Scorer `rmkit eval` gives it
    # (encoding, pad handling); then each adapter attaches to its base; domains keep the given order.
    adapters = {n for n, p in pairs if Path(p).expanduser().is_dir() and _is_adapter(Path(p).expanduser())}
    for name, path in sorted(pairs, key=lambda np: np[0] in adapters):
        registry.add(name, path, trust_remote_code)
    registry.domains = {n: registry.domains[n] for n, _ in pairs}
    return registry
