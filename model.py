"""Hand-written GPT-2 and T5 in plain PyTorch, numerically identical to the Hugging Face reference, plus loading.

MEND (Li et al., ICLR 2024) freezes a large language model (the LLM) and trains a small one of the same family
(the distiller). Both are built here; nothing in this file knows about MEND or data (mend.py, data.py, train.py,
eval.py and bench.py import it, never the other way round).

- GPT2: decoder-only (gpt2 ... gpt2-xl), tanh-GELU, tied LM head, F.scaled_dot_product_attention. forward() takes
  input_ids or inputs_embeds (a soft prefix such as MEND's distilled vectors S_D), an attention mask whose holes may
  be anywhere (positions = cumsum(mask) - 1), and an optional KV cache so a shared prefix (demonstrations or S_D)
  is computed once and reused across queries and answer options.
- T5: encoder-decoder, v1.0 (t5-small/base/large: ReLU FFN, tied head with d_model**-0.5 output scaling) and
  v1.1 / lm-adapt / flan-t5 (gated-GELU, untied head); relative position bias, no 1/sqrt(d) scaling.
- from_pretrained(name_or_path): a local folder or a hub id (via huggingface_hub's cache), any of the real
  checkpoint layouts; save_pretrained() writes the layout transformers' save_pretrained writes (atomically).
- load_tokenizer(): tokenizer.json, or GPT-2's vocab.json + merges.txt.

Module and parameter names follow the checkpoints (GPT-2 keeps Conv1D's (in, out) weight layout), so loading a
family is one module class plus one key-mapping function (FAMILIES at the bottom of the file).
"""
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# configs: dataclasses over the keys of Hugging Face's config.json; unknown keys are kept (extra) for round trips


class _Config:
    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.extra = {k: v for k, v in d.items() if k not in names}
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
    bos_token_id: int = 50256
    eos_token_id: int = 50256
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
    eos_token_id: int = 1
    model_type: str = "t5"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict):
        cfg = super().from_dict(d)
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


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when forward(return_logits=False): use model.head(h)
    hidden_states: torch.Tensor  # (B, T, d) last layer after the final norm (decoder's for T5)
    past_key_values: tuple | None = None  # GPT-2: per layer (k, v), each (B, n_head, T_past + T, head_dim)
    encoder_hidden_states: torch.Tensor | None = None  # T5: (B, T_enc, d)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2


class Conv1D(nn.Module):
    """GPT-2's linear layer with the checkpoint's weight layout (in, out): y = x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # (..., n_in) -> (..., n_out)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


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
        if attention_mask is not None and attention_mask.shape[-1] != T_past + T:
            raise ValueError(f"GPT2.forward: attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"(B, T_past + T) = ({B}, {T_past + T})")
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(T_past, T_past + T, device=x.device)[None]  # (1, T)
        elif position_ids is None:  # positions count real tokens only: left padding and holes do not shift them
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        if T_past + T > self.config.n_positions and int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(f"GPT2.forward: position {int(position_ids.max())} >= n_positions="
                             f"{self.config.n_positions} (the sequence is too long)")
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


def gpt2_keys(sd: dict, model: GPT2) -> dict:
    """Checkpoint keys -> module keys: add the missing `transformer.` prefix (GPT2Model / original hub files),
    drop the attn.bias / attn.masked_bias mask buffers and the tied lm_head."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k == "lm_head.weight":
            wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
            if wte is not None and (wte.shape != v.shape or not torch.equal(wte, v)):
                raise ValueError("model.py: checkpoint has an lm_head.weight different from transformer.wte.weight; "
                                 "untied GPT-2 heads are not supported")
            continue
        out[k if k.startswith("transformer.") else "transformer." + k] = v
    return out


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
        k = self.k(kv).view(B, -1, self.H, self.d_kv).transpose(1, 2)  # (B, H, Tk, d_kv)
        v = self.v(kv).view(B, -1, self.H, self.d_kv).transpose(1, 2)
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
        return self.wo(self.dropout(h))


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
        return x + self.dropout(getattr(self, self.name)(self.layer_norm(x), *args))


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
        return self.encoder(x, attention_mask)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_hidden_states=None, return_logits=True) -> LMOutput:
        if decoder_input_ids is None:
            raise ValueError("T5.forward: decoder_input_ids is required (use shift_right(labels))")
        enc = encoder_hidden_states
        if enc is None:
            enc = self.encode(input_ids, inputs_embeds, attention_mask)  # (B, T_enc, d)
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


def t5_keys(sd: dict, model: T5) -> dict:
    """Checkpoint keys -> module keys: keep one of the duplicated shared / encoder.embed_tokens /
    decoder.embed_tokens, drop a tied lm_head and the unused cross-attention relative bias."""
    sd = dict(sd)
    embeds = [sd.pop(k) for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
              if k in sd]
    if embeds:
        sd["shared.weight"] = embeds[0]
    sd.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd and "shared.weight" in sd:  # untied config saved with a tied head (as
        sd["lm_head.weight"] = sd["shared.weight"]  # transformers >= 5 does for a fresh v1.1 model): copy it
    return sd


# ----------------------------------------------------------------------------------------------------------------
# building, saving, loading

FAMILIES = {  # model_type -> (config class, module class, checkpoint-key mapping, architectures entry)
    "gpt2": (GPT2Config, GPT2, gpt2_keys, "GPT2LMHeadModel"),
    "t5": (T5Config, T5, t5_keys, "T5ForConditionalGeneration"),
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
    model = model_cls(cfg_cls.from_dict(config))
    model.init_weights()
    return model


def _atomic_write(path: Path, write):  # write(tmp_path) then os.replace: readers never see a partial file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
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


def load_config(name_or_path) -> dict:
    folder = resolve(name_or_path, ["config.json"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return json.loads((folder / "config.json").read_text())


def _weight_files(folder: Path) -> list[Path]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():  # sharded: the index maps every tensor to its shard
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index}: shard file(s) {missing} are missing")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


def _read_weights(path: Path, dtype) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:  # pytorch_model.bin fallback: tensors only, never arbitrary pickles
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def load_weights(model: nn.Module, sd: dict, where: str):
    """Strictly load `sd` (module keys) into `model`: a missing, unexpected or mis-shaped tensor is an error."""
    expected = model.state_dict()
    for k, v in sd.items():
        if k not in expected:
            raise ValueError(f"{where}: unexpected tensor '{k}' {tuple(v.shape)} in the checkpoint (not in a "
                             f"{model.config.model_type} model of this config.json)")
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(f"{where}: tensor '{k}' is missing from the checkpoint (the model expects shape "
                             f"{tuple(v.shape)})")
        if sd[k].shape != v.shape:
            raise ValueError(f"{where}: tensor '{k}' has shape {tuple(sd[k].shape)} in the checkpoint but the model "
                             f"expects {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)


def _dtype(dtype):
    if isinstance(dtype, str):
        names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
        dtype = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.py: dtype must be a torch dtype or one of fp32/fp16/bf16, got {dtype!r}")
    return dtype


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu") -> nn.Module:
    """GPT2 or T5 (eval mode) from a local folder or a hub id, in `dtype` on `device`."""
    dtype = _dtype(dtype)
    folder = resolve(name_or_path, WEIGHT_FILES)
    config = load_config(folder)
    cfg_cls, model_cls, keys, _ = _family(config, str(folder / "config.json"))
    files = _weight_files(folder)
    if not files:  # no safetensors: fall back to pytorch_model.bin
        folder = resolve(name_or_path, BIN_FILES)
        files = _weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    with torch.device("meta"):  # no memory, no random init: the checkpoint's tensors are assigned below
        model = model_cls(cfg_cls.from_dict(config))
    sd = {}
    for f in files:
        sd.update(_read_weights(f, dtype))
    load_weights(model, keys(sd, model), str(files[0] if len(files) == 1 else folder))
    return model.to(device=device, dtype=dtype).eval()


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
