"""bench.py: inference cost of vanilla ICL vs PromptTuning vs MEND (the paper's Sec. 4.3, Fig. 3).

Speed depends on shapes, not on trained values, so the benchmark builds models of the real shapes from their
config dicts (random weights, no download: model.build_model) unless checkpoints are given (--llm, --distiller,
--mend). It measures, per query, with the real code paths of mend.py (MEND / PromptTuning .distill,
mend.llm_logits, mend.prefix_cache):

  zero_shot      LLM over x + option
  icl            LLM over D + x + option (vanilla ICL, Eq. 1)
  prompt_tuning  LLM over l learned vectors + x + option
  mend           distiller over D + l placeholders -> S_D, then LLM over S_D + x + option (Eq. 2), all recomputed
                 per query: the paper's setting
  icl_cached     the demonstrations' KV computed once per task and reused (a server with prefix caching)
  mend_cached    S_D and its KV computed once per task and reused; MEND's gain is then the shorter prefix

For each (setting, LLM, batch, method) row: FLOPs from torch.utils.flop_counter.FlopCounterMode and from the
analytic count below (side by side), the ideal ratio from the analytic count, the median latency of >= 20 timed
runs after warm-up (torch.cuda.synchronize on GPU), the peak GPU memory (not measured on CPU: null / "n/a"), and
the bytes of the cached K/V prefix (kv_mb, the cached pair only). Ratios are icl / method (bigger = cheaper than
ICL); the cached pair is compared with icl_cached. Output: a markdown table on stdout, bench.json in --out, a PNG
like Fig. 3 when matplotlib happens to be installed (never a dependency), and a report on the issue's targets.

Imports model.py, data.py (EpisodeBatch) and mend.py; nothing imports bench.py except world.py.
    python bench.py                      # Fig. 3 shapes: gpt2 -> gpt2-large / gpt2-xl, t5-small -> t5-large (lm-adapt)
    python bench.py --preset small       # CPU-sized: distilgpt2-shaped distiller for a gpt2-medium-shaped LLM
    python bench.py --preset tiny --llm DIR --mend DIR   # tests / the tiny world
"""
import argparse
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

import model
import mend
from data import EpisodeBatch

METHODS = ("zero_shot", "icl", "prompt_tuning", "mend", "icl_cached", "mend_cached")
BASELINE = {"zero_shot": "icl", "icl": "icl", "prompt_tuning": "icl", "mend": "icl",
            "icl_cached": "icl_cached", "mend_cached": "icl_cached"}

# ----------------------------------------------------------------------------------------------------------------
# Model shapes (Hugging Face config.json values; random weights are enough for speed)

GPT2_BASE = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, layer_norm_epsilon=1e-5,
                 activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)
GPT2_SHAPES = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),            # 124M: the paper's distiller (gpt2-small)
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),       # 82M
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),    # 355M
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),     # 774M
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),        # 1.5B
}
T5_BASE = dict(model_type="t5", vocab_size=32128, d_kv=64, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
T5_SHAPES = {  # T5 v1.1 / lm-adapt configs (google/t5-{small,large}-lm-adapt)
    "t5-small-lm-adapt": dict(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "t5-large-lm-adapt": dict(d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
}
TINY_GPT2 = dict(model_type="gpt2", vocab_size=400, n_positions=512, layer_norm_epsilon=1e-5,
                 activation_function="gelu_new", bos_token_id=1, eos_token_id=1)
TINY_T5 = dict(T5_BASE, vocab_size=400, d_kv=8)
TINY_SHAPES = {
    "tiny-gpt2": dict(TINY_GPT2, n_layer=2, n_embd=64, n_head=4),
    "tiny-gpt2-distiller": dict(TINY_GPT2, n_layer=2, n_embd=32, n_head=2),
    "tiny-t5": dict(TINY_T5, d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
    "tiny-t5-distiller": dict(TINY_T5, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4),
}


# Issue 10: OPT (the paper's App. C pair opt-125m -> opt-6.7b) and a 7B Llama-style LLM with a distiller of the
# same tokenizer (TinyLlama-1.1B shares Llama-2's); GPU-sized: on a CPU use --flops-only (FLOPs from configs alone).
OPT_BASE = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
                activation_function="relu", dropout=0.0, tie_word_embeddings=True, pad_token_id=1)
LLAMA_BASE = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  hidden_act="silu", tie_word_embeddings=False)
DECODER_SHAPES = {
    "opt-125m": dict(OPT_BASE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-6.7b": dict(OPT_BASE, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "llama-2-7b": dict(LLAMA_BASE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "tinyllama-1.1b": dict(LLAMA_BASE, max_position_embeddings=2048, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}


def shape_config(name: str) -> dict:
    """config.json dict of a named shape (no download)."""
    if name in DECODER_SHAPES:
        return dict(DECODER_SHAPES[name])
    if name in GPT2_SHAPES:
        return dict(GPT2_BASE, **GPT2_SHAPES[name])
    if name in T5_SHAPES:
        return dict(T5_BASE, **T5_SHAPES[name])
    if name in TINY_SHAPES:
        return dict(TINY_SHAPES[name])
    raise ValueError(f"bench.py: unknown model shape {name!r}; expected one of "
                     f"{sorted(GPT2_SHAPES) + sorted(T5_SHAPES) + sorted(DECODER_SHAPES) + sorted(TINY_SHAPES)} or a "
                     "checkpoint folder")


@dataclass
class Pair:
    """One LLM and the distiller MEND uses for it."""
    family: str          # "t5" | a decoder-only family ("gpt2", "opt", "llama")
    llm: str             # shape name or checkpoint folder
    distiller: str       # shape name or checkpoint folder (ignored when mend_dir is given)
    mend_dir: str = ""   # a saved MEND (mend.MEND.save) to load instead of a random distiller


@dataclass
class Preset:
    settings: dict       # name -> |D| (demonstration tokens the ICL LLM sees)
    pairs: list
    l: int = 100         # distillation vectors (the paper's l = 100)
    query_len: int = 56  # x + option tokens per query (~ one MetaICL example, Tab. 1)
    option_len: int = 3  # tokens of the scored option (the rest of query_len is x)
    batch: str = "1,4,16"
    runs: int = 20
    warmup: int = 3


# Fig. 3: the ICL context lengths of the five settings (caption), l = 100, batch 1 (and the sweep).
FIG3_SETTINGS = {"class_to_class": 469, "hr_to_lr": 652, "qa_to_qa": 639, "non_nli_to_nli": 848,
                 "non_para_to_para": 818}
PRESETS = {
    "fig3": Preset(FIG3_SETTINGS, [Pair("gpt2", "gpt2-large", "gpt2"), Pair("gpt2", "gpt2-xl", "gpt2"),
                                   Pair("t5", "t5-large-lm-adapt", "t5-small-lm-adapt")]),
    # CPU-sized: the paper's longest setting with every length divided by 4 (|D|/l and x/l kept), distilgpt2-shaped
    # distiller for a gpt2-medium-shaped LLM (82M : 355M ~ 124M : 774M), batch 1.
    # issue 10: a 7B LLM of each new family with its distiller, at the Fig. 3 settings (GPU; or --flops-only)
    "llm7b": Preset(FIG3_SETTINGS, [Pair("opt", "opt-6.7b", "opt-125m"), Pair("llama", "llama-2-7b", "tinyllama-1.1b")]),
    "small": Preset({"non_nli_to_nli/4": 212}, [Pair("gpt2", "gpt2-medium", "distilgpt2")],
                    l=25, query_len=14, option_len=3, batch="1", runs=20, warmup=1),
    "tiny": Preset({"tiny": 48}, [Pair("gpt2", "tiny-gpt2", "tiny-gpt2-distiller"),
                                  Pair("t5", "tiny-t5", "tiny-t5-distiller")],
                   l=8, query_len=8, option_len=2, batch="1,2", runs=20, warmup=1),
}

# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs: 2 FLOPs per multiply-accumulate, matmuls only (as FlopCounterMode); norms, GELU, softmax, bias
# adds and embeddings are not counted. Attention counts QK^T and AV over every (query, key) pair: "full", the
# convention of FlopCounterMode's SDPA formula even with is_causal=True; causal=True counts only the pairs a
# causal mask keeps (about half the attention term for a prefix-free forward).


def _attn_pairs(t_q: int, t_past: int, causal: bool) -> int:
    if not causal:
        return t_q * (t_past + t_q)
    return t_q * t_past + t_q * (t_q + 1) // 2


def decoder_dims(cfg: dict) -> dict:
    """Widths of a decoder-only config.json: d (layers), emb (embeddings / LM head / S_D), layers, q (n_head *
    head_dim), kv (k and v widths: fewer heads with GQA), ffn (MACs per token of the MLP), proj (MACs per token of
    OPT's project_in and of its project_out, when word_embed_proj_dim != hidden_size)."""
    mt = cfg.get("model_type", "gpt2")
    if mt == "gpt2":
        d = cfg["n_embd"]
        return dict(d=d, emb=d, layers=cfg["n_layer"], q=d, kv=d, ffn=2 * d * (cfg.get("n_inner") or 4 * d), proj=0)
    d = cfg["hidden_size"]
    if mt == "opt":
        e = cfg.get("word_embed_proj_dim") or d
        return dict(d=d, emb=e, layers=cfg["num_hidden_layers"], q=d, kv=d, ffn=2 * d * cfg["ffn_dim"],
                    proj=e * d if e != d else 0)
    H = cfg["num_attention_heads"]                                            # llama, mistral, qwen2
    hd = cfg.get("head_dim") or d // H
    return dict(d=d, emb=d, layers=cfg["num_hidden_layers"], q=H * hd, kv=(cfg.get("num_key_value_heads") or H) * hd,
                ffn=3 * d * cfg["intermediate_size"], proj=0)                 # SwiGLU: gate, up, down


def gpt2_flops(cfg: dict, t: int, t_past: int = 0, batch: int = 1, lm_tokens=None, causal: bool = False) -> int:
    """One decoder-only forward (GPT-2, OPT, Llama-style) over t new tokens after t_past cached ones; lm_tokens
    positions go through the LM head (None = all t, 0 = a body-only forward)."""
    k = decoder_dims(cfg)
    per_layer = 2 * t * (2 * k["d"] * k["q"] + 2 * k["d"] * k["kv"] + k["ffn"])   # q, o; k, v; MLP
    per_layer += 2 * 2 * _attn_pairs(t, t_past, causal) * k["q"]              # QK^T and AV (GQA: every q head)
    lm = 2 * (t if lm_tokens is None else lm_tokens) * k["emb"] * cfg["vocab_size"]
    return batch * (k["layers"] * per_layer + 2 * 2 * t * k["proj"] + lm)


def _t5_ffn(cfg: dict, t: int) -> int:
    d, d_ff = cfg["d_model"], cfg["d_ff"]
    n_in = 2 if "gated" in cfg.get("feed_forward_proj", "relu") else 1        # wi_0, wi_1 (gated) or wi
    return 2 * t * d * d_ff * n_in + 2 * t * d_ff * d


def t5_encoder_flops(cfg: dict, t: int, batch: int = 1) -> int:
    d, inner = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"]
    per_layer = 2 * t * d * inner * 4 + 2 * 2 * t * t * inner + _t5_ffn(cfg, t)  # q, k, v, o; QK^T, AV; FFN
    return batch * cfg["num_layers"] * per_layer


def t5_decoder_flops(cfg: dict, t_dec: int, t_enc: int, batch: int = 1, lm_tokens=None, causal=False) -> int:
    d, inner, vocab = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["vocab_size"]
    per_layer = 2 * t_dec * d * inner * 4 + 2 * 2 * _attn_pairs(t_dec, 0, causal) * inner     # self-attention
    per_layer += 2 * t_dec * d * inner * 2 + 2 * t_enc * d * inner * 2 + 2 * 2 * t_dec * t_enc * inner  # cross
    per_layer += _t5_ffn(cfg, t_dec)
    n_dec = cfg.get("num_decoder_layers") or cfg["num_layers"]
    lm = 2 * (t_dec if lm_tokens is None else lm_tokens) * d * vocab
    return batch * (n_dec * per_layer + lm)


@dataclass
class Shapes:
    """Token counts of one row: |D|, l, x, option, batch."""
    ctx: int
    l: int
    x: int
    opt: int
    batch: int


def method_flops(method: str, family: str, llm_cfg: dict, dist_cfg: dict, s: Shapes, ideal: bool,
                 causal: bool = False, projection: str = "auto") -> int:
    """Analytic FLOPs of one method per batch of queries (per-query work only; the cached pair's prefix is done
    once per task and reported separately by prefix_flops). ideal=False mirrors
    mend.llm_logits(query_logits=False), as eval.py scores: GPT-2 runs the LM head at the option + 1 positions whose
    predictions it returns (never over x or the context), T5's decoder at every option position; the distiller never runs its LM head. ideal=True is the least work a scorer needs:
    the LM head only at the positions that predict the option tokens. projection: the MEND's (see distiller_flops)."""
    b, q = s.batch, s.x + s.opt
    if family != "t5":                                                          # decoder-only
        lm = (lambda t: s.opt) if ideal else (lambda t: s.opt + 1)
        llm = {"zero_shot": lambda: gpt2_flops(llm_cfg, q, 0, b, lm(q), causal),
               "icl": lambda: gpt2_flops(llm_cfg, s.ctx + q, 0, b, lm(s.ctx + q), causal),
               "prompt_tuning": lambda: gpt2_flops(llm_cfg, s.l + q, 0, b, lm(s.l + q), causal),
               "mend": lambda: gpt2_flops(llm_cfg, s.l + q, 0, b, lm(s.l + q), causal),
               "icl_cached": lambda: gpt2_flops(llm_cfg, q, s.ctx, b, lm(q), causal),
               "mend_cached": lambda: gpt2_flops(llm_cfg, q, s.l, b, lm(q), causal)}[method]()
    else:  # T5: [context; x] -> encoder, option -> decoder (mend.llm_logits); no cached pair
        enc = {"zero_shot": s.x, "icl": s.ctx + s.x, "prompt_tuning": s.l + s.x, "mend": s.l + s.x}[method]
        llm = t5_encoder_flops(llm_cfg, enc, b) + t5_decoder_flops(llm_cfg, s.opt, enc, b, None, causal)
    if method == "mend":
        llm += distiller_flops(family, dist_cfg, llm_cfg, s, ideal, causal, projection)
    return llm


def distiller_flops(family: str, dist_cfg: dict, llm_cfg: dict, s: Shapes, ideal: bool, causal=False,
                    projection: str = "auto") -> int:
    """The distiller over D + l placeholders, then the projection Linear(d_s -> d_llm) on the l outputs.
    projection as mend.MEND's: "auto" (a Linear only when the widths differ), "tanh" / "linear" (always a Linear,
    also at equal widths), "identity" (none); a saved MEND's config.json holds the resolved one."""
    if family != "t5":
        body = gpt2_flops(dist_cfg, s.ctx + s.l, 0, s.batch, 0, causal)    # hidden states only, no LM head
        d_s, d_llm = decoder_dims(dist_cfg)["emb"], decoder_dims(llm_cfg)["emb"]
    else:
        body = t5_encoder_flops(dist_cfg, s.ctx + s.l, s.batch)
        d_s, d_llm = dist_cfg["d_model"], llm_cfg["d_model"]
    linear = projection != "identity" and (projection != "auto" or d_s != d_llm)
    return body + (2 * s.batch * s.l * d_s * d_llm if linear else 0)


def prefix_flops(method: str, llm_cfg: dict, dist_cfg: dict, s: Shapes, projection: str = "auto") -> int:
    """Once-per-task work of the cached pair (batch 1): the prefix KV (and S_D for mend_cached), ideal count."""
    one = dataclasses.replace(s, batch=1)
    if method == "icl_cached":
        return gpt2_flops(llm_cfg, s.ctx, 0, 1, 1)
    if method == "mend_cached":
        return distiller_flops("gpt2", dist_cfg, llm_cfg, one, True, projection=projection) + \
            gpt2_flops(llm_cfg, s.l, 0, 1, 1)
    return 0


def ratio(base, value):
    """base / value (how many times cheaper than the baseline); None when either is missing or zero."""
    if base is None or value is None or value == 0:
        return None
    return base / value


def add_ratios(rows: list) -> list:
    """Fill flops_ratio / ms_ratio / ideal_ratio of every row from the baseline row (icl, or icl_cached for the
    cached pair) of the same (setting, llm, batch)."""
    index = {(r["setting"], r["llm"], r["batch"], r["method"]): r for r in rows}
    for r in rows:
        base = index.get((r["setting"], r["llm"], r["batch"], BASELINE[r["method"]]))
        if base is None:
            r["flops_ratio"] = r["ms_ratio"] = r["ideal_ratio"] = None
            continue
        r["flops_ratio"] = ratio(base["flops"], r["flops"])
        r["ms_ratio"] = ratio(base["ms"], r["ms"])
        r["ideal_ratio"] = ratio(base["_ideal"], r["_ideal"])
    return rows

# ----------------------------------------------------------------------------------------------------------------
# Measurement


def flop_counter():
    """FlopCounterMode that also counts the CPU SDPA kernel (torch registers a formula only for the CUDA kernels,
    so attention would count as 0 FLOPs on CPU); same full-attention formula as the CUDA ones."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query, key, value)
        custom[op] = cpu_sdpa
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(fn) -> int:
    with flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fns: dict, device, runs: int, warmup: int) -> dict:
    """{name: median ms} of `runs` timed calls each after `warmup` untimed ones. The methods are timed round-robin
    (run r of every method, then run r + 1), so a load change on a shared machine hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def peak_mb(fn, device, resident_bytes: int):
    """Peak GPU memory of one call: weights of the modules the method uses + its cache + the activation peak
    above what was allocated before the call. None on CPU (not measured)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before + resident_bytes) / 2 ** 20


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) cache: tuples, lists, dicts, dataclasses."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def make_batch(vocab: int, s: Shapes, device, seed: int) -> EpisodeBatch:
    """Random token ids (no padding: every row has the same lengths; ids >= 2 skip <pad>/<eos>-like ids)."""
    g = torch.Generator().manual_seed(seed)
    demo = torch.randint(2, vocab, (1, s.ctx), generator=g).expand(s.batch, -1)   # one task: the same D per row
    query = torch.randint(2, vocab, (s.batch, s.x), generator=g)
    target = torch.randint(2, vocab, (s.batch, s.opt), generator=g)
    ones = lambda t: torch.ones_like(t)
    return EpisodeBatch(demo_ids=demo.contiguous(), demo_mask=ones(demo), query_ids=query, query_mask=ones(query),
                        target_ids=target, target_mask=ones(target)).to(device)


@dataclass
class Models:
    family: str
    llm_name: str
    llm: torch.nn.Module
    llm_cfg: dict
    mend: torch.nn.Module
    dist_cfg: dict
    prompt: torch.nn.Module


def _build(name: str, device, dtype):
    if os.path.isdir(name):
        return model.from_pretrained(name, dtype=dtype, device=device), model.load_config(name)
    cfg = shape_config(name)
    with torch.device(device):            # init straight on the device (fast for 1.5B parameters on a GPU)
        lm = model.build_model(cfg)
    return model.cast(lm, dtype, device).eval(), cfg


def saved_mend_config(mend_dir: str) -> dict:
    """config.json of a saved MEND (mend.MEND.save): its l, projection and distiller_config."""
    cfg = mend._read_config(mend_dir, "MEND")
    if cfg["kind"] != "mend":
        raise ValueError(f"bench.py: --mend {mend_dir}: holds a {cfg.get('kind')!r} checkpoint, not a saved MEND")
    return cfg


def build_models(pair: Pair, l: int, device, dtype, seed: int) -> Models:
    torch.manual_seed(seed)
    llm, llm_cfg = _build(pair.llm, device, dtype)
    d_llm = llm.hidden_size
    if pair.mend_dir:
        distill = mend.MEND.from_pretrained(pair.mend_dir, dtype=dtype, device=device).eval()
        dist_cfg = saved_mend_config(pair.mend_dir)["distiller_config"]
    else:
        distiller, dist_cfg = _build(pair.distiller, device, dtype)
        with torch.device(device):
            distill = mend.MEND(distiller, d_llm=d_llm, l=l)
        distill = model.cast(distill, dtype, device).eval()
    with torch.device(device):
        prompt = mend.PromptTuning(distill.l, d_llm)
    prompt = prompt.to(device=device, dtype=dtype).eval()
    name = pair.llm if not os.path.isdir(pair.llm) else os.path.basename(os.path.normpath(pair.llm))
    return Models(pair.family, name, llm, llm_cfg, distill, dist_cfg, prompt)


def method_fns(m: Models, batch: EpisodeBatch):
    """Per-query callables of every method this family supports, plus the cached pair's per-task prefixes.
    Returns {method: (fn, resident_bytes, kv_bytes)}."""
    llm_b = param_bytes(m.llm)
    fns = {
        "zero_shot": (lambda: mend.llm_logits(m.llm, batch, None, query_logits=False), llm_b, None),
        "icl": (lambda: mend.llm_logits(m.llm, batch, "demonstrations", query_logits=False), llm_b, None),
        "prompt_tuning": (lambda: mend.llm_logits(m.llm, batch, m.prompt.distill(batch.demo_ids, batch.demo_mask), query_logits=False),
                          llm_b + param_bytes(m.prompt), None),
        "mend": (lambda: mend.llm_logits(m.llm, batch, m.mend.distill(batch.demo_ids, batch.demo_mask), query_logits=False),
                 llm_b + param_bytes(m.mend), None),
    }
    if not m.llm.is_encoder_decoder:   # T5's encoder is bidirectional: a demonstration prefix cannot be reused
        demo1 = batch.demo_ids[:1]
        icl_cache = mend.prefix_cache(m.llm, demo1)
        s_d = m.mend.distill(demo1, batch.demo_mask[:1])                         # (1, l, d_llm), once per task
        mend_cache = mend.prefix_cache(m.llm, s_d)
        fns["icl_cached"] = (lambda: mend.llm_logits(m.llm, batch, "demonstrations", cache=icl_cache, query_logits=False), llm_b,
                             tensor_bytes(icl_cache.past_key_values))                # K/V only, no last logits
        fns["mend_cached"] = (lambda: mend.llm_logits(m.llm, batch, s_d, cache=mend_cache, query_logits=False), llm_b,
                              tensor_bytes(mend_cache.past_key_values))
    return fns


def bench_pair(m: Models, settings: dict, args, device, dtype) -> list:
    rows = []
    vocab = min(m.llm.vocab_size, m.mend.distiller.vocab_size)      # ids valid for both (same tokenizer family)
    for setting, ctx in settings.items():
        for b in args.batches:
            s = Shapes(ctx=ctx, l=m.mend.l, x=args.query_len - args.option_len, opt=args.option_len, batch=b)
            check_positions(m.llm_name, m.llm_cfg, m.dist_cfg, s)
            batch = make_batch(vocab, s, device, args.seed)
            with torch.inference_mode():
                fns = method_fns(m, batch)
                t0 = time.perf_counter()
                flops = {method: count_flops(fn) for method, (fn, _, _) in fns.items()}
                ms = median_ms({method: fn for method, (fn, _, _) in fns.items()}, device, args.runs, args.warmup)
                for method, (fn, resident, kv) in fns.items():
                    row = dict(setting=setting, llm=m.llm_name, method=method, batch=b, flops=flops[method],
                               flops_ratio=None, ideal_ratio=None, ms=ms[method], ms_ratio=None,
                               peak_mb=peak_mb(fn, device, resident + (kv or 0)),
                               kv_mb=None if kv is None else kv / 2 ** 20, device=str(device),
                               dtype=str(dtype).replace("torch.", ""),
                               flops_analytic=method_flops(method, m.family, m.llm_cfg, m.dist_cfg, s, ideal=False,
                                                           projection=m.mend.projection),
                               _ideal=method_flops(method, m.family, m.llm_cfg, m.dist_cfg, s, ideal=True,
                                                   projection=m.mend.projection),
                               prefix_flops=prefix_flops(method, m.llm_cfg, m.dist_cfg, s, m.mend.projection) or None,
                               context_len=ctx, l=s.l, query_len=s.x + s.opt)
                    rows.append(row)
                    print(f"  {setting} {m.llm_name} B={b} {method:13s} {row['flops'] / 1e9:10.2f} GFLOPs "
                          f"{row['ms']:9.2f} ms", flush=True)
                print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
            del fns, batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_positions(llm_name: str, llm_cfg: dict, dist_cfg: dict, s: Shapes):
    """ValueError when ICL's D + x + option or the distiller's D + l exceed a model's n_positions."""
    n_pos = llm_cfg.get("n_positions")
    if n_pos and s.ctx + s.x + s.opt > n_pos:
        raise ValueError(f"bench.py: --context/--query-len: ICL needs {s.ctx + s.x + s.opt} positions, "
                         f"{llm_name} has n_positions={n_pos}")
    n_pos = dist_cfg.get("n_positions")
    if n_pos and s.ctx + s.l > n_pos:
        raise ValueError(f"bench.py: the distiller needs |D| + l = {s.ctx + s.l} positions, it has {n_pos}")

# ----------------------------------------------------------------------------------------------------------------
# Output


def _fmt(v, spec, none="n/a"):
    return none if v is None else format(v, spec)


def _gflops(v) -> str:
    return f"{v / 1e9:.2f}" if v >= 1e8 else f"{v / 1e9:.2e}"     # tiny models: keep significant digits


def markdown_table(rows: list) -> str:
    lines = ["| setting | LLM | B | method | GFLOPs (counter) | GFLOPs (analytic) | FLOPs ratio | ideal ratio "
             "| median ms | ms ratio | peak MB | KV MB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['llm']} | {r['batch']} | {r['method']} | {_gflops(r['flops'])} "
                     f"| {_gflops(r['flops_analytic'])} | {_fmt(r['flops_ratio'], '.2f')}x "
                     f"| {_fmt(r['ideal_ratio'], '.2f')}x | {r['ms']:.2f} | {_fmt(r['ms_ratio'], '.2f')}x "
                     f"| {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['kv_mb'], '.3g')} |")
    return "\n".join(lines)


def target_report(rows: list, device_type: str) -> list:
    """One line per target of issue 8: met, or missed and by how much."""
    out = []
    for group, label in ((("mend", "mend_cached"), "MEND"), (("zero_shot", "prompt_tuning"), "the other methods")):
        cmp = [r for r in rows if r["method"] in group and r["flops_ratio"] and r["ideal_ratio"]]
        if not cmp:
            continue
        worst = max(cmp, key=lambda r: abs(r["flops_ratio"] / r["ideal_ratio"] - 1))
        dev = worst["flops_ratio"] / worst["ideal_ratio"] - 1
        out.append(f"[{'met' if abs(dev) <= 0.05 else 'MISSED'}] measured FLOPs ratio within 5% of the ideal, "
                   f"{label}: worst {dev:+.1%} ({worst['method']}, {worst['setting']}, {worst['llm']}, "
                   f"B={worst['batch']}: {worst['flops_ratio']:.2f}x vs ideal {worst['ideal_ratio']:.2f}x)")
    xl = [r for r in rows if r["method"] == "mend" and r["batch"] == 1 and r["llm"] == "gpt2-xl"]
    if xl:
        r = max(xl, key=lambda r: r["context_len"])
        ok = r["flops_ratio"] >= 3.5
        out.append(f"[{'met' if ok else 'MISSED'}] 3.5x fewer FLOPs at the longest context with gpt2-xl "
                   f"({r['setting']}, |D|={r['context_len']}, B=1): {r['flops_ratio']:.2f}x"
                   + ("" if ok else f", short by {3.5 - r['flops_ratio']:.2f}x"))
    else:
        out.append("[n/a] 3.5x FLOPs with gpt2-xl: no gpt2-xl mend row in this run (default preset only)")
    b1 = [r for r in rows if r["method"] == "mend" and r["batch"] == 1 and r["ms_ratio"]]
    for r in b1:
        where = f"{r['setting']}, {r['llm']}, B=1"
        if device_type == "cuda":
            ok = r["ms_ratio"] >= 1.33
            out.append(f"[{'met' if ok else 'MISSED'}] GPU latency ratio >= 1.33x ({where}): {r['ms_ratio']:.2f}x"
                       + ("" if ok else f", short by {1.33 - r['ms_ratio']:.2f}x"))
        else:
            frac = r["ms_ratio"] / r["flops_ratio"]
            ok = frac >= 0.8
            out.append(f"[{'met' if ok else 'MISSED'}] CPU latency ratio >= 0.8 x FLOPs ratio ({where}): "
                       f"{r['ms_ratio']:.2f}x / {r['flops_ratio']:.2f}x = {frac:.2f}"
                       + ("" if ok else f", short by {0.8 - frac:.2f}"))
    return out


def write_plot(rows: list, path: str) -> bool:
    """Fig. 3-like bars (FLOPs and latency per setting and method, batch 1) when matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b1 = [r for r in rows if r["batch"] == min(x["batch"] for x in rows)]
    llms = list(dict.fromkeys(r["llm"] for r in b1))
    methods = [m for m in ("icl", "prompt_tuning", "mend") if any(r["method"] == m for r in b1)]
    fig, axes = plt.subplots(2, len(llms), figsize=(5 * len(llms), 7), squeeze=False)
    for j, llm in enumerate(llms):
        settings = list(dict.fromkeys(r["setting"] for r in b1 if r["llm"] == llm))
        for i, (key, label) in enumerate((("flops", "TFLOPs"), ("ms", "median ms"))):
            ax = axes[i][j]
            width = 0.8 / len(methods)
            for k, meth in enumerate(methods):
                vals = [next((r[key] for r in b1 if r["llm"] == llm and r["setting"] == s and r["method"] == meth),
                             0) for s in settings]
                vals = [v / 1e12 for v in vals] if key == "flops" else vals
                ax.bar([x + k * width for x in range(len(settings))], vals, width, label=meth)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], settings, rotation=30, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{llm}, batch {b1[0]['batch']}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list, out_dir: str, table: str, report: list, plot: bool = True):
    """bench.json (the rows), bench.md (table + report lines) and, when plot and matplotlib allow, bench.png."""
    os.makedirs(out_dir, exist_ok=True)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    for name, text in (("bench.json", json.dumps(public, indent=1)), ("bench.md", table + "\n\n" +
                                                                       "\n".join(report) + "\n")):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    return plot and write_plot(rows, os.path.join(out_dir, "bench.png"))

# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FLOPs, latency, peak memory and KV size of ICL vs PromptTuning vs "
                                            "MEND (Fig. 3)")
    p.add_argument("--preset", default="fig3", choices=sorted(PRESETS))
    p.add_argument("--family", default="", help="comma list of families to run (gpt2,t5,opt,llama); default: all of "
                                                "the preset")
    p.add_argument("--settings", default="", help="comma list of the preset's settings (default: all)")
    p.add_argument("--context", default="", help="override |D|: comma list of NAME=TOKENS settings")
    p.add_argument("--llm", default="", help="LLM checkpoint folder: the run has this one LLM only (the preset's "
                                             "other LLMs and families are dropped), with --distiller / --mend, else "
                                             "the first distiller of the preset for its family")
    p.add_argument("--distiller", default="", help="distiller LM checkpoint folder (random placeholders)")
    p.add_argument("--mend", default="", help="saved MEND folder (mend.MEND.save) to use as the distiller")
    p.add_argument("--l", type=int, default=None, help="distillation vectors (preset: 100 for fig3; with --mend: "
                                                       "the saved MEND's l, another value is refused)")
    p.add_argument("--query-len", type=int, default=None, help="x + option tokens (preset: 56 for fig3)")
    p.add_argument("--option-len", type=int, default=None, help="option tokens inside --query-len (preset: 3)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (preset: 1,4,16 for fig3)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per row, >= 20 (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp32 on CPU, fp16 on GPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md, bench.png (default runs/bench; with "
                                               "--flops-only nothing is written unless --out is given; '' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops-only", action="store_true",
                   help="analytic FLOPs from the configs alone (no weights, no timing): for 7B shapes on a CPU; "
                        "writes bench.json and bench.md to --out")
    return p.parse_args(argv)


def resolve_args(args):
    preset = PRESETS[args.preset]
    if args.mend:                          # the saved MEND fixes l (its number of placeholders)
        saved_l = saved_mend_config(args.mend)["l"]
        if args.l is not None and args.l != saved_l:
            raise ValueError(f"bench.py: --l {args.l}: the saved MEND {args.mend} has l = {saved_l}")
        args.l = saved_l
    for name in ("l", "query_len", "option_len", "batch", "runs", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    if args.runs < 20:
        raise ValueError(f"bench.py: --runs {args.runs}: expected >= 20 timed runs (the median is reported)")
    if not 1 <= args.option_len < args.query_len:
        raise ValueError(f"bench.py: --option-len {args.option_len}: expected 1 <= it < --query-len {args.query_len}")
    settings = dict(preset.settings)
    if args.context:
        settings = {}
        for item in args.context.split(","):
            name, _, n = item.partition("=")
            if not n.isdigit():
                raise ValueError(f"bench.py: --context {item!r}: expected NAME=TOKENS")
            settings[name] = int(n)
    if args.settings:
        wanted = args.settings.split(",")
        missing = [w for w in wanted if w not in settings]
        if missing:
            raise ValueError(f"bench.py: --settings {missing}: expected some of {list(settings)}")
        settings = {k: v for k, v in settings.items() if k in wanted}
    pairs = list(preset.pairs)
    if args.family:
        fams = args.family.split(",")
        pairs = [p for p in pairs if p.family in fams]
    if args.llm:
        mt = model.load_config(args.llm).get("model_type")
        fam = {"mistral": "llama", "qwen2": "llama"}.get(mt, mt)
        kept = [p for p in pairs if p.family == fam][:1] or [Pair(fam, args.llm, "")]
        pairs = [Pair(fam, args.llm, args.distiller or kept[0].distiller, args.mend)]
    elif args.distiller or args.mend:
        pairs = [Pair(p.family, p.llm, args.distiller or p.distiller, args.mend) for p in pairs]
    for p in pairs:
        if not p.mend_dir and not p.distiller:
            raise ValueError(f"bench.py: no distiller for {p.llm}: pass --distiller DIR or --mend DIR")
    if not pairs:
        raise ValueError(f"bench.py: --family {args.family!r} left no model pair in preset {args.preset}")
    return settings, pairs


def analytic_rows(pairs: list, settings: dict, args) -> list:
    """Every method's analytic FLOPs per batch of queries from the config.json dicts alone (--flops-only)."""
    def cfg_of(name):
        return model.load_config(name) if os.path.isdir(name) else shape_config(name)

    rows = []
    for p in pairs:
        llm_cfg = cfg_of(p.llm)
        saved = saved_mend_config(p.mend_dir) if p.mend_dir else None     # l, projection and widths of that MEND
        dist_cfg = saved["distiller_config"] if saved else cfg_of(p.distiller)
        l, proj = (saved["l"], saved["projection"]) if saved else (args.l, "auto")
        name = p.llm if not os.path.isdir(p.llm) else os.path.basename(os.path.normpath(p.llm))
        for setting, ctx in settings.items():
            for b in args.batches:
                s = Shapes(ctx=ctx, l=l, x=args.query_len - args.option_len, opt=args.option_len, batch=b)
                check_positions(name, llm_cfg, dist_cfg, s)
                for method in METHODS if p.family != "t5" else METHODS[:4]:
                    f = method_flops(method, p.family, llm_cfg, dist_cfg, s, ideal=False, projection=proj)
                    rows.append(dict(setting=setting, llm=name, method=method, batch=b, flops=f, flops_analytic=f,
                                     _ideal=method_flops(method, p.family, llm_cfg, dist_cfg, s, ideal=True,
                                                         projection=proj),
                                     ms=None, peak_mb=None, kv_mb=None, device=None, dtype=None,
                                     prefix_flops=prefix_flops(method, llm_cfg, dist_cfg, s, proj) or None,
                                     context_len=ctx, l=s.l, query_len=s.x + s.opt))
    add_ratios(rows)
    lines = ["| setting | LLM | B | method | GFLOPs (analytic) | FLOPs ratio | prefix GFLOPs (once per task) |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['llm']} | {r['batch']} | {r['method']} | {_gflops(r['flops'])} "
                     f"| {_fmt(r['flops_ratio'], '.2f')}x | {_gflops(r['prefix_flops']) if r['prefix_flops'] else ''} |")
    table = "\n".join(lines)
    note = ("FLOPs per call over B rows. FLOPs ratio: icl / method (cached pair: icl_cached / method); analytic only "
            "(--flops-only: nothing built or timed).")
    print(table + "\n\n" + note)
    if args.out:
        write_outputs(rows, args.out, table, [note], plot=False)
        print(f"wrote {os.path.join(args.out, 'bench.json')}, bench.md (no PNG: nothing timed)")
    return rows


def main(argv=None):
    args = parse_args(argv)
    settings, pairs = resolve_args(args)
    if args.flops_only:
        print(f"bench.py: preset {args.preset}, --flops-only (analytic), l={args.l}, query {args.query_len} tokens "
              f"(option {args.option_len}), batches {args.batches}", flush=True)
        return analytic_rows(pairs, settings, args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             "auto": torch.float16 if device.type == "cuda" else torch.float32}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    model.use_shape_agnostic_attention(device)  # as train.py and eval.py run: bench times what they run
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py: preset {args.preset} on {where}, {str(dtype).replace('torch.', '')}, l={args.l}, "
          f"query {args.query_len} tokens (option {args.option_len}), batches {args.batches}, "
          f"median of {args.runs} runs after {args.warmup} warm-up", flush=True)
    if device.type == "cpu" and args.preset == "fig3":
        print("note: the fig3 preset (gpt2-xl, |D| up to 848, batch 16) is GPU-sized; on a CPU it takes hours. "
              "--preset small is the CPU-sized one.", flush=True)
    t_start = time.perf_counter()
    rows = []
    for pair in pairs:
        t0 = time.perf_counter()
        m = build_models(pair, args.l, device, dtype, args.seed)
        print(f"built {pair.family} {m.llm_name} + distiller {pair.mend_dir or pair.distiller} "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        rows += bench_pair(m, settings, args, device, dtype)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    table = markdown_table(rows)
    report = target_report(rows, device.type)
    print("\n" + table + "\n")
    print("FLOPs and ms: per call over the B rows of a batch. "
          "FLOPs: counter = torch.utils.flop_counter.FlopCounterMode (attention counted over all T x T pairs even "
          "when causal); analytic = matmuls + attention, same convention. Ratios: icl / method (cached pair: "
          "icl_cached / method). peak MB: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                               else "not measured on CPU") + ".")
    print("targets:\n  " + "\n  ".join(report))
    out = "runs/bench" if args.out is None else args.out
    plotted = write_outputs(rows, out, table, report) if out else False
    if out:
        print(f"wrote {os.path.join(out, 'bench.json')}, bench.md" + (", bench.png" if plotted else
                                                                            " (no PNG: matplotlib not installed)"))
    print(f"total {time.perf_counter() - t_start:.1f}s")
    return rows


if __name__ == "__main__":
    main()
