"""Hand-written GPT-2, T5, OPT and Llama-style decoders in plain PyTorch, numerically identical to the Hugging Face
reference, plus loading.

MEND (Li et al., ICLR 2024) freezes a large language model (the LLM) and trains a small one of the same family
(the distiller). Both are built here; nothing in this file knows about MEND or data (mend.py, data.py, train.py,
eval.py and bench.py import it, never the other way round).

- GPT2: decoder-only (gpt2 ... gpt2-xl), tanh-GELU, tied LM head, F.scaled_dot_product_attention. forward() takes
  input_ids or inputs_embeds (a soft prefix such as MEND's distilled vectors S_D), an attention mask whose holes may
  be anywhere (positions = cumsum(mask) - 1), and an optional KV cache so a shared prefix (demonstrations or S_D)
  is computed once and reused across queries and answer options.
- T5: encoder-decoder, v1.0 (t5-small/base/large: ReLU FFN, tied head with d_model**-0.5 output scaling) and
  v1.1 / lm-adapt / flan-t5 (gated-GELU, untied head); relative position bias, no 1/sqrt(d) scaling. In fp16 the
  FF output projections `wo` stay fp32 (as transformers' _keep_in_fp32_modules; use cast() rather than .to()).
- OPT (opt-125m ... opt-66b): learned positions with offset 2, ReLU FFN, pre-LN (opt-350m: post-LN with
  project_in / project_out), tied or untied head. Llama-style (model_type llama, mistral, qwen2): RMSNorm, RoPE
  (rope_theta; linear / llama3 scaling), SwiGLU, grouped-query attention, Qwen2's q/k/v biases. Both share GPT-2's
  decoder-only interface (_DecoderLM): mask-derived positions, holes anywhere, batch-1 prefix caches.
- from_pretrained(name_or_path): a local folder or a hub id (via huggingface_hub's cache), any of the real
  checkpoint layouts, sharded or not, loaded shard by shard and tensor by tensor straight into the target dtype
  and device (class Checkpoint); save_pretrained() writes the layout transformers' save_pretrained writes.
- load_tokenizer(): tokenizer.json, or GPT-2's vocab.json + merges.txt.

Module and parameter names follow the checkpoints (GPT-2 keeps Conv1D's (in, out) weight layout), so loading a
family is one module class plus one key-mapping function (FAMILIES at the bottom of the file).
"""
import json
import math
import os
import pickle
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# configs: dataclasses over the keys of Hugging Face's config.json; unknown keys are kept (extra) for round trips


def _accepts(annotation, v) -> bool:  # a JSON value v for a field annotated int / float / int | None ...
    ts = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    if isinstance(v, bool):
        return bool in ts
    return isinstance(v, ts) or (float in ts and isinstance(v, int))  # JSON writes 10000.0 as 10000 too


def _type_names(annotation) -> str:
    ts = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in ts)


class _Config:
    @classmethod
    def from_dict(cls, d: dict, where="config"):
        types_ = {f.name: f.type for f in fields(cls) if f.name != "extra"}
        for k, v in d.items():
            if k in types_ and not _accepts(types_[k], v):
                raise ValueError(f"{where}: '{k}' is {v!r}, expected {_type_names(types_[k])}")
        cfg = cls(**{k: v for k, v in d.items() if k in types_})
        cfg.extra = {k: v for k, v in d.items() if k not in types_}
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **d}


@dataclass
class GPT2Config(_Config):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None -> 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | list | None = 50256  # kept for round trips (hub configs may write null or a list)
    eos_token_id: int | list | None = 50256
    model_type: str = "gpt2"
    extra: dict = field(default_factory=dict)


@dataclass
class T5Config(_Config):
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None -> num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"  # v1.0: "relu"; v1.1 / flan: "gated-gelu"
    tie_word_embeddings: bool = True  # v1.0 True (with d_model**-0.5 output scaling), v1.1 False
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    eos_token_id: int | list | None = 1
    model_type: str = "t5"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where="config"):
        cfg = super().from_dict(d, where)
        if "scale_decoder_outputs" in d:  # transformers >= 5 writes tie_word_embeddings=true always and says
            cfg.tie_word_embeddings = bool(d["scale_decoder_outputs"])  # v1.0 vs v1.1 with this key instead
            cfg.extra.pop("scale_decoder_outputs")
        return cfg


def _tanh_gelu(x):  # "gelu_new" (GPT-2, T5 v1.1): the tanh approximation, fused (equal to float rounding)
    return F.gelu(x, approximate="tanh")


ACT = {"gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_fast": _tanh_gelu, "gelu": F.gelu,
       "relu": F.relu, "silu": F.silu, "swish": F.silu}


def _act(name: str):
    if name not in ACT:
        raise ValueError(f"model.py: activation '{name}' is not supported; expected one of {sorted(ACT)}")
    return ACT[name]


def use_shape_agnostic_attention(device) -> None:
    """On CUDA, switch off PyTorch's cuDNN SDPA backend (flash / memory-efficient attention take over).

    cuDNN builds an execution plan for every new (B, T) it sees, and MEND's episodes change length every step: on an
    H200 (torch 2.11, bf16) each forward call cost 1.9 ms and each backward 2.5 ms of host time: a gpt2 -> gpt2-large
    pretraining step took 442 ms with it and 103 ms without (README, "On a GPU").
    train.py, eval.py and bench.py call this once for their device; a no-op elsewhere."""
    off = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)  # absent in torch builds without that backend
    if torch.device(device).type == "cuda" and off is not None:
        off(False)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when forward(return_logits=False): use model.head(h)
    hidden_states: torch.Tensor  # (B, T, d) last layer after the final norm (decoder's for T5)
    past_key_values: tuple | None = None  # GPT-2: per layer (k, v), each (B, n_head, T_past + T, head_dim)
    encoder_hidden_states: torch.Tensor | None = None  # T5: (B, T_enc, d)


def _check_mask(fn, name, mask, B, T, T_name="T"):  # a (B, T) mask, or (1, T) shared by the batch
    if mask is not None and (mask.dim() != 2 or mask.shape[0] not in (1, B) or mask.shape[1] != T):
        shared = "" if B == 1 else f" or (1, {T})"
        raise ValueError(f"{fn}: {name} has shape {tuple(mask.shape)}, expected (B, {T_name}) = ({B}, {T}){shared}")


def _check_positions(who, n, position_ids, limit, what, given):
    """Learned position tables (GPT-2, OPT): derived positions are < n, so only n > limit needs the (host-syncing)
    max; explicit position_ids (given) are always checked."""
    if (given or n > limit) and position_ids.numel() and int(position_ids.max()) >= limit:
        raise ValueError(f"{who}.forward: position {int(position_ids.max())} >= {what}={limit} (the sequence is "
                         "too long)")


# ----------------------------------------------------------------------------------------------------------------
# GPT-2


class Conv1D(nn.Module):
    """GPT-2's linear layer with the checkpoint's weight layout (in, out): y = x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # (..., n_in) -> (..., n_out)
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)  # (N, n_out)
        return y.view(*x.shape[:-1], y.shape[1])


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.scale = (self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0)
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, attn_mask, is_causal, past):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if past is not None:  # (B or 1, H, T_past, hd): a batch-1 prefix cache is shared by the whole batch
            pk, pv = past
            if pk.shape[0] != B:
                pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, T_past + T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc, self.c_proj = Conv1D(cfg.n_embd, inner), Conv1D(inner, cfg.n_embd)
        self.act, self.dropout = _act(cfg.activation_function), nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, attn_mask, is_causal, past):
        a, kv = self.attn(self.ln_1(x), attn_mask, is_causal, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT2(nn.Module):
    is_encoder_decoder = False

    def __init__(self, config: GPT2Config):
        super().__init__()
        if config.extra.get("tie_word_embeddings", True) is False:
            raise ValueError("model.py: GPT-2 with tie_word_embeddings=false is not supported (the head is tied)")
        self.config = config
        self.hidden_size, self.vocab_size = config.n_embd, config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))

    def embed_tokens(self, input_ids):  # (B, T) -> (B, T, d), token embeddings only
        return self.transformer.wte(input_ids)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, return_logits=True) -> LMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("GPT2.forward: give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        T_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        _check_mask("GPT2.forward", "attention_mask", attention_mask, B, T_past + T, "T_past + T")
        given = position_ids is not None
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(T_past, T_past + T, device=x.device)[None]  # (1, T)
        elif position_ids is None:  # positions count real tokens only: left padding and holes do not shift them
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        _check_positions("GPT2", T_past + T, position_ids, self.config.n_positions, "n_positions", given)
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))

        # attention: is_causal (fast path) when nothing is padded or cached, else a boolean mask (B|1, 1, T, T_k)
        attn_mask, is_causal = None, False
        if T_past == 0 and (attention_mask is None or bool(attention_mask.all())):
            is_causal = True
        elif attention_mask is not None or T > 1:
            i = torch.arange(T_past, T_past + T, device=x.device)[:, None]  # query positions in the sequence
            j = torch.arange(T_past + T, device=x.device)[None]  # key positions
            attn_mask = (j <= i)[None, None]  # (1, 1, T, T_k) causal
            if attention_mask is not None:  # drop padding keys; every query still sees itself (no NaN rows)
                attn_mask = (attn_mask & attention_mask.bool()[:, None, None, :]) | (j == i)

        presents = []
        for l, block in enumerate(self.transformer.h):
            x, kv = block(x, attn_mask, is_causal, None if past_key_values is None else past_key_values[l])
            if use_cache:  # else drop it now: with a cache expanded to a batch, keeping it costs B x the cache
                presents.append(kv)
        h = self.transformer.ln_f(x)  # (B, T, d)
        logits = self.head(h) if return_logits else None  # return_logits=False: call head() on the rows needed
        return LMOutput(logits, h, tuple(presents) if use_cache else None)

    def head(self, h):  # (..., d) -> (..., V): the tied LM head
        return F.linear(h, self.transformer.wte.weight)

    @torch.no_grad()
    def init_weights(self):  # as transformers' GPT2PreTrainedModel._init_weights
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual projections (GPT-2 paper)
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            elif ".ln_" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)


def _plan(ckpt, pairs) -> dict:
    """[(module key, checkpoint key)] -> {module key: checkpoint key}; two checkpoint keys for one module key (a file
    mixing two layouts, e.g. `transformer.wte.weight` and `wte.weight`) are an error, not last-one-wins."""
    plan = {}
    for mk, ck in pairs:
        if mk in plan:
            raise ValueError(f"{ckpt.where}: checkpoint tensors '{plan[mk]}' and '{ck}' both map to '{mk}' (expected "
                             "one key layout, not a mix)")
        plan[mk] = ck
    return plan


def _check_tied_head(ckpt, emb_keys, tied_by):
    """A tied model ignores the checkpoint's lm_head.weight: refuse one that differs from the embeddings."""
    ek, hk = next((k for k in emb_keys if k in ckpt), None), "lm_head.weight"
    if ek is not None and (ckpt.shape(ek) != ckpt.shape(hk) or not torch.equal(ckpt.get(ek), ckpt.get(hk))):
        raise ValueError(f"{ckpt.where}: {hk} {ckpt.shape(hk)} differs from {ek} {ckpt.shape(ek)} but the head is "
                         f"tied ({tied_by}); expected equal tensors")


def gpt2_keys(ckpt, model: GPT2) -> dict:
    """Checkpoint keys -> module keys ({module key: checkpoint key}): add the missing `transformer.` prefix
    (GPT2Model / original hub files), drop the attn.bias / attn.masked_bias mask buffers and the tied lm_head."""
    pairs = []
    for k in ckpt:
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k == "lm_head.weight":
            _check_tied_head(ckpt, ("transformer.wte.weight", "wte.weight"), "untied GPT-2 heads are not supported")
            continue
        pairs.append((k if k.startswith("transformer.") else "transformer." + k, k))
    return _plan(ckpt, pairs)


# ----------------------------------------------------------------------------------------------------------------
# T5


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def relative_position_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's bucketing of relative positions rel = key - query: exact below num_buckets/2, logarithmic above."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.H, self.d_kv, inner = cfg.num_heads, cfg.d_kv, cfg.num_heads * cfg.d_kv  # inner may differ from d
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.bidirectional, self.cfg, self.dropout = bidirectional, cfg, cfg.dropout_rate
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, Tq, Tk, device):  # -> (1, H, Tq, Tk)
        rel = torch.arange(Tk, device=device)[None] - torch.arange(Tq, device=device)[:, None]  # (Tq, Tk)
        buckets = relative_position_bucket(rel, self.bidirectional, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, kv, bias):  # x (B, Tq, d), kv (B, Tk, d) or None (self-attention), bias additive
        B, Tq, _ = x.shape                 # bias: (B|1, H|1, Tq|1, Tk) relative position + mask, or None
        kv = x if kv is None else kv
        q = self.q(x).view(B, Tq, self.H, self.d_kv).transpose(1, 2)  # (B, H, Tq, d_kv)
        Tk = kv.shape[1]
        k = self.k(kv).view(B, Tk, self.H, self.d_kv).transpose(1, 2)  # (B, H, Tk, d_kv)
        v = self.v(kv).view(B, Tk, self.H, self.d_kv).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,  # T5: no 1/sqrt(d_kv)
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, Tq, self.H * self.d_kv))


class T5DenseReluDense(nn.Module):  # v1.0: wo(relu(wi x)); v1.1: wo(gelu_new(wi_0 x) * wi_1 x)
    def __init__(self, cfg: T5Config):
        super().__init__()
        act = cfg.feed_forward_proj.split("-")
        self.gated = act[0] == "gated"
        self.act = _act("gelu_new" if cfg.feed_forward_proj == "gated-gelu" else act[-1])
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h).to(self.wo.weight.dtype))  # fp16 models keep wo in fp32 (T5.keep_in_fp32)


class T5SubLayer(nn.Module):
    """x + dropout(f(layer_norm(x))); f is stored under the checkpoint's name (SelfAttention, EncDecAttention or
    DenseReluDense) so that parameter names match the hub files."""

    def __init__(self, cfg: T5Config, name: str, f: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, f)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, *args):
        x = x + self.dropout(getattr(self, self.name)(self.layer_norm(x), *args))  # fp32 after an fp32 `wo`
        if x.dtype == torch.float16:  # transformers' T5 guard against fp16 overflow: inf -> +-(max - 1000)
            big = torch.finfo(torch.float16).max
            big = torch.where(torch.isinf(x).any(), big - 1000, big)  # a tensor: no host sync
            x = x.clamp(-big, big)
        return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        layers = [T5SubLayer(cfg, "SelfAttention", T5Attention(cfg, has_relative_bias, not is_decoder))]
        if is_decoder:
            layers.append(T5SubLayer(cfg, "EncDecAttention", T5Attention(cfg, False, True)))
        layers.append(T5SubLayer(cfg, "DenseReluDense", T5DenseReluDense(cfg)))
        self.layer = nn.ModuleList(layers)

    def forward(self, x, self_bias, enc=None, cross_bias=None):
        x = self.layer[0](x, None, self_bias)
        if enc is not None:
            x = self.layer[1](x, enc, cross_bias)
        return self.layer[-1](x)


def _additive(mask, dtype):  # bool (.., Tk), True = attend -> 0 / most negative (T5 adds it to the bias)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool, n_layers: int):
        super().__init__()
        self.is_decoder = is_decoder
        self.block = nn.ModuleList([T5Block(cfg, is_decoder, i == 0) for i in range(n_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, mask=None, enc=None, enc_mask=None):  # x (B, T, d) embeddings, masks (B, T) 1 = real
        B, T, _ = x.shape
        bias = self.block[0].layer[0].SelfAttention.position_bias(T, T, x.device).to(x.dtype)  # (1, H, T, T)
        allowed = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if self.is_decoder:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
            allowed = causal if allowed is None else causal & allowed
        if allowed is not None:
            bias = bias + _additive(allowed, x.dtype)  # (B|1, H, T, T)
        cross_bias = None if enc_mask is None else _additive(enc_mask.bool()[:, None, None, :], x.dtype)
        x = self.dropout(x)
        for block in self.block:
            x = block(x, bias, enc, cross_bias)
        return self.dropout(self.final_layer_norm(x))


class T5(nn.Module):
    is_encoder_decoder = True
    keep_in_fp32 = ("wo",)  # transformers' _keep_in_fp32_modules: in fp16 the FF output projections stay fp32

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.hidden_size, self.vocab_size = config.d_model, config.vocab_size
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, False, config.num_layers)
        self.decoder = T5Stack(config, True, config.num_decoder_layers or config.num_layers)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def embed_tokens(self, input_ids):  # (B, T) -> (B, T, d)
        return self.shared(input_ids)

    def encode(self, input_ids=None, inputs_embeds=None, attention_mask=None):  # -> (B, T, d)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("T5.encode: give exactly one of input_ids or inputs_embeds")
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        _check_mask("T5.encode", "attention_mask", attention_mask, x.shape[0], x.shape[1], "T_enc")
        return self.encoder(x, attention_mask)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_hidden_states=None, return_logits=True) -> LMOutput:
        if decoder_input_ids is None:
            raise ValueError("T5.forward: decoder_input_ids is required (use shift_right(labels))")
        enc = encoder_hidden_states
        if enc is None:
            enc = self.encode(input_ids, inputs_embeds, attention_mask)  # (B, T_enc, d)
        else:
            _check_mask("T5.forward", "attention_mask", attention_mask, enc.shape[0], enc.shape[1], "T_enc")
        _check_mask("T5.forward", "decoder_attention_mask", decoder_attention_mask, *decoder_input_ids.shape, "T_dec")
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask)  # (B, T, d)
        return LMOutput(self.head(h) if return_logits else None, h, None, enc)

    def head(self, h):  # (..., d) -> (..., V)
        if self.config.tie_word_embeddings:  # v1.0: rescale before the tied head
            return F.linear(h * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(h)

    def shift_right(self, labels):  # (B, T) -> (B, T): decoder_start_token_id, labels[:-1]; -100 -> pad
        out = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        out[..., 1:] = labels[..., :-1]
        return out.masked_fill(out == -100, self.config.pad_token_id)

    @torch.no_grad()
    def init_weights(self):  # as transformers' T5PreTrainedModel._init_weights
        c, f = self.config, self.config.initializer_factor
        for name, p in self.named_parameters():
            leaf = name.split(".")[-2]
            std = {"shared": 1.0, "lm_head": 1.0, "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5,
                   "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5, "q": (c.d_model * c.d_kv) ** -0.5,
                   "k": c.d_model ** -0.5, "v": c.d_model ** -0.5, "o": (c.num_heads * c.d_kv) ** -0.5,
                   "relative_attention_bias": c.d_model ** -0.5}.get(leaf)
            if std is None:  # layer norms
                nn.init.constant_(p, f)
            else:
                nn.init.normal_(p, 0.0, f * std)


def t5_keys(ckpt, model: T5) -> dict:
    """Checkpoint keys -> module keys: keep one of the duplicated shared / encoder.embed_tokens /
    decoder.embed_tokens, drop a tied lm_head and the unused cross-attention relative bias."""
    plan = {k: k for k in ckpt}
    embeds = [plan.pop(k) for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
              if k in plan]
    if embeds:
        plan["shared.weight"] = embeds[0]
    plan.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    if model.config.tie_word_embeddings:
        if plan.pop("lm_head.weight", None):
            _check_tied_head(ckpt, embeds[:1], "config.json: tie_word_embeddings=true")
    elif "lm_head.weight" not in plan and embeds:  # untied config saved with a tied head (as transformers >= 5
        plan["lm_head.weight"] = embeds[0]  # does for a fresh v1.1 model): the head gets a copy of the embeddings
    return plan


# ----------------------------------------------------------------------------------------------------------------
# decoder-only helpers shared by OPT and the Llama-style family (same mask / position / cache contract as GPT-2)


def _decoder_inputs(who, x, attention_mask, past_key_values):
    """-> (T_past, attn_mask, is_causal). attn_mask: None with is_causal (nothing padded or cached), else a boolean
    (B|1, 1, T, T_past + T): causal, padding keys dropped, every query sees itself (padding rows are never NaN)."""
    B, T, _ = x.shape
    T_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
    _check_mask(f"{who}.forward", "attention_mask", attention_mask, B, T_past + T, "T_past + T")
    if T_past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return T_past, None, True
    if attention_mask is None and T == 1:
        return T_past, None, False  # one new token after a cache sees everything
    i = torch.arange(T_past, T_past + T, device=x.device)[:, None]  # query positions in the sequence
    j = torch.arange(T_past + T, device=x.device)[None]  # key positions
    allowed = (j <= i)[None, None]  # (1, 1, T, T_k)
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, None, :]) | (j == i)
    return T_past, allowed, False


def _with_past(k, v, past):
    """Prepend a cached (k, v) (B or 1, H_kv, T_past, hd); a batch-1 cache is shared by the whole batch."""
    if past is None:
        return k, v
    pk, pv = past
    if pk.shape[0] != k.shape[0]:
        pk, pv = pk.expand(k.shape[0], -1, -1, -1), pv.expand(k.shape[0], -1, -1, -1)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H_kv, T_past + T, hd)


class _DecoderLM(nn.Module):
    """What OPT and Llama share: the decoder-only interface of GPT2 (embed_tokens, head, forward contract).
    Subclasses have an `embed` property (the nn.Embedding), self.lm_head (None when tied), _check_length
    (who, T_past + T, position_ids, given: whether position_ids were passed in) and
    _body(x, position_ids, attn_mask, is_causal, past_key_values, use_cache) -> (h after the final norm,
    per-layer (k, v) when use_cache)."""
    is_encoder_decoder = False

    def embed_tokens(self, input_ids):  # (B, T) -> (B, T, d), token embeddings only
        return self.embed(input_ids)

    def head(self, h):  # (..., d) -> (..., V): tied (embedding matrix) or untied lm_head
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, return_logits=True) -> LMOutput:
        who = type(self).__name__
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{who}.forward: give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        T_past, attn_mask, is_causal = _decoder_inputs(who, x, attention_mask, past_key_values)
        T, given = x.shape[1], position_ids is not None
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(T_past, T_past + T, device=x.device)[None]  # (1, T)
        elif position_ids is None:  # positions count real tokens only: left padding and holes do not shift them
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        self._check_length(who, T_past + T, position_ids, given)
        h, presents = self._body(x, position_ids, attn_mask, is_causal, past_key_values, use_cache)
        logits = self.head(h) if return_logits else None
        return LMOutput(logits, h, tuple(presents) if use_cache else None)


# ----------------------------------------------------------------------------------------------------------------
# OPT (facebook/opt-125m ... opt-66b; the paper's Appendix C runs opt-125m -> opt-6.7b)


@dataclass
class OPTConfig(_Config):
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True  # False: opt-350m's post-LN
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None  # None -> hidden_size; opt-350m: 512 with project_in / project_out
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    init_std: float = 0.02
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | list | None = 2
    eos_token_id: int | list | None = 2
    model_type: str = "opt"
    extra: dict = field(default_factory=dict)


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=cfg.enable_bias), nn.Linear(d, d, bias=cfg.enable_bias)
        self.v_proj, self.out_proj = nn.Linear(d, d, bias=cfg.enable_bias), nn.Linear(d, d, bias=cfg.enable_bias)
        self.dropout = cfg.attention_dropout

    def forward(self, x, attn_mask, is_causal, past):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, hd)
        k, v = _with_past(k, v, past)
        # OPT scales q_proj's output by head_dim**-0.5: SDPA's default scale, the same up to float rounding
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        d, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.act, self.dropout = _act(cfg.activation_function), nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, is_causal, past):
        a, kv = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, attn_mask, is_causal, past)
        x = x + self.dropout(a)
        if not self.pre_ln:  # opt-350m: post-LN
            x = self.self_attn_layer_norm(x)
        f = self.dropout(self.fc2(self.act(self.fc1(self.final_layer_norm(x) if self.pre_ln else x))))
        x = x + f
        return (x if self.pre_ln else self.final_layer_norm(x)), kv


class OPT(_DecoderLM):
    """OPTForCausalLM. Learned positions with OPT's offset of 2 (row p + 2 of embed_positions), pre-LN (or post-LN
    for opt-350m, whose 512-wide embeddings go through project_in / project_out around the 1024-wide layers: then
    hidden_size, the width of embed_tokens / inputs_embeds / hidden_states, is word_embed_proj_dim), ReLU FFN."""
    POS_OFFSET = 2

    def __init__(self, config: OPTConfig):
        super().__init__()
        c = self.config = config
        d_emb = c.word_embed_proj_dim or c.hidden_size
        self.hidden_size, self.vocab_size = d_emb, c.vocab_size
        pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else None
        dec = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, d_emb, padding_idx=pad),
            embed_positions=nn.Embedding(c.max_position_embeddings + self.POS_OFFSET, c.hidden_size),
            layers=nn.ModuleList([OPTDecoderLayer(c) for _ in range(c.num_hidden_layers)]),
        ))
        if c.do_layer_norm_before and not c._remove_final_layer_norm:
            dec.final_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)
        if d_emb != c.hidden_size:
            dec.project_in = nn.Linear(d_emb, c.hidden_size, bias=False)
            dec.project_out = nn.Linear(c.hidden_size, d_emb, bias=False)
        self.model = nn.ModuleDict(dict(decoder=dec))
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(d_emb, c.vocab_size, bias=False)

    @property
    def embed(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def _check_length(self, who, n, position_ids, given):
        _check_positions(who, n, position_ids, self.config.max_position_embeddings, "max_position_embeddings", given)

    def _body(self, x, position_ids, attn_mask, is_causal, past_key_values, use_cache):
        dec = self.model.decoder
        if "project_in" in dec:
            x = dec.project_in(x)
        x = x + dec.embed_positions(position_ids + self.POS_OFFSET)  # (B, T, hidden); no embedding dropout in OPT
        presents = []
        for l, layer in enumerate(dec.layers):
            x, kv = layer(x, attn_mask, is_causal, None if past_key_values is None else past_key_values[l])
            if use_cache:  # else drop it now: with a cache expanded to a batch, keeping it costs B x the cache
                presents.append(kv)
        if "final_layer_norm" in dec:
            x = dec.final_layer_norm(x)
        if "project_out" in dec:
            x = dec.project_out(x)
        return x, presents

    @torch.no_grad()
    def init_weights(self):  # as transformers' OPTPreTrainedModel._init_weights
        _init_decoder(self, self.config.init_std)


def _init_decoder(model, std):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def opt_keys(ckpt, model: OPT) -> dict:
    """Checkpoint keys -> module keys: OPTForCausalLM saves `model.decoder.*` (+ lm_head.weight), OPTModel and the
    original metaseq conversions `decoder.*`; a tied lm_head is dropped."""
    pairs = []
    for k in ckpt:
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            _check_tied_head(ckpt, ("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                             "config.json: tie_word_embeddings=true")
            continue
        pairs.append(("model." + k if k.startswith("decoder.") else k, k))
    return _plan(ckpt, pairs)


# ----------------------------------------------------------------------------------------------------------------
# Llama-style decoders: Llama 2 / 3, Mistral, Qwen2 / 2.5 (model_type llama, mistral, qwen2)


@dataclass
class LlamaConfig(_Config):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # transformers 4.x keys ...
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # ... and transformers >= 5's {"rope_type", "rope_theta", "factor", ...}
    attention_bias: bool = False  # Qwen2: q/k/v biases always (its config has no such key)
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral (v0.1: 4096); Qwen2 only with use_sliding_window
    use_sliding_window: bool = False
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)

    def rope(self) -> tuple[float, dict]:
        """(rope_theta, scaling dict with "rope_type") from either the 4.x or the >= 5 keys."""
        p = dict(self.rope_parameters or {})
        theta = p.pop("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        scaling = dict(self.rope_scaling or p)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        return float(theta), scaling

    def to_dict(self) -> dict:
        d = super().to_dict()
        optional = ("rope_theta", "rope_scaling", "rope_parameters", "head_dim", "num_key_value_heads")
        return {k: v for k, v in d.items() if v is not None or k not in optional}  # as the hub files: absent

    def window(self) -> int | None:  # the sliding-window length that applies, if any
        if self.model_type == "qwen2" and not self.use_sliding_window:
            return None
        return self.sliding_window


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) in fp32, cast back to the input dtype, times the weight."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(cfg: LlamaConfig, head_dim: int, device) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS for default / linear / llama3."""
    theta, sc = cfg.rope()
    kind = sc["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"model.py: rope_scaling type '{kind}' is not supported; expected one of {ROPE_TYPES}")
    if sc.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("model.py: partial_rotary_factor != 1 is not supported")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if kind == "linear":  # position interpolation: positions / factor == frequencies / factor
        inv = inv / sc["factor"]
    elif kind == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, smooth in between
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = cfg.head_dim or d // self.n_head
        if self.n_head % self.n_kv:
            raise ValueError(f"model.py: num_attention_heads={self.n_head} is not a multiple of "
                             f"num_key_value_heads={self.n_kv}")
        qkv_bias = cfg.attention_bias or cfg.model_type == "qwen2"  # Qwen2: q/k/v biases, no o_proj bias
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=cfg.attention_bias)
        self.dropout = cfg.attention_dropout

    def forward(self, x, cos, sin, attn_mask, is_causal, past):  # cos, sin (B|1, 1, T, hd)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # RoPE at each token's position
        k, v = _with_past(k, v, past)  # the cache keeps H_kv heads, already rotated
        rep = self.n_head // self.n_kv  # grouped-query attention: each k/v head serves `rep` query heads
        kk, vv = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)), (k, v)


class LlamaMLP(nn.Module):  # SwiGLU: down(silu(gate x) * up x)
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f, bias=b), nn.Linear(d, f, bias=b), \
            nn.Linear(f, d, bias=b)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, attn_mask, is_causal, past):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(_DecoderLM):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: RMSNorm, RoPE (rope_theta; linear or llama3
    scaling) at the mask-derived positions, SwiGLU MLP, grouped-query attention, Qwen2's q/k/v biases, tied or
    untied head. Mistral's sliding window is not implemented: sequences longer than the window are refused."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.hidden_size, self.vocab_size = c.hidden_size, c.vocab_size
        pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else None
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=pad),
            layers=nn.ModuleList([LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers)]),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        rope_inv_freq(c, self.head_dim, "cpu")  # errors early on an unsupported rope_scaling

    @property
    def embed(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _check_length(self, who, n, position_ids, given):  # RoPE: any position is fine, the window is not
        w = self.config.window()
        if w is not None and n > w:
            raise ValueError(f"{who}.forward: {n} tokens > sliding_window={w}: the sliding-window attention of "
                             f"{self.config.model_type} is not implemented (full attention is exact only up to the "
                             "window)")

    def _body(self, x, position_ids, attn_mask, is_causal, past_key_values, use_cache):
        inv = rope_inv_freq(self.config, self.head_dim, x.device)  # (hd/2,) fp32
        freqs = position_ids[..., None].float() * inv  # (B|1, T, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (B|1, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        presents = []
        for l, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, attn_mask, is_causal, None if past_key_values is None else past_key_values[l])
            if use_cache:
                presents.append(kv)
        return self.model.norm(x), presents

    @torch.no_grad()
    def init_weights(self):  # as transformers' LlamaPreTrainedModel._init_weights
        _init_decoder(self, self.config.initializer_range)


def llama_keys(ckpt, model: Llama) -> dict:
    """Checkpoint keys -> module keys: add `model.` for LlamaModel-style files, drop old checkpoints' rotary_emb.inv_freq
    buffers and a tied lm_head."""
    pairs = []
    for k in ckpt:
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            _check_tied_head(ckpt, ("model.embed_tokens.weight", "embed_tokens.weight"),
                             "config.json: tie_word_embeddings=true")
            continue
        pairs.append((k if k.startswith("model.") or k == "lm_head.weight" else "model." + k, k))
    return _plan(ckpt, pairs)


# ----------------------------------------------------------------------------------------------------------------
# building, saving, loading

FAMILIES = {  # model_type -> (config class, module class, checkpoint-key mapping, architectures entry)
    "gpt2": (GPT2Config, GPT2, gpt2_keys, "GPT2LMHeadModel"),
    "t5": (T5Config, T5, t5_keys, "T5ForConditionalGeneration"),
    "opt": (OPTConfig, OPT, opt_keys, "OPTForCausalLM"),
    "llama": (LlamaConfig, Llama, llama_keys, "LlamaForCausalLM"),
    "mistral": (LlamaConfig, Llama, llama_keys, "MistralForCausalLM"),
    "qwen2": (LlamaConfig, Llama, llama_keys, "Qwen2ForCausalLM"),
}
WEIGHT_FILES = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt"]


def _family(config: dict, where="config"):
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{where}: model_type '{mt}' is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def build_model(config: dict) -> nn.Module:
    """A randomly initialised model (as transformers initialises it) from a config.json-style dict."""
    cfg_cls, model_cls, _, _ = _family(config)
    model = model_cls(cfg_cls.from_dict(config, "build_model(config)"))
    model.init_weights()
    return model


def fsync(path):
    """Force a written file (or a folder's entries) to disk, so that an os.replace after it never makes a name point
    at an empty or partial file after a crash or power loss. Folders cannot be opened for fsync on Windows: skipped."""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write):  # write(tmp_path), fsync, os.replace: readers never see a partial file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    fsync(tmp)  # on disk before the rename makes it visible
    os.replace(tmp, path)


def save_pretrained(model: nn.Module, out_dir, tokenizer=None):
    """config.json + model.safetensors in transformers' save_pretrained key layout (+ tokenizer.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [FAMILIES[config["model_type"]][3]]
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if tokenizer is not None:
        _atomic_write(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))


def resolve(name_or_path, patterns) -> Path:
    """A local folder as is, or the hub snapshot of repo id `name_or_path` holding only `patterns`
    (huggingface_hub's cache; HF_HUB_OFFLINE=1 uses the cache alone)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=list(patterns)))
    except (OSError, ValueError, EntryNotFoundError) as e:  # not found, offline, invalid repo id, HTTP errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"'{name_or_path}' is neither a local folder nor reachable on the Hugging Face hub "
                                f"(offline or not in the hub cache?): {type(e).__name__}: {reason}") from None


def _read_json(path: Path, expected: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a JSON {type(d).__name__}, expected {expected}")
    return d


def load_config(name_or_path) -> dict:
    folder = resolve(name_or_path, ["config.json"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return _read_json(folder / "config.json", "a JSON object of model settings")


def _weight_files(folder: Path) -> list[Path]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():  # sharded: the index maps every tensor to its shard
            expected = '{"weight_map": {tensor name: shard file}}'
            weight_map = _read_json(folder / index, expected).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index}: no \"weight_map\" object, expected {expected}")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index}: shard file(s) {missing} are missing")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


class Checkpoint:
    """The tensors of a checkpoint's weight files, read lazily: names and shapes come from the file headers and a
    tensor is read only when asked for (safetensors through safe_open's mmap; pytorch_model.bin through
    torch.load(mmap=True, weights_only=True) when the file allows it). Iterating gives the checkpoint keys.
    `where` names it in errors: the file, or the folder of a sharded checkpoint."""

    def __init__(self, files, where=None):
        from safetensors import SafetensorError, safe_open

        self.files, self.file_of, self.shapes, self._bin = [Path(f) for f in files], {}, {}, {}
        self.where = where or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        for f in self.files:
            if f.suffix == ".safetensors":
                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self.file_of[k], self.shapes[k] = f, tuple(h.get_slice(k).get_shape())
                except SafetensorError as e:
                    raise ValueError(f"{f}: not a readable safetensors file ({e}); expected the file "
                                     "safetensors.save_file writes") from None
            else:  # pytorch_model.bin fallback: tensors only, never arbitrary pickles
                try:
                    try:
                        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # legacy (non-zip) .bin files cannot be mmapped
                        sd = torch.load(f, map_location="cpu", weights_only=True)
                except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
                    why = str(e).split("WeightsUnpickler error:")[-1]  # torch's weights_only text: the cause
                    reason = next((line.strip() for line in why.splitlines() if line.strip()), type(e).__name__)
                    raise ValueError(f"{f}: not a readable PyTorch checkpoint ({reason}); expected the file "
                                     "torch.save writes") from None
                self._bin[f] = sd
                for k, v in sd.items():
                    self.file_of[k], self.shapes[k] = f, tuple(v.shape)

    def __iter__(self):
        return iter(self.file_of)

    def __contains__(self, key):
        return key in self.file_of

    def shape(self, key) -> tuple:
        return self.shapes[key]

    def get(self, key) -> torch.Tensor:
        return next(t for _, t in self.tensors({key: key}))

    def tensors(self, plan: dict, release: bool = False):
        """Yield (module key, tensor) for {module key: checkpoint key}, one file open at a time, one tensor at a
        time: peak host memory is about one shard's pages, never the whole checkpoint. release: unmap each .bin
        shard once it has been read (the Checkpoint cannot read it again)."""
        from safetensors import safe_open

        for f in self.files:
            todo = [(mk, ck) for mk, ck in plan.items() if self.file_of[ck] == f]
            if not todo:
                continue
            if f in self._bin:
                for mk, ck in todo:
                    yield mk, self._bin[f][ck]
                if release:
                    del self._bin[f]
                continue
            with safe_open(str(f), framework="pt") as h:
                for mk, ck in todo:
                    yield mk, h.get_tensor(ck)


def load_weights(model: nn.Module, ckpt: Checkpoint, plan: dict, where: str, dtype, device):
    """Strictly load the checkpoint into a `model` built on the meta device: plan = {module key: checkpoint key}
    (the family's key mapping). A missing, unexpected or mis-shaped tensor is an error (checked on the headers,
    before anything is read). The parameters are allocated once, in `dtype` on `device`, then filled tensor by
    tensor (dtype converted on the fly), so the host never holds the whole model twice. In fp16 the modules a
    model lists in keep_in_fp32 (T5's `wo`) are allocated and filled in fp32, as transformers loads them."""
    expected = model.state_dict()  # meta tensors: shapes only
    for k, ck in plan.items():
        if k not in expected:
            raise ValueError(f"{where}: unexpected tensor '{k}' {ckpt.shape(ck)} in the checkpoint (not in a "
                             f"{model.config.model_type} model of this config.json)")
    for k, v in expected.items():
        if k not in plan:
            raise ValueError(f"{where}: tensor '{k}' is missing from the checkpoint (the model expects shape "
                             f"{tuple(v.shape)})")
        if ckpt.shape(plan[k]) != tuple(v.shape):
            raise ValueError(f"{where}: tensor '{k}' has shape {ckpt.shape(plan[k])} in the checkpoint but the model "
                             f"expects {tuple(v.shape)}")
    cast(model, dtype).to_empty(device=device)  # uninitialised storage in the target dtype on the target device
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for k, t in ckpt.tensors(plan, release=True):
            targets[k].copy_(t)  # dtype / device conversion happens here, one tensor at a time


def _dtype(dtype):
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    dt = getattr(torch, names.get(dtype, dtype), None) if isinstance(dtype, str) else dtype
    if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"model.py: dtype must be a floating torch dtype or one of fp32/fp16/bf16, got {dtype!r}")
    return dt


def cast(module: nn.Module, dtype=None, device=None) -> nn.Module:
    """module.to(device, dtype) as transformers casts: in fp16 the submodules that a model (at any depth of `module`,
    e.g. the T5 distiller inside mend.MEND) lists in keep_in_fp32 stay fp32 (T5's `wo`: fp16 overflows there).
    The declaration is on the whole model (T5): cast a part of it alone (t5.encoder) and it is all fp16."""
    dtype = None if dtype is None else _dtype(dtype)
    kept = []  # (parent, name, child): set aside while the rest is cast, so they never round through fp16
    for m in module.modules() if dtype == torch.float16 else ():
        for parent in m.modules() if getattr(m, "keep_in_fp32", ()) else ():
            kept += [(parent, n, c) for n, c in parent.named_children() if n in m.keep_in_fp32]
    for parent, name, _ in kept:
        setattr(parent, name, None)
    try:
        module.to(device=device, dtype=dtype)
    finally:
        for parent, name, child in kept:
            setattr(parent, name, child.to(device=device, dtype=torch.float32))
    return module


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu") -> nn.Module:
    """The model (eval mode) from a local folder or a hub id, built on the meta device and filled shard by shard,
    tensor by tensor, straight into `dtype` on `device` (peak host memory: about one shard beyond the model)."""
    dtype = _dtype(dtype)
    folder = resolve(name_or_path, WEIGHT_FILES)
    config = load_config(folder)
    where = str(folder / "config.json")
    cfg_cls, model_cls, keys, _ = _family(config, where)
    cfg = cfg_cls.from_dict(config, where)
    files = _weight_files(folder)
    if not files:  # no safetensors: fall back to pytorch_model.bin
        folder = resolve(name_or_path, BIN_FILES)
        files = _weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    with torch.device("meta"):  # no memory, no random init: the checkpoint's tensors are copied in below
        model = model_cls(cfg)
    ckpt = Checkpoint(files)  # ckpt.where: the file, or the folder of the shards
    load_weights(model, ckpt, keys(ckpt, model), ckpt.where, dtype, device)
    return model.eval()


def load_tokenizer(name_or_path):
    """tokenizers.Tokenizer from tokenizer.json, or GPT-2's byte-level BPE from vocab.json + merges.txt."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    folder = resolve(name_or_path, TOKENIZER_FILES)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(f"{folder}: no tokenizer.json and no GPT-2 vocab.json + merges.txt (a T5 "
                                "spiece.model must be converted to tokenizer.json first)")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok
