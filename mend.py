"""MEND core (paper §2-3): the demonstration distiller, the conditioning of the frozen LLM, and the losses.

- `MEND`: a small LM of the LLM's family (GPT-2 for GPT-2 LLMs, the T5 *encoder* for T5 LLMs) reads the
  demonstrations D followed by `l` learned placeholder vectors; its last-layer states at the placeholders,
  projected to the LLM width, are the distillation vectors S_D (B, l, d_llm)
  (§3: S_D = MEND(concat(E_D, E_phi))[-l:]).
- `PromptTuning`: the baseline: `l` learned vectors in LLM space, no demonstrations; same `.distill(...)` API.
- `llm_logits`: the frozen LLM conditioned on nothing (zero-shot), on the demonstrations' tokens (vanilla ICL and
  the teacher, Eq. 1) or on S_D (the student, Eq. 2). `prefix_cache` runs a shared prefix once (eval, bench).
- Losses: `kl_distill_loss` (Eq. 3), `pred_loss` (Eq. 4), and `mend_loss`, which puts them together for every
  training objective (pretraining, finetuning, HyperTuning's CLM and the ablations).

Imports model.py only (GPT2 / T5 / build_model). Batches are duck-typed: any object with demo_ids, demo_mask,
query_ids, query_mask, target_ids, target_mask (B, T) long tensors, right-padded, mask 1 = real (data.EpisodeBatch).
Used by train.py, eval.py, bench.py.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

import model

INITS = ("random", "vocab")
PROJECTIONS = ("auto", "tanh", "linear", "identity")
OBJECTIVES = ("distill", "clm", "clm+distill", "finetune", "pred")
KL_WINDOWS = ("paper", "official")


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _pack(embeds, mask):
    """Move each row's real positions to the front (order kept) and trim columns that are padding in every row.
    Returns packed (B, T', d), packed_mask (B, T') with ones then zeros, and newpos (B, T): the packed index of
    every original position (for padding positions: the index of the last real position before it, or -1).
    Packing makes every row look exactly like that row alone followed by padding, so absolute positions (GPT-2,
    cumsum of the mask) and relative positions (T5) are those of the row alone: padding-invariant by construction."""
    mask = mask.to(torch.long)
    B, T, d = embeds.shape
    order = torch.argsort((mask == 0).to(torch.int32), dim=1, stable=True)      # (B, T) real positions first
    packed = embeds.gather(1, order[..., None].expand(B, T, d))
    n = mask.sum(1)                                                             # (B,)
    width = max(int(n.max()), 1) if B > 0 and T > 0 else T
    packed_mask = (torch.arange(width, device=mask.device)[None, :] < n[:, None]).to(torch.long)
    return packed[:, :width], packed_mask, mask.cumsum(1) - 1


def _llm_key(name):
    """How two LLM names are compared: the last path component, lower case ('openai-community/gpt2-large',
    'gpt2-large' and '/ckpt/gpt2-large/' are the same LLM)."""
    return str(name).strip().rstrip("/\\").replace("\\", "/").split("/")[-1].lower()


def _write_json_atomic(path, obj):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_weights_atomic(module, path):
    tmp = Path(str(path) + ".tmp")
    save_model(module, str(tmp))    # drops the duplicate names of tied weights (wte/lm_head, shared/embed_tokens)
    model.fsync(tmp)
    os.replace(tmp, path)


def _read_config(ckpt_dir, kind):
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"mend.py: {path} not found: expected a folder written by {kind}.save(dir)")
    cfg = json.loads(path.read_text())
    if cfg.get("kind") not in ("mend", "prompt_tuning"):
        raise ValueError(f"mend.py: {path}: expected 'kind' to be 'mend' or 'prompt_tuning', got {cfg.get('kind')!r}")
    return cfg


def _check_llm(ckpt_dir, cfg, llm_name):
    saved = cfg.get("llm_name", "")
    if llm_name is not None and saved and _llm_key(saved) != _llm_key(llm_name):
        raise ValueError(f"mend.py: checkpoint {ckpt_dir} was trained for LLM '{saved}' (d_llm={cfg.get('d_llm')}); "
                         f"refusing to load it for LLM '{llm_name}'")


def freeze(llm):
    """The LLM is frozen (§3.2): eval mode (no dropout) and requires_grad False on every parameter. Idempotent."""
    llm.eval()
    for p in llm.parameters():
        p.requires_grad_(False)
    return llm


# ----------------------------------------------------------------------------------------------------------------
# the distiller (§3) and the PromptTuning baseline

class MEND(nn.Module):
    """Demonstration distiller: S_D = proj(MEND(concat(E_D, E_phi))[-l:])   (§3, Fig. 2).

    distiller: a model.GPT2 (causal; for GPT-2 LLMs) or model.T5 (only its encoder is used; for T5 LLMs).
    d_llm: the LLM's width. l: number of placeholders / distillation vectors. init: "random" = N(0, 0.02)
    placeholders, "vocab" = copies of the distiller's embeddings of l random token ids >= 100 (official code).
    projection: "auto" (official: Linear + tanh when d_s != d_llm, identity otherwise), "tanh", "linear", "identity".
    Random draws use torch's global generator (seed it before building)."""

    def __init__(self, distiller, d_llm, l=100, init="random", llm_name="", distiller_name="", projection="auto"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"mend.py: MEND(init={init!r}): expected one of {INITS}")
        if projection not in PROJECTIONS:
            raise ValueError(f"mend.py: MEND(projection={projection!r}): expected one of {PROJECTIONS}")
        if l < 1:
            raise ValueError(f"mend.py: MEND(l={l}): expected l >= 1")
        d_s = distiller.hidden_size
        if projection == "auto":
            projection = "identity" if d_s == d_llm else "tanh"
        if projection == "identity" and d_s != d_llm:
            raise ValueError(f"mend.py: MEND(projection='identity'): distiller width {d_s} != d_llm {d_llm}")
        self.distiller = distiller
        self.d_llm, self.l, self.init, self.projection = int(d_llm), int(l), init, projection
        self.llm_name, self.distiller_name = str(llm_name), str(distiller_name)
        # the l placeholders E_phi: a separate (l, d_s) parameter, no vocabulary change (as the official code)
        ref = next(distiller.parameters())
        if init == "random":
            weight = torch.randn(l, d_s) * 0.02
        else:
            V = distiller.vocab_size
            ids = torch.randint(100 if V > 100 else 0, V, (l,))                  # drawn on the CPU generator
            with torch.no_grad():
                weight = distiller.embed_tokens(ids.to(ref.device)).detach().float().cpu().clone()
        self.placeholders = nn.Parameter(weight.to(dtype=ref.dtype, device=ref.device))  # (l, d_s)
        self.proj = nn.Linear(d_s, d_llm).to(dtype=ref.dtype, device=ref.device) if projection != "identity" else None
        if distiller.is_encoder_decoder:
            # only shared embeddings + encoder are used: freeze the rest so optimizers and DDP ignore it
            for name, p in distiller.named_parameters():
                if not (name.startswith("encoder.") or name.startswith("shared.")):
                    p.requires_grad_(False)

    def distill(self, demo_ids, demo_mask):
        """demo_ids, demo_mask (B, Td) -> S_D (B, l, d_llm). The placeholders go right after each row's real
        tokens, so a row gives the same S_D alone or in any padded batch."""
        B, Td = demo_ids.shape
        l, dev = self.l, demo_ids.device
        E = self.distiller.embed_tokens(demo_ids)                                  # (B, Td, d_s)
        P = self.placeholders.to(E.dtype)                                          # (l, d_s)
        packed = _pack(E, demo_mask)[0] if Td > 0 else E                         # (B, max n, d_s)
        n = demo_mask.to(torch.long).sum(1)                                        # (B,) real demo tokens
        Tp = packed.size(1)
        T = Tp + l
        t = torch.arange(T, device=dev)[None, :]                                   # (1, T)
        slot = t - n[:, None]                                                      # (B, T) placeholder index
        # concat(E_D, E_phi) per row: append the l placeholders after the packed columns, then move them to
        # positions n..n+l-1 of each row with one gather whose index is a permutation of the T columns (the padding
        # goes after them). Its backward writes each gradient once, so P's gradient is a plain sum over the batch:
        # indexing P[slot] instead accumulated it with index_put_, whose summation order varied from run to run on
        # 2 CPU threads (training was not bit-reproducible)
        full = torch.cat([packed, P[None].expand(B, l, packed.size(-1))], 1)      # (B, T, d_s)
        src = torch.where(slot < 0, t, torch.where(slot < l, Tp + slot, t - l))   # (B, T) a permutation per row
        x = full.gather(1, src[..., None].expand(B, T, full.size(-1)))            # (B, T, d_s)
        mask = (t < (n + l)[:, None]).to(torch.long)                               # (B, T)
        if self.distiller.is_encoder_decoder:
            h = self.distiller.encode(inputs_embeds=x, attention_mask=mask)        # bidirectional T5 encoder
        else:
            h = self.distiller(inputs_embeds=x, attention_mask=mask, return_logits=False).hidden_states  # after ln_f
        idx = n[:, None] + torch.arange(l, device=dev)[None, :]                    # (B, l) placeholder positions
        s = h.gather(1, idx[..., None].expand(B, l, h.size(-1)))                   # (B, l, d_s)
        if self.proj is not None:
            s = self.proj(s)
            if self.projection == "tanh":
                s = torch.tanh(s)                                                  # official MyPooler
        return s                                                                   # (B, l, d_llm)

    forward = distill

    def save(self, out_dir):
        """model.safetensors + config.json (everything needed to rebuild offline); atomic writes."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dcfg = self.distiller.config.to_dict()
        dcfg.setdefault("model_type", "t5" if self.distiller.is_encoder_decoder else "gpt2")
        _save_weights_atomic(self, out / "model.safetensors")
        _write_json_atomic(out / "config.json", dict(
            kind="mend", l=self.l, init=self.init, projection=self.projection, llm_name=self.llm_name,
            d_llm=self.d_llm, distiller_name=self.distiller_name, distiller_config=dcfg))

    @classmethod
    def from_pretrained(cls, ckpt_dir, llm_name=None, dtype=torch.float32, device="cpu"):
        """Rebuild from save(dir). llm_name: the LLM it will condition; a checkpoint trained for another LLM is
        refused. Does not consume torch's global random state."""
        cfg = _read_config(ckpt_dir, "MEND")
        if cfg["kind"] != "mend":
            raise ValueError(f"mend.py: {ckpt_dir} holds a '{cfg['kind']}' checkpoint, not 'mend' (use mend.load)")
        _check_llm(ckpt_dir, cfg, llm_name)
        with torch.random.fork_rng(devices=[]):
            distiller = model.build_model(cfg["distiller_config"])
            m = cls(distiller, cfg["d_llm"], l=cfg["l"], init=cfg["init"], llm_name=cfg["llm_name"],
                    distiller_name=cfg["distiller_name"], projection=cfg["projection"])
        load_model(m, str(Path(ckpt_dir) / "model.safetensors"), strict=True)
        return model.cast(m, dtype, device).eval()   # dtype: torch dtype or "fp32"/"bf16"/"fp16"; T5 wo fp32 in fp16


class PromptTuning(nn.Module):
    """PromptTuning baseline (Lester et al., 2021): S = l learned vectors in LLM space, shared by every task,
    ignoring the demonstrations. init: N(0, 0.02) or a given (l, d_llm) tensor (e.g. LLM embedding rows)."""

    def __init__(self, l, d_llm, llm_name="", init_embeddings=None):
        super().__init__()
        if init_embeddings is not None:
            if tuple(init_embeddings.shape) != (l, d_llm):
                raise ValueError(f"mend.py: PromptTuning(init_embeddings): expected shape ({l}, {d_llm}), "
                                 f"got {tuple(init_embeddings.shape)}")
            weight = init_embeddings.detach().clone().float()
        else:
            weight = torch.randn(l, d_llm) * 0.02
        self.prompt = nn.Parameter(weight)                                         # (l, d_llm)
        self.l, self.d_llm, self.llm_name = int(l), int(d_llm), str(llm_name)

    def distill(self, demo_ids, demo_mask=None):
        """(B, Td) demonstrations (ignored but for B) -> (B, l, d_llm)."""
        return self.prompt[None].expand(demo_ids.size(0), -1, -1)

    forward = distill

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _save_weights_atomic(self, out / "model.safetensors")
        _write_json_atomic(out / "config.json", dict(kind="prompt_tuning", l=self.l, d_llm=self.d_llm,
                                                     llm_name=self.llm_name))

    @classmethod
    def from_pretrained(cls, ckpt_dir, llm_name=None, dtype=torch.float32, device="cpu"):
        cfg = _read_config(ckpt_dir, "PromptTuning")
        if cfg["kind"] != "prompt_tuning":
            raise ValueError(f"mend.py: {ckpt_dir} holds a '{cfg['kind']}' checkpoint, not 'prompt_tuning' "
                             "(use mend.load)")
        _check_llm(ckpt_dir, cfg, llm_name)
        m = cls(cfg["l"], cfg["d_llm"], llm_name=cfg["llm_name"], init_embeddings=torch.zeros(cfg["l"], cfg["d_llm"]))
        load_model(m, str(Path(ckpt_dir) / "model.safetensors"), strict=True)
        return model.cast(m, dtype, device).eval()   # dtype: torch dtype or "fp32"/"bf16"/"fp16"; T5 wo fp32 in fp16


def saved_dir(path) -> Path:
    """The folder to read a checkpoint from: path, or `.{name}.old` beside it when a crash hit between the two
    renames of train.py's atomic save (path already moved aside, the new folder not yet in place)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    return path if path.exists() or not old.exists() else old


def load(ckpt_dir, llm_name=None, dtype=torch.float32, device="cpu"):
    """MEND or PromptTuning, whichever save(dir) wrote there."""
    kind = _read_config(ckpt_dir, "MEND")["kind"]
    cls = MEND if kind == "mend" else PromptTuning
    return cls.from_pretrained(ckpt_dir, llm_name=llm_name, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# conditioning the frozen LLM (Eq. 1-2)

@dataclass
class SegmentLogits:
    """query[:, j] / target[:, j] is the distribution that predicts token j of x / y (B, T, V); query is None for
    T5 (x is in the encoder) and when a cache already holds x. after (B, V): the distribution after the last real
    token of the row (decoder-only; used by the official KL window), else None.
    A token with no predictor (the first token of x in zero-shot, decoder-only) gets all-zero logits."""
    query: torch.Tensor | None
    target: torch.Tensor
    after: torch.Tensor | None = None


@dataclass
class PrefixCache:
    """A shared prefix computed once (batch 1). Decoder-only: past_key_values of [context (; x)], the logits at
    its last position (which predict the next token) and its length. T5: the encoder states of [context; x]."""
    length: int
    includes_query: bool
    past_key_values: tuple | None = None
    last_logits: torch.Tensor | None = None      # (1, V)
    encoder_states: torch.Tensor | None = None   # (1, T, d)
    encoder_mask: torch.Tensor | None = None     # (1, T)


def _context(llm, batch, context, dtype):
    """-> (embeds (B, Tc, d), mask (B, Tc)) or None for zero-shot."""
    if context is None:
        return None
    if isinstance(context, str):
        if context != "demonstrations":
            raise ValueError(f"mend.py: llm_logits(context={context!r}): expected None, 'demonstrations' "
                             "or an S_D tensor")
        return llm.embed_tokens(batch.demo_ids), batch.demo_mask.to(torch.long)    # E_D, Eq. 1
    S, B = context, batch.target_ids.size(0)
    if S.dim() != 3 or S.size(0) not in (1, B):
        raise ValueError(f"mend.py: llm_logits(context=S_D): expected (B={B} or 1, l, d_llm), got {tuple(S.shape)}")
    S = S.expand(B, -1, -1).to(dtype)                                              # one S_D may serve every row
    return S, torch.ones(S.shape[:2], dtype=torch.long, device=S.device)           # S_D, Eq. 2


def llm_logits(llm, batch, context=None, cache=None, query_logits=True):
    """The frozen LLM's next-token distributions for every token of x and y, conditioned on `context`:
    None (zero-shot) | "demonstrations" (vanilla ICL, the teacher, Eq. 1) | S_D (B or 1, l, d_llm) (Eq. 2).
    Decoder-only: one forward over concat(context, x, y) (rows packed, so padding never shifts a position).
    T5: encoder input [context; x], decoder input shift_right(y); query logits None.
    cache: a PrefixCache of a batch-1 prefix shared by every row; `context` is then ignored and only x+y (or y,
    when the cache holds x too) is run, with the cache expanded to the batch.
    query_logits=False skips the LM head over x (query None): scoring options needs only y's distributions."""
    B = batch.target_ids.size(0)
    dtype = next(llm.parameters()).dtype
    qmask, tmask = batch.query_mask.to(torch.long), batch.target_mask.to(torch.long)
    if llm.is_encoder_decoder:
        dec = llm.shift_right(batch.target_ids)                                    # (B, Ty)
        if cache is not None:
            if not cache.includes_query and batch.query_ids.size(1) > 0 and int(qmask.sum()) > 0:
                raise ValueError("mend.py: llm_logits(cache=...): a T5 cache is the whole encoder input [context; x]; "
                                 "build it with prefix_cache(llm, context, query_ids)")
            enc = cache.encoder_states.expand(B, -1, -1)
            emask = cache.encoder_mask.expand(B, -1)
            out = llm(attention_mask=emask, encoder_hidden_states=enc, decoder_input_ids=dec,
                      decoder_attention_mask=tmask)
        else:
            segs = [c for c in [_context(llm, batch, context, dtype)] if c is not None]
            segs.append((llm.embed_tokens(batch.query_ids), qmask))
            emb, emask, _ = _pack(torch.cat([s[0] for s in segs], 1), torch.cat([s[1] for s in segs], 1))
            out = llm(inputs_embeds=emb, attention_mask=emask, decoder_input_ids=dec, decoder_attention_mask=tmask)
        return SegmentLogits(None, out.logits, None)                               # logits[:, j] predicts y_j

    # decoder-only (GPT-2)
    segs = []
    if cache is None:
        ctx = _context(llm, batch, context, dtype)
        if ctx is not None:
            segs.append(ctx)
    with_query = cache is None or not cache.includes_query
    if with_query:
        segs.append((llm.embed_tokens(batch.query_ids), qmask))
    segs.append((llm.embed_tokens(batch.target_ids), tmask))
    mask = torch.cat([s[1] for s in segs], 1)                                      # (B, Tc + Tq + Ty)
    emb, pmask, newpos = _pack(torch.cat([s[0] for s in segs], 1), mask)
    if cache is None:
        out = llm(inputs_embeds=emb, attention_mask=pmask, return_logits=False)
        fallback = None
    else:
        past = tuple((k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in cache.past_key_values)
        full = torch.cat([pmask.new_ones(B, cache.length), pmask], 1)
        out = llm(inputs_embeds=emb, attention_mask=full, past_key_values=past, return_logits=False)
        fallback = cache.last_logits.expand(B, -1)
    # the LM head only where a prediction is needed (not over the demonstrations): the predictor of every x and
    # y token (the previous real position; newpos - 1) and the last real position ("after")
    Ty = batch.target_ids.size(1)
    Tq = batch.query_ids.size(1) if with_query and query_logits else 0
    T = mask.size(1)
    pred = (newpos - 1)[:, T - Ty - Tq:]                                           # (B, Tq + Ty)
    idx = torch.cat([pred, pmask.sum(1, keepdim=True) - 1], 1)                     # (B, Tq + Ty + 1)
    h = out.hidden_states                                                          # (B, T', d)
    hs = h.gather(1, idx.clamp(0, h.size(1) - 1)[..., None].expand(-1, -1, h.size(-1)))
    logits = llm.head(hs)                                                          # (B, Tq + Ty + 1, V)
    if fallback is None:
        fallback = torch.zeros((), dtype=logits.dtype, device=logits.device)     # no predictor: uniform
    else:
        fallback = fallback[:, None, :].to(logits.dtype)
    logits = torch.where((idx >= 0)[..., None], logits, fallback)
    q = logits[:, :Tq] if with_query and query_logits else None
    return SegmentLogits(q, logits[:, Tq:Tq + Ty], logits[:, -1])


def prefix_cache(llm, context=None, query_ids=None):
    """Run a shared prefix once (batch 1) for llm_logits(..., cache=...).
    context: token ids (T,) or (1, T) (vanilla ICL: the demonstrations), an S_D tensor (l, d) or (1, l, d), or None.
    query_ids: optional x (Tq,) or (1, Tq) appended to the prefix (then llm_logits runs y only).
    Decoder-only: KV cache of [context; x]. T5: encoder states of [context; x] (x is needed: the encoder is
    bidirectional, so nothing can be appended to it later)."""
    dev = next(llm.parameters()).device
    dtype = next(llm.parameters()).dtype
    parts = []
    if context is not None:
        if context.dtype in (torch.long, torch.int32, torch.int64):
            ids = context.reshape(1, -1).to(dev)
            parts.append(llm.embed_tokens(ids))
        else:
            S = context if context.dim() == 3 else context[None]
            if S.size(0) != 1:
                raise ValueError(f"mend.py: prefix_cache(context): expected batch 1, got shape {tuple(context.shape)}")
            parts.append(S.to(device=dev, dtype=dtype))
    if query_ids is not None:
        parts.append(llm.embed_tokens(query_ids.reshape(1, -1).to(dev)))
    if not parts or sum(p.size(1) for p in parts) == 0:
        raise ValueError("mend.py: prefix_cache: empty prefix (expected a context and/or query_ids)")
    emb = torch.cat(parts, 1)                                                      # (1, T, d)
    mask = torch.ones(1, emb.size(1), dtype=torch.long, device=dev)
    if llm.is_encoder_decoder:
        return PrefixCache(emb.size(1), query_ids is not None,
                           encoder_states=llm.encode(inputs_embeds=emb, attention_mask=mask), encoder_mask=mask)
    out = llm(inputs_embeds=emb, attention_mask=mask, use_cache=True, return_logits=False)
    return PrefixCache(emb.size(1), query_ids is not None, past_key_values=out.past_key_values,
                       last_logits=llm.head(out.hidden_states[:, -1]))


# ----------------------------------------------------------------------------------------------------------------
# losses (Eq. 3-4)

def kl_distill_loss(teacher_logits, student_logits, mask, temperature=1.0):
    """L_distill (Eq. 3): forward KL(P_teacher || P_student) = sum_v p_t (log p_t - log p_s) at every masked
    position, mean over those positions (per-token mean, like the official batchmean over selected rows).
    Softmaxes in fp32 at temperature T; no T^2 factor (as the official code). Teacher gradients are not needed:
    pass logits computed under no_grad. logits (B, T, V), mask (B, T)."""
    sel = mask.bool()
    if not bool(sel.any()):
        return student_logits.sum() * 0.0
    t = F.log_softmax(teacher_logits[sel].float() / temperature, -1)               # (N, V)
    s = F.log_softmax(student_logits[sel].float() / temperature, -1)               # (N, V)
    p = t.exp()
    kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)             # (N,)
    return kl.mean()


def pred_loss(logits, target_ids, mask):
    """L_pred (Eq. 4): cross-entropy of the target tokens, mean over the masked tokens of the batch (token-level).
    logits[:, j] (B, T, V) predicts target_ids[:, j] (B, T)."""
    sel = mask.bool()
    if not bool(sel.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[sel].float(), target_ids[sel])


def _official_window(mask_q, mask_y, logits_q, logits_y, after):
    """The official KL positions: the distributions *at* each x/y token (each predicting the next one), i.e. ours
    shifted by one: drop the predictor of the first real token, add the distribution after the last real token."""
    mask = torch.cat([mask_q, mask_y], 1).to(torch.long)                           # (B, T)
    first = torch.argmax(mask, 1)                                                  # first real token
    keep = mask.clone()
    keep[torch.arange(mask.size(0), device=mask.device), first] = 0
    logits = torch.cat([logits_q, logits_y, after[:, None]], 1)                    # (B, T+1, V)
    has = (mask.sum(1) > 0).to(torch.long)[:, None]
    return logits, torch.cat([keep, has], 1)


def mend_loss(llm, module, batch, objective, lam=1.0, gamma=1.0, temperature=1.0, kl_window="paper"):
    """One training loss. module: MEND or PromptTuning, or a DDP wrapper of one (called as module(ids, mask)).
    objective: "distill"      L_distill (meta-distillation pretraining, §3.2)
               "clm"          CE of the target given S_D (HyperTuning's conditional LM objective)
               "clm+distill"  CE + gamma * L_distill (Table 4 / Fig. 6a ablations)
               "finetune"     L_pred + lam * L_distill (Eq. 4)
               "pred"         L_pred only (the no-L_distill ablation; PromptTuning)
    KL positions: decoder-only: every token of x and y (Eq. 3's P(x|.)); T5: the decoder tokens y.
    kl_window="official" shifts the decoder-only window by one as the authors' code (see _official_window).
    Returns {"loss", "distill" and/or "pred" | "clm"}; the LLM is frozen and gets no gradient."""
    if objective not in OBJECTIVES:
        raise ValueError(f"mend.py: mend_loss(objective={objective!r}): expected one of {OBJECTIVES}")
    if kl_window not in KL_WINDOWS:
        raise ValueError(f"mend.py: mend_loss(kl_window={kl_window!r}): expected one of {KL_WINDOWS}")
    freeze(llm)
    S_D = module(batch.demo_ids, batch.demo_mask)      # (B, l, d_llm); forward == distill, so a DDP wrapper works
    student = llm_logits(llm, batch, S_D)
    out = {}
    if objective in ("distill", "clm+distill", "finetune"):
        with torch.no_grad():
            teacher = llm_logits(llm, batch, "demonstrations")                     # Eq. 1, the teacher
        if llm.is_encoder_decoder:
            t, s, m = teacher.target, student.target, batch.target_mask
        elif kl_window == "official":
            t, m = _official_window(batch.query_mask, batch.target_mask, teacher.query, teacher.target, teacher.after)
            s, _ = _official_window(batch.query_mask, batch.target_mask, student.query, student.target, student.after)
        else:
            t = torch.cat([teacher.query, teacher.target], 1)
            s = torch.cat([student.query, student.target], 1)
            m = torch.cat([batch.query_mask, batch.target_mask], 1)
        out["distill"] = kl_distill_loss(t, s, m, temperature)                     # Eq. 3
    if objective in ("clm", "clm+distill", "finetune", "pred"):
        key = "clm" if objective.startswith("clm") else "pred"
        out[key] = pred_loss(student.target, batch.target_ids, batch.target_mask)  # Eq. 4 / CLM
    if objective == "distill":
        out["loss"] = out["distill"]
    elif objective == "clm":
        out["loss"] = out["clm"]
    elif objective == "clm+distill":
        out["loss"] = out["clm"] + gamma * out["distill"]
    elif objective == "finetune":
        out["loss"] = out["pred"] + lam * out["distill"]                           # Eq. 4
    else:
        out["loss"] = out["pred"]
    return out
