"""eval.py: the MetaICL meta-test protocol (paper Sec. 4.1) for the five methods of Table 2, and the analyses of
Sec. 5 (Fig. 4a K, Table 3 perturbations / kNN selection, Table 7 templates).

Methods (how the frozen LLM is conditioned before the query x):
  zero_shot      nothing                                     P(y | x)
  icl            the K demonstrations as tokens (Eq. 1)      P(y | D, x)
  prompt_tuning  l learned vectors (mend.PromptTuning)       P(y | S, x)
  hypertuning    S_D from a distiller trained with CLM       P(y | S_D, x)   (Eq. 2)
  mend           S_D from the MEND distiller                 P(y | S_D, x)   (Eq. 2)

Protocol: for each meta-test task of --split and each seed (100, 13, 21, 42, 87; --seeds N takes the first N) the
16 train rows of that seed are the demonstrations, every test row is a query; each option is scored by the mean
log-likelihood of its tokens (MetaICL's length-normalised scoring), the prediction is the best option. Per task:
MetaICL's macro-F1 (classification) or accuracy (the rest), mean and std over seeds; then the mean over tasks.
Table 2's AVG +- std: per seed the mean over tasks, then mean and (population) std over seeds. Zero-shot scores x
as MetaICL's first input (no " " / three-newline prefix: nothing precedes it); the other methods keep the prefix.

Top to bottom: metrics and aggregation; option scoring (score_queries: the one place options are scored, with the
shared prefix computed once as a KV cache for decoder-only LLMs and the encoder run once per query for T5);
evaluate_tasks (reused by train.py for validation on the dev split); output (markdown table, JSON); the CLI.

Connections: imports model.py (LLM + tokenizer), data.py (load_meta_test: tasks, queries, demonstrations) and
mend.py (llm_logits / prefix_cache: how the LLM is conditioned; MEND / PromptTuning checkpoints). Never train.py.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import mend
import model

SEEDS = (100, 13, 21, 42, 87)
METHODS = ("zero_shot", "prompt_tuning", "icl", "hypertuning", "mend")  # the row order of Table 2
METHOD_LABELS = {"zero_shot": "zero-shot", "prompt_tuning": "PromptTuning", "icl": "Vanilla ICL",
                 "hypertuning": "HyperTuning", "mend": "MEND"}
CHECKPOINT_METHODS = ("prompt_tuning", "hypertuning", "mend")  # conditioned on module.distill(D)
DEMO_FREE_METHODS = ("zero_shot", "prompt_tuning")  # ignore D: scored once per task, copied to every seed

# ----------------------------------------------------------------------------------------------------------------
# Metrics (MetaICL metaicl/data.py:88-114). Predictions and golds are compared as stripped option strings.


def accuracy(preds: list[str], golds: list[str]) -> float:
    """Fraction of predictions equal to the gold answer."""
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"eval.py accuracy: expected equal, non-empty lists, got {len(preds)} preds, "
                         f"{len(golds)} golds")
    return float(np.mean([p == g for p, g in zip(preds, golds)]))


def macro_f1(preds: list[str], golds: list[str]) -> float:
    """MetaICL's macro-F1: the average over the GOLD classes only (a class predicted but never gold adds nothing,
    unlike sklearn's). Per class c: recall = accuracy among gold == c; precision = accuracy among pred == c, or 1.0
    when c is never predicted (then recall is 0 and F1 is 0 anyway); F1 = 2PR / (P + R), 0 when P + R = 0."""
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"eval.py macro_f1: expected equal, non-empty lists, got {len(preds)} preds, "
                         f"{len(golds)} golds")
    f1s = []
    for c in sorted(set(golds)):
        recall = np.mean([p == g for p, g in zip(preds, golds) if g == c])
        predicted = [p == g for p, g in zip(preds, golds) if p == c]
        precision = np.mean(predicted) if predicted else 1.0
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(f1s))


def task_metric(preds: list[str], golds: list[str], task_type: str) -> float:
    """The number Table 2 reports for one (task, seed): macro-F1 for classification tasks, accuracy otherwise."""
    return macro_f1(preds, golds) if task_type == "classification" else accuracy(preds, golds)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and POPULATION std (ddof=0, numpy's default) over seeds; equal values (one seed, or a method that ignores
    the demonstrations) give exactly 0."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std()) if np.ptp(v) > 0 else 0.0


def summarize(per_seed: dict[str, dict[int, float]]) -> dict:
    """{task: {seed: score}} -> {"tasks": {task: {"mean", "std", "seeds"}}, "avg", "avg_std", "avg_seeds"}.

    Per task: mean +- std over seeds. avg: the plain mean of the per-task means, each task counted once (the
    official code's substring match counts some QA tasks two or three times; official-code-notes 6.4).
    Table 2's AVG +- std: avg_seeds = per seed, the mean over the tasks scored with that seed; avg_std = their
    population std (ddof=0, like the per-task std). Their mean equals avg when every task has every seed."""
    tasks = {t: dict(zip(("mean", "std"), mean_std(list(s.values()))), seeds=dict(s)) for t, s in per_seed.items()}
    if not tasks:
        return {"tasks": {}, "avg": float("nan"), "avg_std": float("nan"), "avg_seeds": {}}
    by_seed: dict[int, list[float]] = {}
    for s in per_seed.values():
        for seed, score in s.items():
            by_seed.setdefault(seed, []).append(score)
    avg_seeds = {seed: float(np.mean(v)) for seed, v in by_seed.items()}
    avg = float(np.mean([r["mean"] for r in tasks.values()]))
    return {"tasks": tasks, "avg": avg, "avg_std": mean_std(list(avg_seeds.values()))[1], "avg_seeds": avg_seeds}


# ----------------------------------------------------------------------------------------------------------------
# Option scoring: the mean log-likelihood of each option's tokens given (context, x). The ONE place this happens.

def _pad_id(llm) -> int:
    return int(getattr(llm.config, "pad_token_id", None) or 0)


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> ids (N, T) long, mask (N, T) 1 = real."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long).reshape(len(seqs), T)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long).reshape(len(seqs), T)
    return ids, mask


def _rows_of(queries: list, batch_size: int) -> list[list[int]]:
    """Group query indices into batches of at most batch_size (query, option) rows; the options of one query are
    never split (a query with more options than batch_size forms its own batch)."""
    groups, cur, n = [], [], 0
    for i, q in enumerate(queries):
        c = len(q.option_ids)
        if cur and n + c > batch_size:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += c
    if cur:
        groups.append(cur)
    return groups


def option_loglik(target_logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(B, Ty, V), (B, Ty), (B, Ty) -> (B,) mean log p(option token) over the real option tokens, in fp32."""
    logp = F.log_softmax(target_logits.float(), dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # (B, Ty)
    mask = target_mask.to(logp.dtype)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _option_batch(queries: list, demo_ids: list[int] | None, pad_id: int, device) -> "data.EpisodeBatch":
    """One row per (query, option): demonstrations (or []), x, the option as the target segment."""
    episodes = [data.Episode(demo_ids=list(demo_ids or []), query_ids=list(q.query_ids), target_ids=list(opt))
                for q in queries for opt in q.option_ids]
    return data.collate(episodes, pad_id=pad_id).to(device)


@torch.no_grad()
def score_queries(llm, queries: list, context=None, batch_size: int = 16, use_cache: bool = True) -> list[np.ndarray]:
    """Per query, the (n_options,) float64 array of mean option-token log-likelihoods given (context, x).

    context: None (zero-shot: pass zero_shot_queries(queries)), a list[int] of demonstration tokens (vanilla ICL,
    Eq. 1) or S_D (1, l, d_llm) (PromptTuning / HyperTuning / MEND, Eq. 2), shared by every query given here.
    batch_size = the most (query, option) rows per forward; the options of one query always share a batch; results
    do not depend on it.
    use_cache (the fast path): decoder-only LLMs run the context once (mend.prefix_cache) and every batch reuses its
    KV cache; T5 runs the encoder once per query on [context; x] and only the decoder per option.
    use_cache=False: every row recomputes [context; x; option] through mend.llm_logits (the reference path)."""
    device = next(llm.parameters()).device
    pad_id = _pad_id(llm)
    if isinstance(context, list) and not context:
        context = None  # no demonstration survived: no context tokens (x keeps its prefix, as in MetaICL's ICL)
    demo_ids = context if isinstance(context, list) else None
    cache = None
    if use_cache and context is not None and not llm.is_encoder_decoder:
        prefix = torch.tensor(demo_ids, dtype=torch.long, device=device) if demo_ids is not None else context
        cache = mend.prefix_cache(llm, prefix)  # the shared prefix, once
    scores = []
    for group in _rows_of(queries, batch_size):
        qs = [queries[i] for i in group]
        if use_cache and llm.is_encoder_decoder:
            ll = _t5_scores(llm, qs, context, pad_id, device)
        else:
            batch = _option_batch(qs, demo_ids if cache is None else None, pad_id, device)
            if cache is not None:
                ctx = None
            elif demo_ids is not None:
                ctx = "demonstrations"
            else:  # None or S_D (1, l, d) -> one copy per row
                ctx = None if context is None else context.expand(batch.target_ids.size(0), -1, -1)
            out = mend.llm_logits(llm, batch, ctx, cache=cache, query_logits=False)  # only options are scored
            ll = option_loglik(out.target, batch.target_ids, batch.target_mask)
        ll = ll.double().cpu().numpy()
        start = 0
        for q in qs:
            scores.append(ll[start:start + len(q.option_ids)])
            start += len(q.option_ids)
    return scores


def _t5_scores(llm, queries: list, context, pad_id: int, device) -> torch.Tensor:
    """T5: the encoder reads [context; x] once per query (queries batched, right-padded); each option then runs
    the decoder only, on its query's encoder states. Same inputs as mend.llm_logits' T5 path."""
    x, xmask = _pad([q.query_ids for q in queries], pad_id)  # (Q, Tq)
    x, xmask = x.to(device), xmask.to(device)
    emb, mask = llm.embed_tokens(x), xmask  # (Q, Tq, d), (Q, Tq)
    if context is not None:
        if isinstance(context, list):
            ce = llm.embed_tokens(torch.tensor([context], dtype=torch.long, device=device))  # E_D (1, Td, d), Eq. 1
        else:
            ce = context.to(device=device, dtype=emb.dtype)  # S_D (1, l, d), Eq. 2
        ce = ce.expand(len(queries), -1, -1)
        emb = torch.cat([ce, emb], 1)  # [context; x], right-padded (the context has no padding)
        mask = torch.cat([mask.new_ones(ce.shape[:2]), mask], 1)
    enc = llm.encode(inputs_embeds=emb, attention_mask=mask)  # (Q, Te, d)
    counts = torch.tensor([len(q.option_ids) for q in queries], device=device)
    enc, mask = enc.repeat_interleave(counts, 0), mask.repeat_interleave(counts, 0)  # (R, Te, d), one per option
    y, ymask = _pad([opt for q in queries for opt in q.option_ids], pad_id)
    y, ymask = y.to(device), ymask.to(device)
    out = llm(attention_mask=mask, encoder_hidden_states=enc, decoder_input_ids=llm.shift_right(y),
              decoder_attention_mask=ymask)
    return option_loglik(out.logits, y, ymask)


def predict(scores: list[np.ndarray]) -> list[int]:
    """argmax per query (ties -> the first option, as numpy)."""
    return [int(np.argmax(s)) for s in scores]


# ----------------------------------------------------------------------------------------------------------------
# Methods: the context each method puts before x, and the per-task loop (also used by train.py on the dev split).

def method_context(llm, method: str, module, demo_ids: list[int]):
    """What conditions the LLM for one set of demonstrations D: None | list[int] (D as tokens) | S_D (1, l, d)."""
    if method == "zero_shot":
        return None
    if method == "icl":
        return list(demo_ids)
    if method in CHECKPOINT_METHODS:
        if module is None:
            raise ValueError(f"eval.py method_context: method {method!r} needs a MEND/PromptTuning module, got None")
        p = next(module.parameters())
        ids = torch.tensor([list(demo_ids)], dtype=torch.long, device=p.device)  # (1, Td)
        s_d = module.distill(ids, torch.ones_like(ids))  # (1, l, d_llm)
        w = next(llm.parameters())
        return s_d.to(device=w.device, dtype=w.dtype)
    raise ValueError(f"eval.py method_context: unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _query_key(task) -> tuple:
    return (task.task, task.split, tuple((tuple(q.query_ids), tuple(map(tuple, q.option_ids)), q.gold)
                                         for q in task.queries))


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def zero_shot_queries(queries: list) -> list:
    """The queries as zero-shot scores them: nothing precedes x, so x is MetaICL's first input, without the " " /
    three-newline prefix it gets after a context (data.Query.zero_shot_ids; None keeps query_ids)."""
    return [q if q.zero_shot_ids is None else replace(q, query_ids=q.zero_shot_ids) for q in queries]


@torch.no_grad()
def evaluate_task(llm, method: str, module, task, batch_size: int = 16, use_cache: bool = True) -> dict:
    """One (task, seed): score every query, predict, and compute the task's metric (in percent)."""
    queries = zero_shot_queries(task.queries) if method == "zero_shot" else task.queries
    own = [q.demo_ids is not None and method not in DEMO_FREE_METHODS for q in queries]  # kNN: own D
    scores: dict[int, np.ndarray] = {}
    idx = [i for i, o in enumerate(own) if not o]
    if idx:  # one context (S_D distilled once, or D's KV cache) for every query with the shared D
        ctx = method_context(llm, method, module, task.demo_ids)
        for i, s in zip(idx, score_queries(llm, [queries[i] for i in idx], ctx, batch_size, use_cache)):
            scores[i] = s
    for i in (i for i, o in enumerate(own) if o):  # per-query demonstrations (kNN selection): one context each
        ctx = method_context(llm, method, module, queries[i].demo_ids)
        scores[i] = score_queries(llm, [queries[i]], ctx, batch_size, use_cache)[0]
    preds = predict([scores[i] for i in range(len(queries))])
    pred_str = [q.options[p].strip() for q, p in zip(queries, preds)]
    gold_str = [q.options[q.gold].strip() for q in queries]
    metric = "macro_f1" if task.task_type == "classification" else "accuracy"
    return {"task": task.task, "seed": task.seed, "split": task.split, "task_type": task.task_type, "metric": metric,
            "score": 100 * task_metric(pred_str, gold_str, task.task_type),
            "accuracy": 100 * accuracy(pred_str, gold_str), "n_queries": len(task.queries), "preds": preds}


def evaluate_tasks(llm, method: str, module, tasks: list, batch_size: int = 16, use_cache: bool = True,
                   log=print) -> list[dict]:
    """Evaluate `method` on every MetaTestTask (one per (task, seed), from data.load_meta_test).

    llm: the frozen LLM (model.GPT2 / model.T5); module: the mend.MEND / mend.PromptTuning for prompt_tuning,
    hypertuning and mend, None for zero_shot / icl. Returns one dict per task entry, in order, with keys task, seed,
    split, task_type, metric ("macro_f1" | "accuracy"), score (that metric, percent), accuracy (percent),
    n_queries, preds (option index per query). summarize_runs(...) turns them into per-task mean +- std and the
    average over tasks. Train and eval modes of llm and module are restored on return; log=None is silent."""
    module = getattr(module, "module", module)  # a DDP-wrapped module: its inner MEND / PromptTuning
    flags = [(m, m.training) for m in (llm, module) if m is not None]
    for m, _ in flags:
        m.eval()
    total = sum(len(t.queries) for t in tasks)
    done, t0, memo, results = 0, time.time(), {}, []
    try:
        for n, task in enumerate(tasks, 1):
            key = _query_key(task) if method in DEMO_FREE_METHODS else None
            if key is not None and key in memo:  # D is ignored: the same predictions for every seed
                r = {**memo[key], "seed": task.seed}
            else:
                r = evaluate_task(llm, method, module, task, batch_size, use_cache)
                if key is not None:
                    memo[key] = r
            results.append(r)
            done += len(task.queries)
            if log is not None:
                dt = time.time() - t0
                rate = done / max(dt, 1e-9)
                log(f"[eval {method}] {n}/{len(tasks)} {task.task} seed={task.seed} {r['metric']}={r['score']:.2f} "
                    f"| {done}/{total} queries, {rate:.1f} q/s, elapsed {_fmt_time(dt)}, "
                    f"ETA {_fmt_time((total - done) / max(rate, 1e-9))}")
    finally:
        for m, was_training in flags:
            m.train(was_training)
    return results


def summarize_runs(results: list[dict]) -> dict:
    """evaluate_tasks output -> {"tasks": {task: {"mean", "std", "seeds", "task_type", "metric"}}, "avg", "avg_std",
    "avg_seeds"} (see summarize)."""
    per_seed: dict[str, dict[int, float]] = {}
    for r in results:
        per_seed.setdefault(r["task"], {})[r["seed"]] = r["score"]
    summary = summarize(per_seed)
    for r in results:
        summary["tasks"][r["task"]].update(task_type=r["task_type"], metric=r["metric"])
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Output: the Table-2-shaped markdown table and the JSON with every number and the configuration.

def markdown_table(summaries: dict[str, dict], task_names: list[str]) -> str:
    """Rows = methods (in the order given), columns = tasks + AVG; cells mean+-std in percent (AVG: the mean over
    seeds of the task average +- its std over seeds, as Table 2)."""
    head = "| method | " + " | ".join(task_names) + " | AVG |"
    lines = [head, "|" + "---|" * (len(task_names) + 2)]
    for method, s in summaries.items():
        cells = []
        for t in task_names:
            r = s["tasks"].get(t)
            cells.append("-" if r is None else f"{r['mean']:.2f}±{r['std']:.2f}")
        avg = f"{s['avg']:.2f}±{s['avg_std']:.2f}"
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# CLI

@dataclass
class EvalConfig:
    llm: str = "gpt2-large"                 # hub id or local folder (GPT-2 or T5)
    data_dir: str = "data/metaicl"          # MetaICL layout: config/{split}.json, data/{task}/...
    split: str = "class_to_class"           # one of the seven settings (data.resolve_setting)
    methods: tuple = ()                     # () = every method that has what it needs
    mend: str = ""                          # checkpoint folders ('' = runs/finetune-{method}-{split}/best)
    hypertuning: str = ""
    prompt_tuning: str = ""
    seeds: int = 5                          # the first N of 100, 13, 21, 42, 87
    k: int = 16                             # demonstrations per task (Fig. 4a: 1, 2, 4, 8, 16)
    perturb: str = "none"                   # Table 3: none | no_label | no_input | random_label | wrong_label
    select: str = "random"                  # Table 3: random (the seed's 16 rows) | bm25 | dense
    template: str = "space"                 # Table 7: space | newline
    eval_split: str = "test"                # MetaICL file split of the queries (dev: validation)
    batch_size: int = 16                    # (query, option) rows per forward; results do not depend on it
    max_queries: int = 0                    # cap queries per task (0 = all), for smoke runs
    no_cache: bool = False                  # recompute the shared prefix for every row (slow; for checking)
    out: str = ""                           # run folder for eval.json ('' = runs/eval-{split})
    dtype: str = "fp32"                     # the frozen LLM's dtype: fp32 | bf16 | fp16
    device: str = ""                        # '' = cuda if available else cpu


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the same names as train.py


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="eval.py", description="MetaICL meta-test evaluation of zero-shot, ICL, "
                                "PromptTuning, HyperTuning and MEND (paper Table 2 and Sec. 5 analyses)")
    p.add_argument("--llm", default=d.llm)
    p.add_argument("--data_dir", default=d.data_dir)
    p.add_argument("--split", default=d.split, help="meta-train -> meta-test setting, e.g. class_to_class, HR_to_LR")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS) + ["all"],
                   help="default: all methods that have what they need (a missing checkpoint is reported as skipped)")
    for m in CHECKPOINT_METHODS:
        p.add_argument(f"--{m}", default="", metavar="DIR", help=f"checkpoint (default runs/finetune-{m}-SPLIT/best)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="use the first N of 100, 13, 21, 42, 87")
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--perturb", default=d.perturb,
                   choices=["none", "no_label", "no_input", "random_label", "wrong_label"])
    p.add_argument("--select", default=d.select, choices=["random", "bm25", "dense"])
    p.add_argument("--template", default=d.template, choices=["space", "newline"])
    p.add_argument("--eval_split", default=d.eval_split, choices=["test", "dev"])
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--max_queries", type=int, default=d.max_queries)
    p.add_argument("--no_cache", action="store_true")
    p.add_argument("--out", default=d.out)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--device", default=d.device)
    a = p.parse_args(argv)
    if not 1 <= a.seeds <= len(SEEDS):
        p.error(f"argument --seeds: expected an integer in 1..{len(SEEDS)}, got {a.seeds}")
    if a.k < 1:  # k above the rows of a train file is refused when the files are read (data.load_meta_test)
        p.error(f"argument --k: expected an integer >= 1, got {a.k}")
    if a.batch_size < 1:
        p.error(f"argument --batch_size: expected an integer >= 1, got {a.batch_size}")
    if a.max_queries < 0:
        p.error(f"argument --max_queries: expected an integer >= 0 (0 = all), got {a.max_queries}")
    methods = tuple(METHODS) if a.methods is None or "all" in a.methods else tuple(m for m in METHODS if m in a.methods)
    return EvalConfig(llm=a.llm, data_dir=a.data_dir, split=a.split, methods=methods, mend=a.mend,
                      hypertuning=a.hypertuning, prompt_tuning=a.prompt_tuning, seeds=a.seeds, k=a.k,
                      perturb=a.perturb, select=a.select, template=a.template, eval_split=a.eval_split,
                      batch_size=a.batch_size, max_queries=a.max_queries, no_cache=a.no_cache, out=a.out,
                      dtype=a.dtype, device=a.device)


def checkpoint_dir(cfg: EvalConfig, method: str, setting: str) -> Path:
    """--{method} or train.py's default run folder; its .best.old when a crash hit mid-save (mend.saved_dir)."""
    return mend.saved_dir(getattr(cfg, method) or f"runs/finetune-{method}-{setting}/best")


def load_module(method: str, path: Path, llm_name: str, dtype=torch.float32, device="cpu", d_llm=None):
    """The checkpoint of a method: mend.PromptTuning for prompt_tuning, mend.MEND for hypertuning and mend (both
    saved by their .save(dir)); mend.py refuses a checkpoint trained for another LLM, and so does a width that is
    not the LLM's (d_llm: the LLM's hidden size, when known)."""
    module = mend.load(str(path), llm_name=llm_name, dtype=dtype, device=device)
    want = mend.PromptTuning if method == "prompt_tuning" else mend.MEND
    if not isinstance(module, want):
        raise ValueError(f"eval.py: --{method} {path}: expected a {want.__name__} checkpoint, "
                         f"got a {type(module).__name__} one")
    if d_llm is not None and module.d_llm != d_llm:
        raise ValueError(f"eval.py: --{method} {path} produces vectors of width {module.d_llm}: expected the "
                         f"width of --llm {llm_name!r} ({d_llm})")
    return module


def dense_embed_fn(llm, batch_size: int = 16):
    """Dense-kNN selection (Table 3): mean-pooled last hidden states of the LLM itself (decoder states for GPT-2,
    encoder states for T5)."""
    device = next(llm.parameters()).device

    @torch.no_grad()
    def embed(seqs: list[list[int]]) -> np.ndarray:
        out = []
        for i in range(0, len(seqs), batch_size):
            chunk = [s or [0] for s in seqs[i:i + batch_size]]
            T = max(len(s) for s in chunk)
            ids = torch.tensor([s + [0] * (T - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in chunk], device=device)
            h = llm.encode(input_ids=ids, attention_mask=mask) if llm.is_encoder_decoder else \
                llm(input_ids=ids, attention_mask=mask).hidden_states  # (B, T, d)
            m = mask.unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
        return np.concatenate(out, 0)

    return embed


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    setting = data.resolve_setting(cfg.split, cfg.data_dir)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.dtype]
    seeds = SEEDS[:cfg.seeds]
    out_dir = Path(cfg.out or f"runs/eval-{setting}")
    print(f"[eval] llm={cfg.llm} split={setting} eval_split={cfg.eval_split} seeds={list(seeds)} k={cfg.k} "
          f"perturb={cfg.perturb} select={cfg.select} template={cfg.template} device={device} dtype={cfg.dtype}")

    # Methods and their checkpoints: a missing checkpoint skips the method, with the reason.
    skipped: dict[str, str] = {}
    modules: dict[str, object] = {}
    for m in cfg.methods:
        if m in CHECKPOINT_METHODS:
            path = checkpoint_dir(cfg, m, setting)
            if not (path / "config.json").is_file():
                skipped[m] = f"no checkpoint at {path} (set --{m} DIR; train with train.py)"
                continue
            modules[m] = path
    run = [m for m in cfg.methods if m not in skipped]
    for m, why in skipped.items():
        print(f"[eval] skipping {m}: {why}")

    model.use_shape_agnostic_attention(device)  # every task and query batch has its own length
    llm = model.from_pretrained(cfg.llm, dtype=dtype, device=device).eval()
    tokenizer = model.load_tokenizer(cfg.llm)
    for m in list(modules):
        modules[m] = load_module(m, modules[m], cfg.llm, torch.float32, device, d_llm=llm.hidden_size).eval()
        print(f"[eval] {m}: loaded {checkpoint_dir(cfg, m, setting)}")

    t0 = time.time()
    tasks, missing = data.load_meta_test(
        cfg.data_dir, setting, tokenizer, seeds=seeds, split=cfg.eval_split, k=cfg.k, template=cfg.template,
        perturb=cfg.perturb, select=cfg.select, embed_fn=dense_embed_fn(llm) if cfg.select == "dense" else None,
        max_queries=cfg.max_queries or None)
    task_names = list(dict.fromkeys(t.task for t in tasks))
    print(f"[eval] {len(task_names)} tasks x {len(seeds)} seeds loaded in {time.time() - t0:.1f}s"
          + (f"; missing (no file in {cfg.data_dir}): {', '.join(missing)}" if missing else ""))
    if not tasks:
        raise SystemExit(f"eval.py: no meta-test task of {setting!r} has files under {cfg.data_dir} "
                         f"(missing: {', '.join(missing)})")

    summaries, per_method = {}, {}
    for m in run:
        res = evaluate_tasks(llm, m, modules.get(m), tasks, cfg.batch_size, use_cache=not cfg.no_cache)
        summaries[m] = summarize_runs(res)
        per_method[m] = res
        print(f"[eval] {m}: AVG {summaries[m]['avg']:.2f}±{summaries[m]['avg_std']:.2f} over {len(task_names)} "
              f"tasks")

    table = markdown_table(summaries, task_names)
    print(f"\n{setting} ({cfg.llm}; mean±std over {len(seeds)} seeds, percent; macro-F1 for classification, "
          f"accuracy otherwise)\n")
    print(table)
    if missing:
        print(f"\nmissing tasks (named by {setting}, no file): {', '.join(missing)}")
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")

    result = {"config": {**asdict(cfg), "methods": list(cfg.methods), "setting": setting, "seeds_used": list(seeds),
                         "device": device, "argv": sys.argv if argv is None else list(argv)},
              "tasks": task_names, "missing_tasks": list(missing), "skipped": skipped,
              "methods": {m: {"label": METHOD_LABELS[m], "avg": summaries[m]["avg"],
                              "avg_std": summaries[m]["avg_std"], "avg_seeds": summaries[m]["avg_seeds"],
                              "tasks": summaries[m]["tasks"], "runs": per_method[m]} for m in run},
              "table": table}
    write_json(out_dir / "eval.json", result)
    print(f"\n[eval] wrote {out_dir / 'eval.json'} ({_fmt_time(time.time() - t0)})")
    return result


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError, FileNotFoundError) as e:  # one clear line, exit code 2
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
