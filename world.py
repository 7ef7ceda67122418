"""world.py: an offline "tiny world" in which the whole MEND pipeline runs end to end on a CPU in minutes.

It holds, top to bottom:
  1. the world generator (generate_world): a made-up vocabulary of items (grouped in categories), filler words and
     label words; in-context-learning tasks whose hidden rule maps the category of the input's last word to one of
     the task's own label words; disjoint meta-train and meta-test task families; all of it written in the real
     formats: a C4-like corpus DIR/c4/*.json.gz and a MetaICL folder DIR/metaicl/{data,config}.
  2. the tiny LLM (train_tokenizer, pretrain_lm): a byte-level BPE trained with `tokenizers` on the corpus and a
     small GPT-2 (or T5) trained from scratch with a plain PyTorch loop on model.py's build_model, saved with
     model.save_pretrained so model.from_pretrained loads it back like a hub model.
  3. quick_icl_check: a small, self-contained scorer (log-likelihood of each option, MetaICL protocol) that shows
     vanilla ICL beating zero-shot on the meta-test tasks before eval.py takes over.
  4. main(): `python world.py --out DIR` runs the phases above (later phases: train.py / eval.py / bench.py).

Connections: imports model.py only (lazily, for the LM phases); data.py reads what generate_world writes.
Everything is deterministic by --seed (string-seeded random.Random per file, gzip mtime 0, torch.manual_seed).
"""
import argparse
import gzip
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SETTING = "tiny_world"
SEEDS = (100, 13, 21, 42, 87)


# ----------------------------------------------------------------------------------------------------------------
# 1. The world generator

@dataclass
class WorldConfig:
    seed: int = 0
    n_categories: int = 32          # item categories; the first half belongs to meta-train, the second to meta-test
    items_per_category: int = 2     # item words per category (a query item may be unseen in D: its category is not)
    n_fillers: int = 64             # filler words (the noise around the deciding word)
    n_label_words: int = 48         # label words; first half meta-train, second half meta-test
    fillers_per_input: tuple = (6, 10)   # inclusive range of filler words before the deciding item
    labels_per_task: tuple = (2, 4)      # inclusive range of options per task
    extra_categories: tuple = (0, 2)     # categories per task = n_labels + this (a surjective category->label map)
    n_train_tasks: int = 32
    n_test_tasks: int = 8
    k: int = 16                     # demonstrations per k-shot file
    n_test_queries: int = 64        # rows of each meta-test task's test file
    pool_size: int = 1024           # rows of each meta-train task's {task}_16384_100_train.jsonl pool
    n_passages: int = 16000         # corpus passages (each: the demonstrations of one fresh random task)
    demos_per_passage: tuple = (16, 28)
    n_shards: int = 2

    @classmethod
    def quick(cls, seed: int = 0) -> "WorldConfig":
        """The CI-sized world: fewer tasks, queries and passages."""
        return cls(seed=seed, n_train_tasks=16, n_test_tasks=6, n_test_queries=32, pool_size=256, n_passages=6000)


@dataclass
class Task:
    name: str
    labels: list                    # the task's own label words (its options)
    cat_to_label: dict              # hidden rule: category index -> label word


def _rng(cfg: WorldConfig, *parts) -> random.Random:
    """A deterministic random stream for one purpose (string seeds hash with sha512: stable across runs)."""
    return random.Random("world|" + "|".join(str(p) for p in (cfg.seed,) + parts))


def make_lexicon(cfg: WorldConfig) -> dict:
    """Made-up words: {"items": [[w, ...] per category], "fillers": [...], "labels": [...]}, all distinct."""
    rng = _rng(cfg, "lexicon")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    n_words = cfg.n_categories * cfg.items_per_category + cfg.n_fillers + cfg.n_label_words
    words, seen = [], set()
    while len(words) < n_words:
        n_syl = rng.choice((2, 2, 3))
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n_syl))
        if w not in seen:
            seen.add(w)
            words.append(w)
    n_items = cfg.n_categories * cfg.items_per_category
    items = [words[i:i + cfg.items_per_category] for i in range(0, n_items, cfg.items_per_category)]
    return {"items": items, "fillers": words[n_items:n_items + cfg.n_fillers], "labels": words[n_items + cfg.n_fillers:]}


def random_task(rng: random.Random, name: str, categories: list, label_pool: list, cfg: WorldConfig) -> Task:
    """A task: n label words from label_pool and a random surjection from some categories onto them."""
    n_labels = rng.randint(*cfg.labels_per_task)
    n_cats = min(len(categories), n_labels + rng.randint(*cfg.extra_categories))
    labels = rng.sample(label_pool, n_labels)
    cats = rng.sample(categories, n_cats)
    targets = labels + [rng.choice(labels) for _ in range(n_cats - n_labels)]  # every label used at least once
    rng.shuffle(targets)
    return Task(name, labels, dict(zip(cats, targets)))


def sample_example(rng: random.Random, task: Task, lex: dict, cfg: WorldConfig) -> tuple:
    """(input, output): label uniform over the task's labels (balanced, so zero-shot sits at chance), then a
    category mapped to it, an item of that category last, random fillers before it."""
    label = rng.choice(task.labels)
    cat = rng.choice([c for c, y in task.cat_to_label.items() if y == label])
    fillers = [rng.choice(lex["fillers"]) for _ in range(rng.randint(*cfg.fillers_per_input))]
    return " ".join(fillers + [rng.choice(lex["items"][cat])]), label


def make_tasks(cfg: WorldConfig, lex: dict) -> tuple:
    """Disjoint families: meta-train tasks use the first half of the categories and label words, meta-test the
    second half; so no meta-test rule, label word or deciding word is ever seen in meta-training."""
    half_c, half_l = cfg.n_categories // 2, cfg.n_label_words // 2
    train_cats, test_cats = list(range(half_c)), list(range(half_c, cfg.n_categories))
    train_labels, test_labels = lex["labels"][:half_l], lex["labels"][half_l:]
    rng = _rng(cfg, "tasks")
    train = [random_task(rng, f"world_train_{i:02d}", train_cats, train_labels, cfg) for i in range(cfg.n_train_tasks)]
    test = [random_task(rng, f"world_test_{i:02d}", test_cats, test_labels, cfg) for i in range(cfg.n_test_tasks)]
    return train, test


def make_passage(rng: random.Random, lex: dict, cfg: WorldConfig) -> str:
    """One corpus passage: the demonstrations of a fresh random task over the whole world, in MetaICL's space
    format ("x1 y1 x2 y2 ..."), so an LM trained on the corpus must learn the rule in context (the mapping is new
    in every passage) and the 80/20 split of MEND's stage 1 leaves a continuation that D determines."""
    task = random_task(rng, "passage", list(range(cfg.n_categories)), lex["labels"], cfg)
    pieces = []
    for _ in range(rng.randint(*cfg.demos_per_passage)):
        pieces.extend(sample_example(rng, task, lex, cfg))
    return " ".join(pieces)


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> None:
    """Atomic, byte-deterministic write (gzip mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(tmp, "wb") as f:
        if gz:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
                g.write(data)
        else:
            f.write(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def generate_world(out, cfg: WorldConfig) -> dict:
    """Write DIR/c4/*.json.gz, DIR/metaicl/{data,config} and DIR/world.json; return a summary dict."""
    out = Path(out)
    lex = make_lexicon(cfg)
    train_tasks, test_tasks = make_tasks(cfg, lex)
    meta = out / "metaicl"
    for task in train_tasks + test_tasks:
        rows = lambda rng, n: [dict(task=task.name, input=x, output=y, options=task.labels)
                               for x, y in (sample_example(rng, task, lex, cfg) for _ in range(n))]
        for seed in SEEDS:
            for split in ("train", "dev"):
                _write_jsonl(meta / "data" / task.name / f"{task.name}_{cfg.k}_{seed}_{split}.jsonl",
                             rows(_rng(cfg, task.name, seed, split), cfg.k))
        if task in test_tasks:  # as in MetaICL: one test file (under seed 100), the seed only picks D
            _write_jsonl(meta / "data" / task.name / f"{task.name}_{cfg.k}_100_test.jsonl",
                         rows(_rng(cfg, task.name, "test"), cfg.n_test_queries))
        else:  # the meta-train pool (MetaICL's {task}_16384_100_train.jsonl holds "up to" 16384 rows)
            _write_jsonl(meta / "data" / task.name / f"{task.name}_16384_100_train.jsonl",
                         rows(_rng(cfg, task.name, "pool"), cfg.pool_size))
        _write_json(meta / "config" / "tasks" / f"{task.name}.json",
                    {"task_type": "classification", "options": task.labels})
    _write_json(meta / "config" / f"{SETTING}.json",
                {"train": [t.name for t in train_tasks], "test": [t.name for t in test_tasks]})
    per_shard = math.ceil(cfg.n_passages / cfg.n_shards)
    for s in range(cfg.n_shards):
        rng = _rng(cfg, "c4", s)
        n = min(per_shard, cfg.n_passages - s * per_shard)
        rows = [dict(text=make_passage(rng, lex, cfg), timestamp="2019-04-25T12:57:54Z",
                     url=f"https://tiny.world/{s}/{i}") for i in range(n)]
        _write_jsonl(out / "c4" / f"c4-train.{s:05d}-of-{cfg.n_shards:05d}.json.gz", rows, gz=True)
    summary = dict(config=asdict(cfg), setting=SETTING, train_tasks=[t.name for t in train_tasks],
                   test_tasks=[t.name for t in test_tasks],
                   chance=100.0 * sum(1 / len(t.labels) for t in test_tasks) / len(test_tasks),
                   lexicon=lex, rules={t.name: {str(c): y for c, y in t.cat_to_label.items()}
                                       for t in train_tasks + test_tasks})
    _write_json(out / "world.json", summary)
    return summary


def corpus_texts(world_dir) -> list:
    """All passages of DIR/c4/*.json.gz, in shard order."""
    files = sorted(Path(world_dir, "c4").glob("*.json.gz"))
    if not files:
        raise FileNotFoundError(f"world.py: no corpus shards under {Path(world_dir, 'c4')} (run generate_world first)")
    texts = []
    for f in files:
        with gzip.open(f, "rt") as g:
            texts.extend(json.loads(line)["text"] for line in g)
    return texts


# ----------------------------------------------------------------------------------------------------------------
# 2. The tiny LLM: tokenizer and from-scratch pretraining

def train_tokenizer(texts: list, vocab_size: int = 768):
    """A byte-level BPE (GPT-2 style, full byte alphabet so any text encodes) with <pad>=0 and <eos>=1; with
    vocab 768 every made-up word, with and without its leading space, becomes a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclass
class LMConfig:
    family: str = "gpt2"          # gpt2 | t5
    n_embd: int = 128             # d (d_model for T5)
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 512        # GPT-2 learned positions; the loop trains positions < seq_len
    seq_len: int = 320            # passages are cut here (corpus passages are ~150-330 tokens)
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2


def lm_model_config(cfg: LMConfig, vocab_size: int) -> dict:
    """The config.json of the tiny LM, in Hugging Face keys (model.build_model reads it)."""
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size,
                    n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=4 * cfg.n_embd, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if cfg.family == "t5":
        return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=vocab_size,
                    d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head, d_ff=2 * cfg.n_embd, num_layers=cfg.n_layer,
                    num_decoder_layers=cfg.n_layer, num_heads=cfg.n_head, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                    dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    raise ValueError(f"world.py: --family must be gpt2 or t5, got {cfg.family!r}")


def _pad(rows: list, pad_id: int = 0):
    """Right-pad lists of ids -> (ids (B,T) long, mask (B,T) long)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def lm_loss(lm, ids, mask, family: str, rng: random.Random = None):
    """Next-token cross-entropy on real tokens. GPT-2: plain causal LM over the passage. T5 (span-free LM
    objective): the encoder reads the first part of each passage (split uniformly in [20%, 80%]), the decoder
    predicts the rest."""
    import torch
    import torch.nn.functional as F

    if family == "gpt2":
        logits = lm(input_ids=ids, attention_mask=mask).logits              # (B, T, V)
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)
    enc, dec = [], []
    for row, m in zip(ids.tolist(), mask.sum(1).tolist()):
        cut = int(m * (0.2 + 0.6 * rng.random())) if rng else int(0.8 * m)
        enc.append(row[:cut])
        dec.append(row[cut:m] + [1])                                            # ... <eos>
    enc_ids, enc_mask = _pad(enc)
    labels, dec_mask = _pad(dec)
    logits = lm(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=lm.shift_right(labels),
                decoder_attention_mask=dec_mask).logits                       # (B, Ty, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.masked_fill(dec_mask == 0, -100).reshape(-1),
                           ignore_index=-100)


def pretrain_lm(world_dir, out_dir, cfg: LMConfig, tokenizer=None, log=print):
    """Train a tiny GPT-2 / T5 from scratch on the world's corpus; save it (+ tokenizer.json) in out_dir.
    Returns {"seconds", "final_loss", "steps"}."""
    import torch

    import model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"pretrain|{cfg.seed}")
    texts = corpus_texts(world_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts)
    rows = [e.ids[:cfg.seq_len] for e in tokenizer.encode_batch(texts)]
    lm = model.build_model(lm_model_config(cfg, tokenizer.get_vocab_size()))
    lm.train()
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    t0, ema, n_tok = time.time(), None, 0
    order = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        ids, mask = _pad(batch)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * sched(step)
        loss = lm_loss(lm, ids, mask, cfg.family, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        n_tok += int(mask.sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0 or step == cfg.steps - 1:
            el = time.time() - t0
            log(f"pretrain {cfg.family} step {step + 1}/{cfg.steps} loss {ema:.3f} lr {cfg.lr * sched(step):.2e} "
                f"{n_tok / el:.0f} tok/s ETA {el / (step + 1) * (cfg.steps - step - 1):.0f}s")
    lm.eval()
    model.save_pretrained(lm, out_dir, tokenizer=tokenizer)
    return {"seconds": time.time() - t0, "final_loss": ema, "steps": cfg.steps}


# ----------------------------------------------------------------------------------------------------------------
# 3. A quick ICL check (MetaICL protocol: the option with the highest total log-likelihood wins)

def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def score_options(lm, tokenizer, contexts: list, options: list, batch_size: int = 64) -> list:
    """Sum of log p(option tokens | context) for each (context, option) pair (context non-empty).
    GPT-2: one causal sequence [context; " option"]; T5: encoder = context, decoder = option."""
    import torch

    scores = []
    for b in range(0, len(contexts), batch_size):
        ctx_ids = [tokenizer.encode(c).ids if c else [] for c in contexts[b:b + batch_size]]
        opt_ids = [tokenizer.encode(" " + o).ids for o in options[b:b + batch_size]]
        with torch.no_grad():
            if getattr(lm, "is_encoder_decoder", False):
                enc_ids, enc_mask = _pad([c if c else [1] for c in ctx_ids])
                labels, dec_mask = _pad(opt_ids)
                logits = lm(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=lm.shift_right(labels),
                            decoder_attention_mask=dec_mask).logits.log_softmax(-1)     # (B, Ty, V)
                tok = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * dec_mask
                scores += tok.sum(1).tolist()
            else:
                ids, mask = _pad([c + o for c, o in zip(ctx_ids, opt_ids)])            # no BOS, as in pretraining
                logp = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
                tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)            # (B, T-1): predicts ids[:, 1:]
                for i, (c, o) in enumerate(zip(ctx_ids, opt_ids)):
                    scores.append(tok[i, len(c) - 1:len(c) - 1 + len(o)].sum().item())
    return scores


def quick_icl_check(model_dir, world_dir, seeds=SEEDS, max_queries: int = None, log=print) -> dict:
    """Zero-shot vs vanilla ICL accuracy (percent, averaged over meta-test tasks and seeds) of the LM in
    model_dir on the world's meta-test tasks, with D = the seed's k=16 train file in file order (space format)."""
    import torch

    import model

    lm = model.from_pretrained(model_dir).eval()
    tokenizer = model.load_tokenizer(model_dir)
    meta = Path(world_dir, "metaicl")
    test_tasks = json.loads((meta / "config" / f"{SETTING}.json").read_text())["test"]
    acc = {"zero_shot": [], "icl": []}
    chance = []
    t0 = time.time()
    for task in test_tasks:
        queries = read_jsonl(meta / "data" / task / f"{task}_16_100_test.jsonl")[:max_queries]
        opts = queries[0]["options"]
        chance.append(100.0 / len(opts))
        for i, seed in enumerate(seeds):
            demos = read_jsonl(meta / "data" / task / f"{task}_16_{seed}_train.jsonl")
            D = " ".join(f"{d['input']} {d['output']}" for d in demos)
            for method, prefix in (("zero_shot", " "), ("icl", D + " ")):   # the query is " x", as in data.py
                if method == "zero_shot" and i > 0:   # zero-shot does not depend on the seed
                    acc[method].append(acc[method][-1])
                    continue
                ctx = [prefix + q["input"] for q in queries for _ in opts]
                s = torch.tensor(score_options(lm, tokenizer, ctx, [o for _ in queries for o in opts]))
                pred = s.view(len(queries), len(opts)).argmax(1).tolist()
                acc[method].append(100.0 * sum(opts[p] == q["output"] for p, q in zip(pred, queries)) / len(queries))
    res = {m: sum(v) / len(v) for m, v in acc.items()}
    res["chance"] = sum(chance) / len(chance)
    res["seconds"] = time.time() - t0
    log(f"quick_icl_check: zero-shot {res['zero_shot']:.1f}%  ICL {res['icl']:.1f}%  chance {res['chance']:.1f}% "
        f"({len(test_tasks)} tasks x {len(seeds)} seeds, {res['seconds']:.0f}s)")
    return res


# ----------------------------------------------------------------------------------------------------------------
# 4. The command line (phase 1: world + tiny LLM + distiller + quick ICL check; train/eval/bench come next)

QUICK_LM = dict(steps=3000, batch_size=8)          # the CI-sized LM run (tests/test_world.py)
FULL_LM = dict(steps=3000, batch_size=16)          # the quick start's LLM
DISTILLER_LM = dict(n_embd=64, n_head=2, steps=1500, batch_size=16)   # the smaller distiller (same family)


def main(argv=None):
    ap = argparse.ArgumentParser(description="The offline tiny world: generate tasks, train a tiny LLM from scratch.")
    ap.add_argument("--out", required=True, help="output folder (world, models, results)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=("gpt2", "t5"), default="gpt2")
    ap.add_argument("--quick", action="store_true", help="the CI-sized world and LM run")
    ap.add_argument("--steps", type=int, default=None, help="LLM pretraining steps (default: 3000)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    wcfg = WorldConfig.quick(args.seed) if args.quick else WorldConfig(seed=args.seed)
    summary = generate_world(out / "world", wcfg)
    print(f"[world] {len(summary['train_tasks'])} meta-train / {len(summary['test_tasks'])} meta-test tasks, "
          f"{wcfg.n_passages} passages, chance {summary['chance']:.1f}% ({time.time() - t0:.0f}s)")
    tokenizer = train_tokenizer(corpus_texts(out / "world"))
    llm = dict(QUICK_LM if args.quick else FULL_LM, family=args.family, seed=args.seed, threads=args.threads)
    if args.steps:
        llm["steps"] = args.steps
    r = pretrain_lm(out / "world", out / "llm", LMConfig(**llm), tokenizer=tokenizer)
    print(f"[llm] {args.family} pretrained in {r['seconds']:.0f}s, loss {r['final_loss']:.3f}")
    dist = dict(DISTILLER_LM, family=args.family, seed=args.seed, threads=args.threads)
    r = pretrain_lm(out / "world", out / "distiller", LMConfig(**dist), tokenizer=tokenizer)
    print(f"[distiller] {args.family} d={dist['n_embd']} pretrained in {r['seconds']:.0f}s, loss {r['final_loss']:.3f}")
    acc = quick_icl_check(out / "llm", out / "world")
    _write_json(out / "results.json", {"methods": {"zero_shot": acc["zero_shot"], "icl": acc["icl"]},
                                       "chance": acc["chance"], "seconds": time.time() - t0})
    print(f"[done] {time.time() - t0:.0f}s, results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
