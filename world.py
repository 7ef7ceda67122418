"""world.py: an offline "tiny world" in which the whole MEND pipeline runs end to end on a CPU in minutes.

It holds, top to bottom:
  1. the world generator (generate_world): a made-up vocabulary of item words (4 shared keys by default), label
     words and filler words (1-3 before each item by default: D with redundancy, as real demonstrations have; none in
     the plain world, WorldConfig.plain; item categories available, off); in-context-learning tasks whose
     hidden rule maps the input's item (its last word, or a fixed phrase: WorldConfig.item_words) to one of the
     task's own label words; every k-shot file's demonstrations cover all the items of its task, so in-context
     learning is plain induction (find the query's item in D, copy the label that followed it); meta-train and
     meta-test families with disjoint label words; all of it written in the real formats: a C4-like corpus
     DIR/c4/*.json.gz and a MetaICL folder DIR/metaicl/{data,config}.
  2. the tiny LLM (train_tokenizer, pretrain_lm): a byte-level BPE trained with `tokenizers` on the corpus and a
     small GPT-2 (or T5, OPT, Llama-style) trained with a plain PyTorch loop on model.py's build_model, on a stream
     of fresh passages of the corpus's generator, saved with model.save_pretrained so model.from_pretrained loads
     it back like a hub model. The default GPT-2 starts with an induction circuit set by hand (induction_init; since
     stop 35), the others from transformers' random init (--llm_init random: GPT-2 too); it ends once an in-context
     probe shows it has learned in context (or starts over with another seed when it has not by step 2,000);
     llm_record / reuse_llm take an earlier run's LLM instead (world.py --llm_from). The distiller starts as a copy
     of it with two more, identity-initialized blocks on top (deepen; RunConfig: or a separate LM of the family
     trained the same way).
  3. quick_icl_check: a small, self-contained scorer (log-likelihood of each option, MetaICL protocol), used to
     probe ICL during LM pretraining (eval.py does the real evaluation).
  4. run_pipeline / main(): `python world.py --out DIR` runs everything: world -> tokenizer -> LLM + distiller ->
     train.py stage 1 (distill, as a short-to-long curriculum over passage length, the first warm-up phase tried
     with one seed (--plain: three, the lowest L_distill kept), plus a fallback when every try stays stuck; clm
     for HyperTuning, optionally through the same curriculum) ->
     stage 2 (finetune; pred for HyperTuning; PromptTuning; the rows of the paper's Table 4) -> eval.py (5
     methods, Table 4, K sweep) -> bench.py -> DIR/results.json; on the CPU by default, on a GPU with --device cuda.

Connections: imports model.py (LM phases), and train.py, eval.py, data.py, bench.py in run_pipeline; data.py reads
what generate_world writes. The world is byte-deterministic by --seed (string-seeded random.Random per file, gzip
mtime 0) and every training run is seeded (torch.manual_seed, train.py --seed): on one machine and thread count a
run repeats bit for bit. Stage 1 lands very differently from one train.py seed to another, hence the restarts
(README, the tiny world, "Where a run lands").
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
FAMILIES = ("gpt2", "t5", "opt", "llama")   # --family: the LM family of both the tiny LLM and its distiller
LLM_INITS = ("induction", "random")         # --llm_init: how the tiny LLM's weights start (LMConfig.init)


# ----------------------------------------------------------------------------------------------------------------
# 1. The world generator

@dataclass
class WorldConfig:
    seed: int = 0
    n_items: int = 4                # items (the keys: x's deciding word or phrase)
    # inclusive range of words per item: item i of the lexicon is a fixed phrase of lo + i % (hi - lo + 1) words
    # (every word but the first follows from the one before it; the label follows the phrase's last word)
    item_words: tuple = (1, 1)
    shared_items: bool = True       # both families use every item (label words stay disjoint); False: first half
                                    # of the items for meta-train tasks, second half for meta-test tasks
    n_categories: int = 0           # > 0: the label is decided by a hidden item category (index mod n); 0: by a
                                    # random item -> label map per task
    n_fillers: int = 96             # filler words (noise before the deciding item), not repeated inside a passage
    n_label_words: int = 48         # label words; first half meta-train, second half meta-test
    # inclusive range of filler words before the deciding item. Default 1-3: demonstrations with redundancy, as real
    # ones have (|D| ~ 64 tokens for 4 distinct keys and at most 4 labels), so l = 7 <= |D|/8 vectors can hold every
    # pair (README, "Stop 29"); plain() has none (|D| = 32, every token a key or a label: stops 13-28's world)
    fillers_per_input: tuple = (1, 3)
    labels_per_task: tuple = (2, 4)      # inclusive range of options per task
    extra_items: tuple = (0, 2)          # items per task = n_labels + this (a surjective item->label map, 2-6 items)
    n_train_tasks: int = 32
    n_test_tasks: int = 48          # many held-out tasks: a task has 2-4 items, so one task's zero-shot accuracy is
                                    # a handful of coin flips (0/50/100% for 2 items); 8 tasks left it 9-14 points
                                    # off chance by luck, 48 average that out
    k: int = 16                     # demonstrations per k-shot file (they cover every item of the task); 16 only:
                                    # MetaICL's file names, data.py's meta-test files and the K sweep read _16_
    n_test_queries: int = 32        # rows of each meta-test task's test file
    pool_size: int = 1024           # rows of each meta-train task's {task}_16384_100_train.jsonl pool
    n_passages: int = 16000         # corpus passages (each: the demonstrations of one fresh random task)
    demos_per_passage: tuple = (12, 24)
    repeat_passages: float = 0.0    # fraction of corpus passages that are a random word sequence written twice
    n_shards: int = 2

    def __post_init__(self):
        if not 1 <= self.item_words[0] <= self.item_words[1]:
            raise ValueError(f"world.py: WorldConfig.item_words={tuple(self.item_words)}: expected (lo, hi) with "
                             "1 <= lo <= hi")
        if self.k != 16:
            raise ValueError(f"world.py: WorldConfig.k={self.k}: expected 16 (the MetaICL k=16 files every reader "
                             "opens; use eval.py --k for fewer demonstrations)")

    @classmethod
    def plain(cls, seed: int = 0) -> "WorldConfig":
        """The plain world (world.py --plain): no filler words, every token of D a key or a label."""
        return cls(seed=seed, fillers_per_input=(0, 0))

    @classmethod
    def quick(cls, seed: int = 0) -> "WorldConfig":
        """The CI-sized world: the plain one with fewer tasks, queries and passages (its tiny LLM learns in context
        within 2,000 steps; with fillers that takes 1,750 to over 3,000)."""
        return cls(seed=seed, fillers_per_input=(0, 0), n_train_tasks=16, n_test_tasks=24, n_test_queries=16,
                   pool_size=256, n_passages=8000)


@dataclass
class Task:
    name: str
    labels: list                    # the task's own label words (its options)
    item_to_label: dict             # hidden rule: item word -> label word


def _rng(cfg: WorldConfig, *parts) -> random.Random:
    """A deterministic random stream for one purpose (string seeds hash with sha512: stable across runs)."""
    return random.Random("world|" + "|".join(str(p) for p in (cfg.seed,) + parts))


def make_lexicon(cfg: WorldConfig) -> dict:
    """Made-up words: {"items": [...], "fillers": [...], "labels": [...]}, all distinct 2-syllable words (one BPE
    token each; an item is a phrase of one or more of them, WorldConfig.item_words)."""
    rng = _rng(cfg, "lexicon")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    seen = set()

    def words(n, n_syl):
        out = []
        while len(out) < n:
            w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n_syl))
            if w not in seen:
                seen.add(w)
                out.append(w)
        return out

    lo, hi = cfg.item_words
    lens = [lo + i % (hi - lo + 1) for i in range(cfg.n_items)]
    parts = iter(words(sum(lens), 2))                  # one word stream, grouped into phrases ((1, 1): one word each)
    items = [" ".join(next(parts) for _ in range(n)) for n in lens]
    return {"items": items, "labels": words(cfg.n_label_words, 2),
            "fillers": words(cfg.n_fillers, 2)}


def category(lex: dict, item: str, cfg: WorldConfig) -> int:
    """The hidden attribute of an item word: its lexicon index mod n_categories (-1 when categories are off)."""
    return lex["items"].index(item) % cfg.n_categories if cfg.n_categories else -1


def random_task(rng: random.Random, name: str, items: list, label_pool: list, cfg: WorldConfig, lex: dict) -> Task:
    """A task: n label words from label_pool and a map from n + extra_items of `items` onto them (every label
    used). Default: a random surjection. With categories (n_categories > 0) the rule is "the item's category
    decides": n categories get one label word each and the task's items are 1+ items of each of them."""
    n_labels = rng.randint(*cfg.labels_per_task)
    n_items = min(len(items), n_labels + rng.randint(*cfg.extra_items))
    labels = rng.sample(label_pool, n_labels)
    if not cfg.n_categories:
        chosen = rng.sample(items, n_items)
        targets = labels + [rng.choice(labels) for _ in range(n_items - n_labels)]  # every label used at least once
        rng.shuffle(targets)
        return Task(name, labels, dict(zip(chosen, targets)))
    if n_labels > cfg.n_categories:
        raise ValueError(f"world.py: labels_per_task up to {n_labels} needs n_categories >= {n_labels}, "
                         f"got {cfg.n_categories}")
    cats = rng.sample(range(cfg.n_categories), n_labels)
    by_cat = {c: [it for it in items if category(lex, it, cfg) == c] for c in cats}
    counts = {c: 1 for c in cats}
    for _ in range(n_items - n_labels):
        counts[rng.choice(cats)] += 1
    rule = {}
    for c, lab in zip(cats, labels):
        for it in rng.sample(by_cat[c], min(counts[c], len(by_cat[c]))):
            rule[it] = lab
    return Task(name, labels, dict(sorted(rule.items(), key=lambda kv: rng.random())))


def sample_examples(rng: random.Random, task: Task, lex: dict, cfg: WorldConfig, n: int, cover: bool) -> list:
    """n (input, output) pairs. input = fillers_per_input fillers + the deciding item (last word(s)); output = its
    label. Labels are uniform over the task's labels (balanced, so zero-shot sits at chance). cover=True: every item of
    the task occurs at least once (the k demonstrations of a file; needs n >= #items), in shuffled order.
    Fillers are drawn without repetition inside the returned list when the pool allows it (passages, k-shot and
    test files: copying what followed an earlier occurrence of a word is then right for every repeated word),
    with repetition for the long meta-train pools. Without fillers (WorldConfig.plain) a pool repeats each (item,
    label) row many times, as MetaICL pools may; data.py samples {task}_16384_100_train.jsonl as written, so
    stage-2 episodes show the query's item in D."""
    items = list(task.item_to_label)
    chosen = list(items) if cover else []
    if cover and n < len(items):
        raise ValueError(f"world.py: cannot cover {len(items)} items with {n} demonstrations")
    while len(chosen) < n:
        label = rng.choice(task.labels)
        chosen.append(rng.choice([it for it in items if task.item_to_label[it] == label]))
    rng.shuffle(chosen)
    counts = [rng.randint(*cfg.fillers_per_input) for _ in chosen]
    n_fill = sum(counts)
    fillers = rng.sample(lex["fillers"], n_fill) if n_fill <= len(lex["fillers"]) else \
        [rng.choice(lex["fillers"]) for _ in range(n_fill)]
    out, j = [], 0
    for item, c in zip(chosen, counts):
        out.append((" ".join(fillers[j:j + c] + [item]), task.item_to_label[item]))
        j += c
    return out


def make_tasks(cfg: WorldConfig, lex: dict) -> tuple:
    """Disjoint families: meta-train tasks use the first half of the label words, meta-test tasks the second
    half, so no meta-test label word or rule is ever seen in meta-training. The items (keys) are shared by default
    (shared_items; like the words of real inputs); with shared_items=False they are split in halves too."""
    half_i, half_l = cfg.n_items // 2, cfg.n_label_words // 2
    train_items, test_items = lex["items"][:half_i], lex["items"][half_i:]
    if cfg.shared_items:
        train_items = test_items = lex["items"]
    train_labels, test_labels = lex["labels"][:half_l], lex["labels"][half_l:]
    rng = _rng(cfg, "tasks")
    train = [random_task(rng, f"world_train_{i:02d}", train_items, train_labels, cfg, lex)
             for i in range(cfg.n_train_tasks)]
    test = [random_task(rng, f"world_test_{i:02d}", test_items, test_labels, cfg, lex)
            for i in range(cfg.n_test_tasks)]
    return train, test


def make_passage(rng: random.Random, lex: dict, cfg: WorldConfig) -> str:
    """One corpus passage: the demonstrations of a fresh random task over the whole world, in MetaICL's space
    format ("x1 y1 x2 y2 ..."), so an LM trained on the corpus must learn the rule in context (the mapping is new
    in every passage) and the 80/20 split of MEND's stage 1 leaves a continuation that D determines."""
    if cfg.repeat_passages and rng.random() < cfg.repeat_passages:  # plain repetition: what induction heads copy
        words = rng.sample(lex["items"] + lex["labels"], rng.randint(8, 24))
        return " ".join(words + words)
    task = random_task(rng, "passage", lex["items"], lex["labels"], cfg, lex)
    pieces = []
    for x, y in sample_examples(rng, task, lex, cfg, rng.randint(*cfg.demos_per_passage), cover=False):
        pieces += [x, y]
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
        rows = lambda rng, n, cover=False: [dict(task=task.name, input=x, output=y, options=task.labels)
                                            for x, y in sample_examples(rng, task, lex, cfg, n, cover)]
        for seed in SEEDS:  # each seed's k demonstrations cover every item of the task (queries use no other)
            for split in ("train", "dev"):
                _write_jsonl(meta / "data" / task.name / f"{task.name}_{cfg.k}_{seed}_{split}.jsonl",
                             rows(_rng(cfg, task.name, seed, split), cfg.k, cover=True))
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
                   lexicon=lex, rules={t.name: dict(t.item_to_label)
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
    family: str = "gpt2"          # gpt2 | t5 | opt | llama
    n_embd: int = 128             # d (d_model for T5)
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 512        # GPT-2 learned positions; the loop trains positions < seq_len
    seq_len: int = 320            # passages are cut here (the default world's are 24-48 tokens; older worlds' longer)
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    device: str = "cpu"           # cpu | cuda (world.py --device)
    pos_init: float = 0.0         # GPT-2: > 0 initializes the learned positions with sinusoids of this amplitude
    # "random": every weight as transformers initializes it. "induction" (GPT-2): an induction circuit set by hand in
    # layers 0 and 1 (induction_init), then every weight trains as usual: learned from scratch, the circuit's onset
    # came between step ~1,750 and never, by float rounding, in 15 recipes (README, "Stop 35")
    init: str = "random"
    # ICL appears as a phase change whose timing is chaotic: the same recipe and seed gave ICL 82 with 1 thread and
    # 65 with 2 on one CPU (float rounding). tries > 1: at probe_step, an LM whose icl_probe is below probe_min
    # (percent) starts over with the next seed (seed + 1, ...); the last try always runs to the end
    tries: int = 1
    probe_step: int = 2000
    probe_min: float = 0.0
    # finish_min > 0: icl_probe every probe_every steps too, and the first probe >= finish_min (percent) ends the try
    # finish_steps later, the LR falling linearly to the schedule's floor: ICL, once it has appeared, is complete
    # within a few hundred steps (the loss flattens), so the rest of a fixed schedule is time spent for nothing
    finish_min: float = 0.0
    probe_every: int = 250
    finish_steps: int = 500


def sinusoids(n: int, d: int):
    """The Transformer's sinusoidal position table (n, d): a linear map of it shifts positions by a fixed offset,
    which makes the previous-token head of the induction circuit easy to learn."""
    import torch

    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    table = torch.zeros(n, d)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


def induction_init(lm):
    """Set an induction circuit by hand in a freshly built GPT-2 (LMConfig.init = "induction"; README, "Stop 35"):
    the residual stream is split into token dims, a "previous token" subspace S and sinusoidal positions P (hd dims
    each, hd = the head width); layer 0 head 0 attends to position i - 1 (its query is its position rotated one step
    back) and writes that token's identity (a random orthonormal projection R) into S; layer 1 head 0 attends to
    the positions whose S holds the current token (query R.token, key S) and copies the token it finds there into
    the logits (tied embeddings). On the tiny world's default tasks that is in-context learning at step 0 (probe
    100%); the other heads, the MLPs and every weight of the circuit then train as usual. Uses torch's global RNG
    (seeded by the caller). The scales are for d = 128 with 4 heads; needs 2 layers or more and d >= 4 x hd."""
    import torch

    cfg = lm.config
    d, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    if cfg.n_layer < 2 or d < 4 * hd:
        raise ValueError(f"world.py: LMConfig.init='induction' needs n_layer >= 2 and n_embd >= 4 x head width, got "
                         f"n_layer={cfg.n_layer}, n_embd={d}, n_head={cfg.n_head}")
    n_tok = d - 2 * hd
    tok, prev, posd = slice(0, n_tok), slice(n_tok, n_tok + hd), slice(n_tok + hd, d)
    R = torch.linalg.qr(torch.randn(n_tok, n_tok))[0][:, :2 * hd].T       # (2 hd, n_tok), orthonormal rows
    R_key, R_copy = R[:hd], R[hd:]                                         # (hd, n_tok) each
    w = torch.exp(torch.linspace(math.log(2.5), math.log(0.05), hd // 2))  # angular frequencies, not commensurate
    pos = torch.arange(cfg.n_positions, dtype=torch.float32)[:, None]
    q, k, v = (slice(i * d, i * d + hd) for i in range(3))                 # head 0's columns of c_attn
    with torch.no_grad():
        wte, wpe = lm.transformer.wte.weight, lm.transformer.wpe.weight
        wte.zero_()[:, tok] = torch.randn(wte.shape[0], n_tok) / math.sqrt(n_tok)  # |token| ~ 1
        wpe.zero_()[:, posd] = torch.stack([torch.sin(pos * w), torch.cos(pos * w)], -1).flatten(1) / math.sqrt(hd / 2)
        a0, a1 = lm.transformer.h[0].attn, lm.transformer.h[1].attn
        for a in (a0, a1):
            for cols in (q, k, v):
                a.c_attn.weight[:, cols], a.c_attn.bias[cols] = 0.0, 0.0
            a.c_proj.weight[:hd] = 0.0
        rot = torch.zeros(hd, hd)                                          # p_i -> p_(i-1), pair by pair
        for f in range(hd // 2):
            c, s_ = math.cos(w[f]), math.sin(w[f])
            rot[2 * f:2 * f + 2, 2 * f:2 * f + 2] = torch.tensor([[c, s_], [-s_, c]])
        a0.c_attn.weight[posd, q] = 1.5 * rot                              # layer 0 head 0: position i - 1
        a0.c_attn.weight[posd, k] = 1.5 * torch.eye(hd)
        a0.c_attn.weight[tok, v] = 0.42 * R_key.T
        a0.c_proj.weight[:hd, prev] = 0.42 * torch.eye(hd)                 # ... written into S
        a1.c_attn.weight[tok, q] = 1.7 * R_key.T                           # layer 1 head 0: S == my token
        a1.c_attn.weight[prev, k] = 1.7 * torch.eye(hd)
        a1.c_attn.weight[tok, v] = 0.8 * R_copy.T                          # ... copy the token found there
        a1.c_proj.weight[:hd, tok] = 0.8 * R_copy
    return lm


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
    if cfg.family == "opt":  # OPT: learned positions (offset 2), pre-LN, ReLU FFN
        return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=vocab_size,
                    hidden_size=cfg.n_embd, word_embed_proj_dim=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head, ffn_dim=4 * cfg.n_embd, max_position_embeddings=cfg.n_positions,
                    do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if cfg.family == "llama":  # a Llama-style decoder (RoPE, RMSNorm, SwiGLU) from model.py's families
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size,
                    hidden_size=cfg.n_embd, intermediate_size=8 * ((8 * cfg.n_embd // 3 + 7) // 8),
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                    max_position_embeddings=cfg.n_positions, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    raise ValueError(f"world.py: --family must be one of {FAMILIES}, got {cfg.family!r}")


# each family's stack of pre-LN residual blocks (T5: the encoder, the part MEND's distiller uses): the config key of
# its depth, the state-dict prefix of its blocks, and the output projections that make a block the identity at zero
_STACKS = {"gpt2": ("n_layer", "transformer.h.", ("attn.c_proj.", "mlp.c_proj.")),
           "opt": ("num_hidden_layers", "model.decoder.layers.", ("self_attn.out_proj.", "fc2.")),
           "llama": ("num_hidden_layers", "model.layers.", ("self_attn.o_proj.", "mlp.down_proj.")),
           "t5": ("num_layers", "encoder.block.", ("SelfAttention.o.", "DenseReluDense.wo."))}


def deepen(lm, extra: int):
    """A copy of `lm` with `extra` more blocks on top of its stack, each a copy of one of its last blocks with the
    output projections zeroed: the new blocks start as the identity, so the copy computes exactly what `lm` does and
    training gives them room to re-encode what the old ones retrieve (RunConfig.distiller_extra_layers)."""
    import torch

    import model

    cfg = lm.config.to_dict()
    key, prefix, zeroed = _STACKS[cfg["model_type"]]
    n = cfg[key]
    deeper = model.build_model(dict(cfg, **{key: n + extra}))
    old, new = lm.state_dict(), {}
    for name, t in deeper.state_dict().items():
        if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= n:  # a new block i: copy a block
            i, rest = name[len(prefix):].split(".", 1)                             # from the last min(extra, n)
            src = f"{prefix}{n - min(extra, n) + (int(i) - n) % min(extra, n)}.{rest}"
            t = torch.zeros_like(old[src]) if any(z in rest for z in zeroed) else old[src]
        else:
            t = old[name]
        new[name] = t.clone()
    deeper.load_state_dict(new)
    return deeper


def _pad(rows: list, pad_id: int = 0, device=None):
    """Right-pad lists of ids -> (ids (B,T) long, mask (B,T) long), on `device` (default: the CPU)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def lm_loss(lm, ids, mask, family: str, rng: random.Random = None):
    """Next-token cross-entropy on real tokens. GPT-2: plain causal LM over the passage. T5 (span-free LM
    objective): the encoder reads the first part of each passage (split uniformly in [20%, 80%]), the decoder
    predicts the rest."""
    import torch
    import torch.nn.functional as F

    if not lm.is_encoder_decoder:
        logits = lm(input_ids=ids, attention_mask=mask).logits              # (B, T, V)
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)
    enc, dec = [], []
    for row, m in zip(ids.tolist(), mask.sum(1).tolist()):
        cut = int(m * (0.2 + 0.6 * rng.random())) if rng else int(0.8 * m)
        enc.append(row[:cut])
        dec.append(row[cut:m] + [1])                                            # ... <eos>
    enc_ids, enc_mask = _pad(enc, device=ids.device)
    labels, dec_mask = _pad(dec, device=ids.device)
    logits = lm(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=lm.shift_right(labels),
                decoder_attention_mask=dec_mask).logits                       # (B, Ty, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.masked_fill(dec_mask == 0, -100).reshape(-1),
                           ignore_index=-100)


def pretrain_lm(world_dir, out_dir, cfg: LMConfig, tokenizer=None, log=print, on_log=None):
    """Train a tiny GPT-2 / T5 from scratch on the world's corpus; save it (+ tokenizer.json) in out_dir.
    With cfg.tries > 1, a try whose icl_probe at cfg.probe_step is below cfg.probe_min starts over with the next
    seed; with cfg.finish_min > 0, a try whose probe (every cfg.probe_every steps) reaches it ends cfg.finish_steps
    later. on_log(step, lm): optional hook at every progress line. Returns {"seconds", "first_loss", "final_loss",
    "steps" (of the try saved), "seed" (the try saved), "probes" ([seed, step, percent] per probe taken)}."""
    import torch

    import model

    check_tries(cfg.tries, cfg.probe_step, cfg.steps, "LMConfig")
    check_init(cfg.init, cfg.family, "LMConfig")
    if cfg.finish_min > 0 and min(cfg.probe_every, cfg.finish_steps) < 1:
        raise ValueError(f"world.py: LMConfig finish_min={cfg.finish_min:g} with probe_every={cfg.probe_every}, "
                         f"finish_steps={cfg.finish_steps}: expected both >= 1")
    torch.set_num_threads(cfg.threads)
    summary = json.loads(Path(world_dir, "world.json").read_text())
    wcfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    lex = summary["lexicon"]
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus_texts(world_dir))
    t0, probes = time.time(), []
    for t in range(cfg.tries):
        seed, last = cfg.seed + t, t == cfg.tries - 1
        lm, first, ema, steps = _train_lm(cfg, seed, tokenizer, lex, wcfg, log, on_log, probes, stop_below=not last)
        if lm is not None:
            break
        log(f"pretrain {cfg.family}: in-context probe {probes[-1][2]:.1f}% < {cfg.probe_min:g}% at step "
            f"{cfg.probe_step} (seed {seed}): no ICL yet; starting over with seed {seed + 1} "
            f"(try {t + 2} of {cfg.tries})")
    lm.eval()
    model.save_pretrained(lm, out_dir, tokenizer=tokenizer)
    result = {"seconds": time.time() - t0, "first_loss": first, "final_loss": ema, "steps": steps, "seed": seed,
              "probes": probes, "init": cfg.init}
    _write_json(Path(out_dir) / "pretrain.json", dict(result, config=asdict(cfg)))  # what reuse_llm reads back
    return result


def llm_record(src, cfg: WorldConfig) -> tuple:
    """(how the LLM of an earlier run's folder SRC was trained, SRC's world.json) for world.py --llm_from: the first
    from SRC/llm/pretrain.json (written by pretrain_lm since stop 30) or, for older runs, SRC/results.json's "llm"
    entry. One-line errors, naming SRC, when it is not such a folder or its world's config is not `cfg`.
    run_pipeline calls it before anything in its own folder is touched (SRC may be that folder)."""
    src = Path(src)
    where = f"world.py: --llm_from {src}"
    if not (src / "world" / "world.json").is_file() or not (src / "llm" / "model.safetensors").is_file():
        raise FileNotFoundError(f"{where}: expected the --out folder of an earlier world.py run (world/world.json and "
                                f"llm/model.safetensors)")
    theirs, mine = json.loads((src / "world" / "world.json").read_text()), json.loads(json.dumps(asdict(cfg)))
    # a run of an older world.py lacks the fields added since (item_words): they had their default value
    theirs["config"] = {**json.loads(json.dumps(asdict(WorldConfig()))), **theirs.get("config", {})}
    diff = [k for k in mine if theirs["config"].get(k) != mine[k]]
    if diff:
        raise ValueError(f"{where}: its LLM was trained on another world ({diff[0]}={theirs['config'].get(diff[0])!r},"
                         f" this run's {mine[diff[0]]!r}); train one here instead")
    if (src / "llm" / "pretrain.json").is_file():
        return json.loads((src / "llm" / "pretrain.json").read_text()), theirs
    if (src / "results.json").is_file():
        return json.loads((src / "results.json").read_text())["llm"], theirs
    raise FileNotFoundError(f"{where}: no llm/pretrain.json or results.json saying how its LLM was trained")


def reuse_llm(src, world_dir, out_dir, family: str, tokenizer, record: tuple) -> dict:
    """world.py --llm_from SRC: the tiny LLM of an earlier run (SRC/llm) instead of training one. SRC's world.json
    (as llm_record read it: `record`) must equal world_dir's (llm_record checked the config; this, the generator),
    its LLM be of `family` and its tokenizer's vocabulary equal `tokenizer`'s; each mismatch is a one-line error
    naming SRC. Copies SRC/llm into out_dir (nothing when they are the same folder: a rerun in place), writes
    out_dir/pretrain.json and returns how the LLM was trained, with "reused_from"."""
    import shutil

    src, (info, theirs) = Path(src), record
    where = f"world.py: --llm_from {src}"
    if theirs != json.loads(Path(world_dir, "world.json").read_text()):
        raise ValueError(f"{where}: its LLM was trained on another world (same config, generated differently: "
                         f"another version of world.py); train one here instead")
    kind = json.loads((src / "llm" / "config.json").read_text())["model_type"]
    if kind != family:
        raise ValueError(f"{where}: its LLM is a {kind}, this run's --family is {family}")
    vocab = json.loads((src / "llm" / "tokenizer.json").read_text())["model"]["vocab"]
    if vocab != tokenizer.get_vocab():
        raise ValueError(f"{where}: its tokenizer's vocabulary differs from the one trained here on the same corpus "
                         f"(another tokenizers version?); train the LLM here instead")
    out_dir = Path(out_dir)
    if out_dir.resolve() != (src / "llm").resolve():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "llm", tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _write_json(out_dir / "pretrain.json", info)
    return dict(info, reused_from=str(src))


ONSET_WIDTH = 500  # steps from the probe's first >= 50% to its first >= 90%: at most this = abrupt (README, Stop 31)


def icl_onset(probes: list, seed: int, init: str = "random") -> dict:
    """How the kept LLM try (train seed `seed`) learned in context, from pretrain_lm's probes ([seed, step, percent]):
    {"50": first step at >= 50%, "90": first step at >= 90% (None: never), "verdict"}. verdict: "abrupt" (within
    ONSET_WIDTH steps: every LLM MEND's stage 1 bound on, though it did not bind on every such one), "gradual"
    (slower, or 50% but never 90%: stage 1 bound on none of those of the filler world, in part on the four of the
    item-phrase world; README, Stops 31 and 33), "none" (never 50%),
    "not measured" (fewer than two probes of that try: the plain world's single gate probe) or, for an LLM that
    started with the induction circuit (init "induction") and was >= 90% at its first probe, "set by hand"."""
    mine = [(step, pct) for s, step, pct in probes if s == seed]
    first = lambda t: next((step for step, pct in mine if pct >= t), None)
    at50, at90 = first(50.0), first(90.0)
    if init == "induction" and mine and mine[0][1] >= 90.0:
        verdict = "set by hand"
    elif len(mine) < 2:
        verdict = "not measured"
    elif at50 is None:
        verdict = "none"
    elif at90 is not None and at90 - at50 <= ONSET_WIDTH:
        verdict = "abrupt"
    else:
        verdict = "gradual"
    return {"50": at50, "90": at90, "verdict": verdict}


def check_init(init: str, family: str, where: str) -> None:
    """One-line error unless `init` is a known LMConfig.init for `family` (induction: GPT-2's learned positions)."""
    if init not in LLM_INITS:
        raise ValueError(f"world.py: {where} init={init!r}: expected one of {', '.join(LLM_INITS)}")
    if init == "induction" and family != "gpt2":
        raise ValueError(f"world.py: {where} init='induction' is for --family gpt2 (learned positions), got {family}; "
                         f"use init 'random' (--llm_init random)")


def check_tries(tries: int, probe_step: int, steps: int, where: str) -> None:
    """One-line errors for the LLM's tries: tries >= 1, and with tries > 1 a probe step inside the run."""
    if tries < 1:
        raise ValueError(f"world.py: {where} tries={tries}: expected >= 1")
    if tries > 1 and not 1 <= probe_step <= steps:
        raise ValueError(f"world.py: {where} probe_step={probe_step} with tries={tries}: expected a step in 1..{steps} "
                         f"(steps={steps}); raise the steps or use tries=1 (--llm_tries 1)")


def _train_lm(cfg: LMConfig, seed: int, tokenizer, lex: dict, wcfg: WorldConfig, log, on_log, probes: list,
              stop_below: bool):
    """One try of pretrain_lm: (lm, first loss, final EMA loss, steps run), or (None, ...) when stop_below and the
    probe at cfg.probe_step is below cfg.probe_min. Appends [seed, step, percent] to probes for every probe taken."""
    import torch

    import model

    torch.manual_seed(seed)
    rng = random.Random(f"pretrain|{seed}")

    def next_batch():  # fresh passages of the corpus's generator: no passage is seen twice, nothing to memorize
        texts = [make_passage(rng, lex, wcfg) for _ in range(cfg.batch_size)]
        return [e.ids[:cfg.seq_len] for e in tokenizer.encode_batch(texts)]

    lm = model.build_model(lm_model_config(cfg, tokenizer.get_vocab_size()))
    if cfg.init == "induction":
        induction_init(lm)
    if cfg.pos_init > 0 and cfg.family == "gpt2":
        with torch.no_grad():
            lm.transformer.wpe.weight.copy_(cfg.pos_init * sinusoids(cfg.n_positions, cfg.n_embd))
    lm.to(cfg.device).train()
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    cosine = lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    finish_at, end = None, cfg.steps      # finish_min: the step of the probe that met it; the try ends at `end`

    def sched(s):
        if finish_at is None:
            return cosine(s)
        return cosine(finish_at) + (0.1 - cosine(finish_at)) * (s - finish_at) / cfg.finish_steps

    t0, ema, n_tok, first = time.time(), None, 0, None
    for step in range(cfg.steps):
        if step == end:
            break
        ids, mask = _pad(next_batch(), device=cfg.device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * sched(step)
        loss = lm_loss(lm, ids, mask, cfg.family, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        n_tok += int(mask.sum())
        if ema is None:
            first = loss.item()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == end - 1:
            el = time.time() - t0
            log(f"pretrain {cfg.family} step {step + 1}/{end} loss {ema:.3f} lr {cfg.lr * sched(step):.2e} "
                f"{n_tok / el:.0f} tok/s ETA {el / (step + 1) * (end - step - 1):.0f}s")
            if on_log is not None:
                on_log(step + 1, lm)
        gate = cfg.tries > 1 and step + 1 == cfg.probe_step
        finish_probe = cfg.finish_min > 0 and finish_at is None and (step + 1) % cfg.probe_every == 0
        if not (gate or finish_probe):
            continue
        acc = icl_probe(lm, tokenizer, lex, wcfg, seed=0)
        probes.append([seed, step + 1, round(acc, 1)])
        if finish_probe and acc >= cfg.finish_min:
            finish_at, end = step + 1, min(cfg.steps, step + 1 + cfg.finish_steps)
            log(f"pretrain {cfg.family}: in-context probe {probes[-1][2]:.1f}% >= {cfg.finish_min:g}% at step "
                f"{step + 1} (seed {seed}): finishing at step {end}")
        elif gate:
            below = acc < cfg.probe_min
            if below and stop_below:
                return None, first, ema, step + 1
            log(f"pretrain {cfg.family}: in-context probe {probes[-1][2]:.1f}% {'<' if below else '>='} "
                f"{cfg.probe_min:g}% at step {step + 1} (seed {seed}" + ("; the last try" if below else "") +
                "): going on")
        else:
            log(f"pretrain {cfg.family}: in-context probe {probes[-1][2]:.1f}% at step {step + 1} (seed {seed})")
    return lm, first, ema, end


# ----------------------------------------------------------------------------------------------------------------
# 3. A quick ICL check (MetaICL protocol: the option with the highest total log-likelihood wins)

def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def score_options(lm, tokenizer, contexts: list, options: list, batch_size: int = 64) -> list:
    """Sum of log p(option tokens | context) for each (context, option) pair (context non-empty).
    GPT-2: one causal sequence [context; " option"]; T5: encoder = context, decoder = option."""
    import torch

    scores, device = [], next(lm.parameters()).device
    for b in range(0, len(contexts), batch_size):
        ctx_ids = [tokenizer.encode(c).ids if c else [] for c in contexts[b:b + batch_size]]
        opt_ids = [tokenizer.encode(" " + o).ids for o in options[b:b + batch_size]]
        with torch.no_grad():
            if getattr(lm, "is_encoder_decoder", False):
                enc_ids, enc_mask = _pad([c if c else [1] for c in ctx_ids], device=device)
                labels, dec_mask = _pad(opt_ids, device=device)
                logits = lm(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=lm.shift_right(labels),
                            decoder_attention_mask=dec_mask).logits.log_softmax(-1)     # (B, Ty, V)
                tok = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * dec_mask
                scores += tok.sum(1).tolist()
            else:
                ids, mask = _pad([c + o for c, o in zip(ctx_ids, opt_ids)], device=device)  # no BOS (pretraining)
                logp = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
                tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)            # (B, T-1): predicts ids[:, 1:]
                for i, (c, o) in enumerate(zip(ctx_ids, opt_ids)):
                    scores.append(tok[i, len(c) - 1:len(c) - 1 + len(o)].sum().item())
    return scores


def icl_probe(lm, tokenizer, lex: dict, cfg: WorldConfig, seed: int = 0, n_tasks: int = 48, k: int = 16,
              n_queries: int = 4) -> float:
    """In-context accuracy (percent) of an LM on fresh tasks of the corpus's generator, never the meta-test files:
    n_tasks random tasks over the whole lexicon, k demonstrations covering every item of the task (space format),
    n_queries queries each, the task's label words scored as options. It draws from its own random stream (seed),
    so probing during training leaves the training batches untouched."""
    rng = random.Random(f"icl_probe|{seed}")
    ctx, opts, gold = [], [], []                       # gold: (index of the first option row, #options, answer)
    for _ in range(n_tasks):
        task = random_task(rng, "probe", lex["items"], lex["labels"], cfg, lex)
        D = " ".join(f"{x} {y}" for x, y in sample_examples(rng, task, lex, cfg, k, cover=True))
        for x, y in sample_examples(rng, task, lex, cfg, n_queries, cover=False):
            gold.append((len(opts), len(task.labels), task.labels.index(y)))
            ctx += [f"{D} {x}"] * len(task.labels)
            opts += list(task.labels)
    was_training = lm.training
    lm.eval()
    scores = score_options(lm, tokenizer, ctx, opts)
    lm.train(was_training)
    right = sum(max(range(n), key=lambda j: scores[i + j]) == g for i, n, g in gold)
    return 100.0 * right / len(gold)


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
            # as in data.py / MetaICL: x after a context is " x"; zero-shot's x is the first input (no prefix)
            for method, prefix in (("zero_shot", ""), ("icl", D + " ")):
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
# 4. The command line: world -> tiny LLM + distiller -> train.py stage 1 and 2 -> eval.py -> bench.py

STAGE1_FALLBACK = (8, 0.5, 1000, 64, 2e-3)   # RunConfig.stage1_fallback for an LLM learned from scratch (stop 26)
# RunConfig.stage1_warmup for an LLM learned from scratch in the default world: stops 32-35's, at lr 2e-3 (stop 36)
STAGE1_WARMUP_2E3 = ((8, 0.5, 1000, 64, 2e-3), (16, 0.5, 1000, 64, 2e-3), (32, 0.5, 1000, 64, 2e-3))


@dataclass
class RunConfig:
    """Sizes of one end-to-end run: the quick start's (the default world, 1-3 fillers); RunConfig.plain() is the
    plain world's recipe (stops 13-28), RunConfig.quick() the CI-sized run of the plain world."""
    # ICL emerges as a phase change, when it does: with 1-3 fillers between step ~1,750 and after 3,000 (its timing
    # is float rounding). An LM whose in-context probe (icl_probe, chance ~37%) is still below 50% at step 2,000
    # starts over with the next seed, up to 3 tries; one whose probe (every 250 steps) reaches 90% ends 500 steps
    # later, its loss flat by then (README, "Stop 29"). Every family gets the tries; a tiny LM that never learns in
    # context pays 2 x 2,000 more steps for them
    # Since stop 35 the LLM starts with an induction circuit set by hand (LMConfig.init; every weight then trains): in
    # context at its first probe (step 250), so it ends at step 750; the tries stay for --llm_init random
    llm: dict = field(default_factory=lambda: dict(steps=4000, batch_size=32, tries=3, probe_step=2000,
                                                   probe_min=50.0, finish_min=90.0, probe_every=250,
                                                   finish_steps=500, init="induction"))
    # distiller: None = start from a copy of the trained LLM (an LM that already learns in context, as gpt2 is
    # for gpt2-large in the paper); a dict = a separate LM of the family trained from scratch with these sizes
    # (a d=64 one did not learn in context in 1,500 steps, and MEND with it stayed at chance)
    distiller: dict = None
    # the copy gets this many more blocks on top (world.deepen: copies of its last blocks with zeroed output
    # projections, so it starts as exactly the LLM): room to re-encode what its induction heads retrieve into the
    # slots' layout. Measured on one LLM with the same stage 1: 2-layer copy MEND 71.9, 4-layer 76.8 (README)
    distiller_extra_layers: int = 2
    # distillation vectors: |D| ~ 64 tokens at K = 16 with 1-3 fillers, so l = 7 <= |D|/8 (l = 8 is |D|/7.98 there);
    # at most 8 distinct tokens (4 keys, 4 labels) decide a task. The plain world: |D| = 32, l = 4
    l: int = 7
    # MEND stage 1 (train.py --stage pretrain --objective distill) is a short-to-long curriculum over passage length:
    # warm-up phases (max_len tokens, or 0 = whole passages; beta; steps; batch size; lr), each one train.py run
    # initialized from the previous run's last checkpoint with a fresh LR schedule, then the final whole-passage
    # phase of stage1_steps at stage1_batch_size (validated; its best checkpoint is MEND's stage 1). On 8-token, then
    # 16-token, then 32-token passages (plain world: D = 2, 4, then 8 demonstrations, the LLM continues with as many;
    # with 1-3 fillers about half as many) the distiller first learns to carry a few demonstrations in its l slots in
    # a form the LLM reads; whole passages from the start left MEND near chance (README, the tiny world). The
    # 32-token phase (stop 19) added 1.5-2.5 points of MEND stage 1 from each of two first-phase solutions; going
    # straight from 8 to 32 tokens left it at chance (README, "A third warm-up phase"). Every phase runs at batch 64:
    # at batch 16 the short phases needed 1,000 + 1,000 steps, and a batch-16 final phase reached the binding on one
    # LLM training and stayed at chance (dev 20-25 for 3,000 steps) on another that differed only in float rounding
    # (2 threads instead of 1); at batch 64 the runs that bind do so within 500 whole-passage steps (best dev at
    # 500-1,000 steps after 500-step middle phases; 750 lost the 32-token phase's gain and 7 points at K = 4)
    # The first phase ends either near 0.01-0.06 (the slots copy D) or stuck at 0.16-0.19, and which copying solution
    # it finds sets where stage 1 lands (README, "The plateau is chosen in the first warm-up phase"): solutions found
    # at lr 2e-3 led to MEND stage 1 62-73 (mean 69), those found at 3e-3 / 4e-3 to 58-65 (mean 62). At 2e-3 for
    # 1,000 steps 4 seeds in 9 leave the plateau (AMD VM's LLM); stage1_fallback (below) is the extra try.
    # Since stop 32 the 16- and 32-token phases run 1,000 steps each (500 until then) and the final phase 500
    # (stage1_steps; 1,000 until then): on world seeds 0 / 2 / 3 the middle phases ended at 0.033 / 0.014 / 0.067 and
    # 0.018 / 0.007 / 0.166 (against 0.081 / 0.117 / 0.179 and 0.066 / 0.035 / 0.284) and the final phase's dev at
    # 99.3 / 99.7 / 67.0 after 500 steps (against 99.25 / 98.8 / 61.5 after 1,000), in about the same time; seed 3's
    # MEND rose from 63.1 to 75.9 (README, "Stop 32"). Another 1,000 32-token steps on seed 3: dev 70.0, +180 s.
    # In the item-phrase world a 1,000-step final phase (--stage1_steps 1000) gave MEND 83.5 / 74.2 against 82.5 /
    # 72.5 on seeds 5 / 4 for ~230 s more, and 2,000 steps peaked at dev 83.1 (README, "Stop 34")
    # Since stop 36 the warm-up phases run at lr 1e-3 (2e-3 until then; plain() keeps it): on the induction-initialized
    # LLMs the 8-token phase learns everything but the (key, label) binding by step 200 and then stays at ~0.20 at 2e-3
    # (six tries of six on seeds 2 and 3), and a 16-token phase at 2e-3 lost a first-phase binding (0.149 -> 0.350);
    # at 1e-3 the phases ended at 0.086 / 0.111 / 0.008 (seed 2) and 0.149 / 0.004 / 0.003 (seed 3), stage 1's dev
    # 100.0 where 2e-3 left MEND at chance on both (README, "Stop 36")
    stage1_warmup: tuple = ((8, 0.5, 1000, 64, 1e-3), (16, 0.5, 1000, 64, 1e-3), (32, 0.5, 1000, 64, 1e-3))
    # each warm-up phase is run with this many train.py seeds (seed, seed + 1, ...) from the previous phase's choice,
    # and the try with the lowest end-of-phase L_distill goes on: a stuck first phase leaves MEND at chance. One int
    # per phase (the last repeats), or one for all. The later phases run once: their seeds moved MEND ~2 points. With
    # 1-3 fillers the first phase's tries ended at 0.003-0.009 on every LLM that learned in context early (7 of 7
    # tries; the fallback covers the rest), so one try; the plain world's first phase sticks more often: (3, 1)
    stage1_restarts: tuple = 1
    # when every try of the first phase ends above stage1_plateau (stuck), one more try with this phase (seed `seed`)
    # and placeholder init (train.py --placeholder_init). Since stop 26: the first phase's own recipe with the
    # placeholders started from LLM token embeddings ("vocab"); on an LLM whose three random-init tries stayed at
    # 0.23-0.25 it ended at 0.048 and MEND stage 1 reached 65.4 instead of 38.5, where stop 17's fallback (500 steps
    # at lr 4e-3, random init) ended at 0.392 (README, "Stop 26"). It is no better in general (0.18 and 0.13 on two
    # LLMs whose random-init tries left the plateau): another draw, not a better recipe. None since stop 35: on the
    # induction-initialized LLMs the first phase ended at 0.11-0.14 on seeds 0 and 1, the fallback higher (0.18 /
    # 0.20), and the final phase bound from the first anyway (dev 100.0): ~100 s for nothing; on seeds 2 and 3, whose
    # first phase stuck (0.19-0.20) and MEND with it, it stuck too (0.19). An LLM from scratch (--llm_init random,
    # another --family, RunConfig.plain()) gets it back: STAGE1_FALLBACK
    stage1_fallback: tuple = None
    stage1_fallback_init: str = "vocab"
    stage1_plateau: float = 0.1
    stage1_steps: int = 500
    stage1_batch_size: int = 64
    stage1_lr: float = 2e-3          # the final phase and HyperTuning's clm phase
    # train.py --stage pretrain --objective clm (HyperTuning), same batch and lr. 100 since stop 19 (it was 250: dev
    # 19, HyperTuning 39.1); without the curriculum CLM stays at chance either way, and the time pays for the
    # 32-token phase. The like-for-like CLM baseline is clm_curriculum
    clm_steps: int = 100
    # HyperTuning's CLM pretraining through the same curriculum as MEND's (its warm-up phases and tries, chosen by the
    # lowest end-of-phase CLM loss, no fallback; then stage1_steps whole-passage steps instead of clm_steps): the
    # like-for-like Table 4 "CLM" row and HyperTuning baseline; it costs about MEND's stage 1 again (~9 min more in
    # the plain world, 24 in all), so off in the quick start
    clm_curriculum: bool = False
    # train.py --stage finetune (finetune / pred / prompt_tuning / Table 4). 200 since stop 19 (it was 300; MEND's
    # best dev came at steps 100-200 in every stop-18/19 run), for the 32-token phase's time. With 1-3 fillers, 100
    # steps saved ~40 s and gave MEND 98.7 against 99.0 (same LLM and stage 1; README, "Stop 29")
    stage2_steps: int = 200
    batch_size: int = 8              # stage 2
    lr: float = 3e-4                 # stage 2: short and gentle, as it overfits the 24 meta-train label words
    # validation on the meta-test tasks' dev files picks each run's best checkpoint (the paper's Appendix A)
    stage1_eval_every: int = 500
    stage2_eval_every: int = 50
    k_sweep: tuple = (1, 4, 16)
    bench: bool = True

    def __post_init__(self):
        import mend

        if self.stage1_fallback_init not in mend.INITS:
            raise ValueError(f"world.py: RunConfig.stage1_fallback_init={self.stage1_fallback_init!r}: expected one "
                             f"of {', '.join(mend.INITS)}")
        llm = LMConfig(**self.llm)
        check_tries(llm.tries, llm.probe_step, llm.steps, "RunConfig.llm")
        if self.distiller_extra_layers < 0:
            raise ValueError(f"world.py: RunConfig.distiller_extra_layers={self.distiller_extra_layers}: expected >= 0")
        tries = self.stage1_restarts
        if isinstance(tries, int) and tries < 1:
            raise ValueError(f"world.py: RunConfig.stage1_restarts={tries}: expected >= 1")
        if not isinstance(tries, int) and (len(tries) == 0 or min(tries) < 1):
            raise ValueError(f"world.py: RunConfig.stage1_restarts={tuple(tries)!r}: expected an int >= 1, or one "
                             f"per warm-up phase (the last one repeats)")
        phases = [("stage1_warmup entry", ph) for ph in self.stage1_warmup]
        for what, ph in phases + ([("stage1_fallback", self.stage1_fallback)] if self.stage1_fallback else []):
            if len(ph) != 5:
                raise ValueError(f"world.py: RunConfig.{what} {tuple(ph)!r}: expected (max_len, beta, steps, "
                                 f"batch_size, lr)")

    def restarts(self, phase: int) -> int:
        """train.py seeds tried in warm-up phase `phase` (0-based; past the tuple's end, its last entry)."""
        tries = self.stage1_restarts
        return tries if isinstance(tries, int) else tries[min(phase, len(tries) - 1)]

    @classmethod
    def plain(cls) -> "RunConfig":
        """The plain world's recipe (world.py --plain; the quick start of stops 13-28): l = 4 = |D|/8, a 4,000-step
        LLM (probe at step 2,000: seed 0 55.2 -> ICL 65.1, seed 1 77.6 -> 87.9, seed 2 69.8 -> 82.1; README) and
        three tries of the first warm-up phase; stage 1's phases as until stop 31 (500 + 500 middle steps, a final
        phase of 1,000), whose figures its README rows are."""
        return cls(llm=dict(steps=4000, batch_size=32, tries=3, probe_step=2000, probe_min=50.0), l=4,
                   stage1_restarts=(3, 1), stage1_steps=1000, stage1_fallback=STAGE1_FALLBACK,
                   stage1_warmup=((8, 0.5, 1000, 64, 2e-3), (16, 0.5, 500, 64, 2e-3), (32, 0.5, 500, 64, 2e-3)))

    @classmethod
    def quick(cls) -> "RunConfig":
        """The CI-sized run of the plain world: a 2,000-step LLM, the short phases with one try each (the first as
        the full run's: 1,000 steps at lr 2e-3; 500 at 4e-3 stayed on the plateau on stop 26's VM), then 400
        whole-passage steps."""
        return cls(llm=dict(steps=2000, batch_size=32, tries=1, probe_step=1500, probe_min=50.0), l=4,
                   distiller_extra_layers=0,
                   stage1_warmup=((8, 0.5, 1000, 64, 2e-3), (16, 0.5, 500, 64, 2e-3)), stage1_restarts=1,
                   stage1_fallback=None, stage1_steps=400, clm_steps=100, stage2_steps=100, stage1_eval_every=200,
                   stage2_eval_every=25, k_sweep=(1, 16), bench=False)


# results.json "ablation" key, train.py run folder, eval folder: the rows of the paper's Table 4 (stage 2 of each
# as MEND's; "pretraining: L_distill" is MEND itself) and MEND before stage 2
TABLE4 = (("mend_without_L_distill", "finetune-mend-pred", "eval-mend-pred"),
          ("mend_without_L_pred", "finetune-mend-distill", "eval-mend-distill"),
          ("mend_clm_pretraining", "finetune-mend-clm", "eval-mend-clm"),
          ("mend_no_pretraining", "finetune-mend-no_pretraining", "eval-mend-no_pretraining"),
          ("mend_stage1_only", "pretrain-mend", "eval-mend-stage1"))


def _per_task(result: dict, method: str) -> dict:
    """eval.py's result -> {task: accuracy in percent of `method`, mean over seeds}."""
    per_task = {}
    for r in result["methods"][method]["runs"]:
        per_task.setdefault(r["task"], []).append(r["accuracy"])
    return {task: sum(v) / len(v) for task, v in per_task.items()}


def _accuracy(result: dict, method: str) -> float:
    """eval.py's result -> accuracy in percent of `method`, mean over seeds per task, then over tasks."""
    per_task = _per_task(result, method)
    return sum(per_task.values()) / len(per_task)


def by_shape(result: dict, rules: dict, methods=("icl", "mend")) -> dict:
    """{"KxL": {"tasks": n, method: accuracy %}}: each method's accuracy in eval.py's result (mean over seeds per
    task, then over the tasks of that shape) by task shape, K keys (items) mapped onto L label words (world.json
    "rules"; every method scored on the same tasks). The tasks-weighted mean over shapes is _accuracy's figure."""
    per_task = {m: _per_task(result, m) for m in methods}
    shapes = {}
    for task in per_task[methods[0]]:
        rule = rules[task]
        s = shapes.setdefault(f"{len(rule)}x{len(set(rule.values()))}", {"tasks": 0, **{m: 0.0 for m in methods}})
        s["tasks"] += 1
        for m in methods:
            s[m] += per_task[m][task]
    return {k: {"tasks": v["tasks"], **{m: v[m] / v["tasks"] for m in methods}} for k, v in sorted(shapes.items())}


def lowest_try(tries: list) -> tuple:
    """The (end-of-phase loss, run folder) of a warm-up phase's tries that goes on: the lowest loss; a diverged (NaN)
    try never wins over a finite one."""
    return min(tries, key=lambda t: (math.isnan(t[0]), t[0]))


def run_pipeline(out, family: str = "gpt2", seed: int = 0, quick: bool = False, threads: int = 2,
                 world_cfg: WorldConfig = None, run_cfg: RunConfig = None, log=print, device: str = "cpu",
                 llm_from=None) -> dict:
    """Everything, in order: generate the world, train the tokenizer, the tiny LLM and the distiller (a copy of the
    LLM + RunConfig.distiller_extra_layers, or a separate LM), MEND stage 1 (distill; RunConfig.stage1_warmup's
    phases, then the final one) and HyperTuning's stage 1 (clm) through train.py, stage 2 (MEND finetune,
    HyperTuning pred, PromptTuning, and Table 4's rows: without L_distill, without L_pred, without pretraining),
    eval.py (5 methods, ablation, K sweep) and bench.py. Writes DIR/results.json last (a results.json already in
    DIR is removed first, so an interrupted run never leaves one that looks complete) and returns it. device: where
    every training and evaluation runs (cpu, or cuda: in fp32 there too, so that only float rounding differs).
    llm_from: an earlier run's folder whose LLM (trained on the same world) is reused instead of training one
    (reuse_llm; the LLM is the slow, chaotic phase)."""
    import torch

    import data
    import eval as evaluate
    import model
    import train

    torch.set_num_threads(threads)
    out = Path(out)
    wcfg = world_cfg or (WorldConfig.quick(seed) if quick else WorldConfig(seed=seed))
    record = llm_record(llm_from, wcfg) if llm_from else None  # before anything here is touched (may be `out`)
    rcfg = run_cfg or (RunConfig.quick() if quick else RunConfig())
    if not llm_from:
        check_init(rcfg.llm.get("init", "random"), family, "RunConfig.llm")
    (out / "results.json").unlink(missing_ok=True)  # written last: present = this run finished
    times, t_all = {}, time.time()

    def phase(name):
        times[name] = round(time.time() - t_phase[0], 1)
        log(f"[world.py] phase {name} done in {times[name]:.0f}s (total {time.time() - t_all:.0f}s)")
        t_phase[0] = time.time()

    t_phase = [time.time()]
    wdir, meta = out / "world", out / "world" / "metaicl"
    summary = generate_world(wdir, wcfg)
    log(f"[world.py] world: {len(summary['train_tasks'])} meta-train / {len(summary['test_tasks'])} meta-test tasks, "
        f"{wcfg.n_passages} passages, chance {summary['chance']:.1f}%")
    phase("generate")
    texts = corpus_texts(wdir)
    tokenizer = train_tokenizer(texts)
    lm_cfg = LMConfig(**dict(rcfg.llm, family=family, seed=seed, threads=threads, device=device))
    r = (reuse_llm(llm_from, wdir, out / "llm", family, tokenizer, record) if llm_from else
         pretrain_lm(wdir, out / "llm", lm_cfg, tokenizer=tokenizer, log=log))
    llm_info = {k: r[k] for k in ("seed", "probes", "final_loss", "steps", "reused_from") if k in r}
    llm_info["init"] = r.get("init", r.get("config", {}).get("init", "random"))   # older runs: random
    llm_info["icl_onset"] = onset = icl_onset(r["probes"], r["seed"], llm_info["init"])
    saved = model.load_config(out / "llm")                         # the LLM's sizes as saved (trained or reused)
    width = saved.get("n_embd", saved.get("d_model", saved.get("hidden_size")))
    size = f"d={width}, {saved[_STACKS[saved['model_type']][0]]} layers"
    log(f"[world.py] llm: {family} {size}, loss {r['final_loss']:.3f}, "
        f"seed {r['seed']}" + (f" (in-context probes: {r['probes']})" if r["probes"] else "") +
        (f"; reused from {llm_from}" if llm_from else ""))
    if onset["verdict"] in ("gradual", "none"):  # the run goes on: ICL and the baselines are still measured
        log(f"[world.py] warning: {onset_line(onset)}")
    phase("llm")
    if rcfg.distiller is None:  # the distiller starts as a copy of the LLM (+ identity blocks), own folder
        distiller = deepen(model.from_pretrained(out / "llm"), rcfg.distiller_extra_layers)
        model.save_pretrained(distiller, out / "distiller", tokenizer=tokenizer)
        log(f"[world.py] distiller: a copy of the LLM ({family} {size}) + "
            f"{rcfg.distiller_extra_layers} identity-initialized layers")
    else:
        d_cfg = LMConfig(**dict(rcfg.distiller, family=family, seed=seed + 1, threads=threads, device=device))
        r = pretrain_lm(wdir, out / "distiller", d_cfg, tokenizer=tokenizer, log=log)
        log(f"[world.py] distiller: {family} d={d_cfg.n_embd}, loss {r['final_loss']:.3f}")
    phase("distiller")

    runs = out / "runs"
    shards = [str(p) for p in sorted((wdir / "c4").glob("*.json.gz"))]
    common = ["--llm", str(out / "llm"), "--distiller", str(out / "distiller"), "--data_dir", str(meta),
              "--split", SETTING, "--l", str(rcfg.l), "--save_every", "100000", "--log_every", "100",
              "--seed", str(seed), "--overwrite", "--device", device, "--precision", "fp32"]
    stage1 = ["--stage", "pretrain", "--c4", *shards]
    whole = ["--min_len", "16"]                                     # whole passages (cut at --max_len 1024)

    def warmup_try(objective, phase_cfg, out_i, seed_i, init, extra=()):  # one warm-up run -> (end loss, dir)
        max_len, beta, steps, batch, lr = phase_cfg
        lengths = ["--max_len", str(max_len), "--min_len", str(max_len)] if max_len else whole
        res = train.main([*stage1, "--objective", objective, *lengths, "--beta", str(beta), "--lr", str(lr),
                          "--batch_size", str(batch), "--eval_every", "0", "--max_steps", str(steps), "--out",
                          str(out_i), *init, *common, "--seed", str(seed_i), *extra])
        return res["log"][-1][objective], out_i

    def curriculum(objective, name):  # the warm-up phases (RunConfig) -> --init flags for the final phase
        init = []
        for i, phase_cfg in enumerate(rcfg.stage1_warmup):
            run = f"pretrain-{name}-warmup{i + 1}"
            tries = [warmup_try(objective, phase_cfg, runs / (run + (f"-try{r + 1}" if r else "")), seed + r, init)
                     for r in range(rcfg.restarts(i))]  # the lowest end-of-phase loss goes on (RunConfig)
            if objective == "distill" and i == 0 and rcfg.stage1_fallback and \
                    not lowest_try(tries)[0] <= rcfg.stage1_plateau:
                tries.append(warmup_try(objective, rcfg.stage1_fallback, runs / f"{run}-fallback", seed, init,
                                        ["--placeholder_init", rcfg.stage1_fallback_init]))
            best = lowest_try(tries)
            log(f"[world.py] stage-1 {name} warm-up {i + 1}: end-of-phase {objective} loss " +
                ", ".join(f"{d:.3f} ({o.name})" for d, o in tries) + f"; going on from {best[1].name}")
            init = ["--init", str(best[1] / "last")]
        return init

    for obj, name in (("distill", "mend"), ("clm", "hypertuning")):  # HyperTuning: one phase unless clm_curriculum
        init, steps = ((curriculum(obj, name), rcfg.stage1_steps) if obj == "distill" or rcfg.clm_curriculum
                       else ([], rcfg.clm_steps))
        train.main([*stage1, "--objective", obj, *whole, "--lr", str(rcfg.stage1_lr), "--batch_size",
                    str(rcfg.stage1_batch_size), "--eval_every", str(min(rcfg.stage1_eval_every, steps)),
                    "--max_steps", str(steps), "--out", str(runs / f"pretrain-{name}"), *init, *common])
    phase("stage1")
    mend_init = ["--init", str(runs / "pretrain-mend" / "best")]
    clm_init = ["--init", str(runs / "pretrain-hypertuning" / "best")]
    stage2 = {"mend": ["--objective", "finetune", *mend_init],
              "hypertuning": ["--objective", "pred", *clm_init],
              "prompt_tuning": ["--method", "prompt_tuning"],
              # Table 4's ablations: finetuning without L_distill / without L_pred; pretraining by CLM / none
              "mend-pred": ["--objective", "pred", *mend_init], "mend-distill": ["--objective", "distill", *mend_init],
              "mend-no_pretraining": ["--objective", "finetune"],
              **({"mend-clm": ["--objective", "finetune", *clm_init]} if rcfg.clm_curriculum else {})}
    for name, flags in stage2.items():
        train.main(["--stage", "finetune", *flags, "--max_steps", str(rcfg.stage2_steps),
                    "--batch_size", str(rcfg.batch_size), "--lr", str(rcfg.lr),
                    "--eval_every", str(min(rcfg.stage2_eval_every, rcfg.stage2_steps)),
                    "--out", str(runs / f"finetune-{name}"), *common])
    phase("stage2")

    ev = ["--llm", str(out / "llm"), "--data_dir", str(meta), "--split", SETTING, "--seeds", "5",
          "--mend", str(runs / "finetune-mend" / "best"), "--hypertuning", str(runs / "finetune-hypertuning" / "best"),
          "--prompt_tuning", str(runs / "finetune-prompt_tuning" / "best"), "--device", device, "--dtype", "fp32"]
    main_methods = ["zero_shot", "icl", "prompt_tuning", "hypertuning", "mend"]
    res = evaluate.main([*ev, "--methods", *main_methods, "--out", str(out / "eval")])
    methods = {m: _accuracy(res, m) for m in main_methods}
    shapes = by_shape(res, summary["rules"])                       # where MEND loses to ICL (README)
    macro_f1 = {m: res["methods"][m]["avg"] for m in main_methods}
    ablation = {"mend": methods["mend"]}
    for key, run, folder in TABLE4:  # Table 4, + the distill-pretrained module before stage 2
        if key == "mend_clm_pretraining" and not rcfg.clm_curriculum:  # CLM without the curriculum: not like for
            continue                                                    # like, so not trained (README)
        r = evaluate.main([*ev, "--mend", str(runs / run / "best"), "--methods", "mend", "--out", str(out / folder)])
        ablation[key] = _accuracy(r, "mend")
    k_sweep = {}
    for k in rcfg.k_sweep:
        if k == 16:
            k_sweep["16"] = {"icl": methods["icl"], "mend": methods["mend"]}
            continue
        r = evaluate.main([*ev, "--k", str(k), "--methods", "icl", "mend", "--out", str(out / f"eval-k{k}")])
        k_sweep[str(k)] = {"icl": _accuracy(r, "icl"), "mend": _accuracy(r, "mend")}
    phase("eval")

    tasks, _ = data.load_meta_test(meta, SETTING, tokenizer, k=wcfg.k, verbose=False)
    mean_demo = sum(len(t.demo_ids) for t in tasks) / len(tasks)
    if rcfg.bench:
        import bench
        bench.main(["--preset", "tiny", "--family", family, "--llm", str(out / "llm"),
                    "--mend", str(runs / "finetune-mend" / "best"), "--l", str(rcfg.l),
                    "--context", f"tiny_world={round(mean_demo)}", "--threads", str(threads), "--device", device,
                    "--out", str(out / "bench")])
        phase("bench")

    result = {"methods": methods, "chance": summary["chance"], "l": rcfg.l, "mean_demo_tokens": mean_demo,
              "macro_f1": macro_f1, "ablation": ablation, "k_sweep": k_sweep, "by_shape": shapes, "family": family,
              "quick": quick, "seed": seed, "n_test_tasks": len(summary["test_tasks"]), "seconds": times,
              "total_seconds": round(time.time() - t_all, 1), "world": asdict(wcfg), "run": asdict(rcfg),
              "llm": llm_info, "device": device}
    _write_json(out / "results.json", result)
    log(result_table(result))
    return result


def onset_line(onset: dict) -> str:
    """One line on how the LLM learned in context (icl_onset) and what that means for MEND."""
    at50, at90 = onset["50"], onset["90"]
    where = (f"probe >= 50% at step {at50}" if at50 is not None else "probe never >= 50%") + \
        (f", >= 90% at step {at90}" if at90 is not None else ", never >= 90%" if at50 is not None else "")
    return {"abrupt": f"the LLM learned in context abruptly ({where}), as the LLMs MEND's stage 1 bound on did "
                      f"(not every such one: README, Stop 31)",
            "gradual": f"the LLM learned in context gradually ({where}): MEND's stage 1 did not bind on the gradual "
                       f"LLMs of the filler world measured (MEND near chance; README, Stop 31) and bound in part on "
                       f"the item-phrase world's four (Stop 33); another --seed may help",
            "none": f"the LLM did not learn in context ({where}): ICL and MEND stay near chance; try another --seed "
                    f"or more --llm_tries",
            "not measured": "the LLM's in-context onset was not measured (one probe per try)",
            "set by hand": f"the LLM started with an induction circuit set by hand (--llm_init induction; {where}) and "
                           f"trained on from there (README, Stop 35)"}[onset["verdict"]]


def result_table(r: dict) -> str:
    """The Table-2-shaped summary (accuracy, percent, mean over meta-test tasks and 5 seeds) + targets."""
    m, a = r["methods"], r["ablation"]
    names = [("zero_shot", "0-shot"), ("icl", "ICL"), ("prompt_tuning", "PromptTuning"),
             ("hypertuning", "HyperTuning"), ("mend", "MEND")]
    lines = [f"tiny world ({r['family']}, {r['n_test_tasks']} meta-test tasks x 5 seeds, accuracy %, chance "
             f"{r['chance']:.1f}, l={r['l']}, mean |D|={r['mean_demo_tokens']:.1f} tokens)", "",
             "| " + " | ".join(n for _, n in names) + " | MEND w/o L_distill |", "|" + "---|" * (len(names) + 1),
             "| " + " | ".join(f"{m[k]:.1f}" for k, _ in names) + f" | {a['mend_without_L_distill']:.1f} |",
             "", "Table 4 (accuracy %): pretraining (then MEND's finetuning): none {mend_no_pretraining:.1f}, CLM "
             "{clm}, L_distill {mend:.1f}; finetuning (after L_distill pretraining): L_pred + L_distill {mend:.1f}, "
             "w/o L_pred {mend_without_L_pred:.1f}, w/o L_distill {mend_without_L_distill:.1f}, none (stage 1 only) "
             "{mend_stage1_only:.1f}".format(**a, clm=f"{a['mend_clm_pretraining']:.1f}" if "mend_clm_pretraining" in a
                                             else "not run (--clm_curriculum)"),
             "", "K sweep (accuracy %): " + ", ".join(f"K={k}: ICL {v['icl']:.1f} MEND {v['mend']:.1f}"
                                                      for k, v in r["k_sweep"].items())]
    if "by_shape" in r:
        lines += ["", "by task shape (keys x labels (tasks): ICL / MEND, accuracy %): " + ", ".join(
            f"{k} ({v['tasks']}): {v['icl']:.1f} / {v['mend']:.1f}" for k, v in r["by_shape"].items())]
    ks = sorted(r["k_sweep"], key=int)
    checks = [("zero-shot within 5 of chance", abs(m["zero_shot"] - r["chance"]) <= 5),
              ("ICL >= zero-shot + 20", m["icl"] >= m["zero_shot"] + 20),
              ("MEND >= ICL - 2 with l <= |D|/8", m["mend"] >= m["icl"] - 2 and r["l"] <= r["mean_demo_tokens"] / 8),
              ("MEND w/o L_distill in finetuning < MEND", a["mend_without_L_distill"] < m["mend"]),
              ("CLM pretraining (w/o L_distill) < MEND", a["mend_clm_pretraining"] < m["mend"]
               if "mend_clm_pretraining" in a else None),
              (f"MEND K={ks[0]} < K={ks[-1]}", r["k_sweep"][ks[0]]["mend"] < r["k_sweep"][ks[-1]]["mend"])]
    verdict = {True: "met", False: "MISSED", None: "not run (--clm_curriculum)"}
    if "icl_onset" in r.get("llm", {}):
        lines += ["", onset_line(r["llm"]["icl_onset"])]
    lines += ["", "targets: " + "; ".join(f"{n}: {verdict[ok]}" for n, ok in checks),
              f"timings (s): {r['seconds']} total {r['total_seconds']}"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="world.py", description="The offline tiny world: generate ICL tasks, train a "
                                 "tiny LLM, then MEND and the baselines through train.py, eval.py and "
                                 "bench.py.")
    ap.add_argument("--out", required=True, help="output folder (world, models, runs, results.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=FAMILIES, default="gpt2",
                    help="LM family of the tiny LLM and distiller (gpt2: the one that learns ICL in budget)")
    ap.add_argument("--plain", action="store_true",
                    help="the plain world and recipe (WorldConfig.plain, RunConfig.plain): no filler words, every "
                         "token of D a key or a label, l = 4 = |D|/8; stops 13-28's quick start (README)")
    ap.add_argument("--quick", action="store_true",
                    help="the CI-sized run of the plain world (WorldConfig.quick, RunConfig.quick; "
                         "tests/test_world.py)")
    ap.add_argument("--llm_steps", type=int, default=None,
                    help="LLM pretraining steps (default: RunConfig, at most 4,000: a try ends 500 steps after its "
                         "in-context probe, every 250 steps, reaches 90%%; --plain 4,000, --quick 2,000)")
    ap.add_argument("--llm_tries", type=int, default=None,
                    help="LLM seeds tried: a try whose in-context probe is below 50%% at step 2,000 (--quick: 1,500) "
                         "starts over with the next seed (default: RunConfig, 3; --quick: 1; 1 = no restarts)")
    ap.add_argument("--fillers", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="filler words before each key of every input (WorldConfig.fillers_per_input; default 1 3, "
                         "--plain / --quick 0 0). Other ranges: README, Stops 27-29")
    ap.add_argument("--item_words", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="words per item phrase (WorldConfig.item_words; item i has MIN + i %% (MAX - MIN + 1)); "
                         "1 1 = one-word items")
    ap.add_argument("--llm_init", choices=LLM_INITS, default=None,
                    help="how the tiny LLM starts (LMConfig.init): induction = an induction circuit set by hand in "
                         "layers 0-1, then trained as usual (default for gpt2 in the default world: in context from "
                         "step 0); random = as transformers initializes it, ICL must emerge (default for --plain, "
                         "--quick and the other families; in the default world it brings back stops 32-34's stage 1: "
                         "warm-ups at lr 2e-3 and the first-phase fallback; README, Stops 35-36)")
    ap.add_argument("--llm_from", metavar="DIR", default=None,
                    help="reuse the tiny LLM of an earlier run's --out DIR (same world: --seed, --fillers, "
                         "--item_words, --plain / --quick) instead of training one; DIR may be --out itself (a "
                         "rerun in place)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2: CI's cores)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="where the LLM, stage 1, stage 2, eval.py and bench.py run (default cpu: the README's "
                         "figures, bit for bit on one machine; auto = cuda when available). CUDA runs fp32 too and "
                         "lands elsewhere than the CPU (float rounding); the quick run took 107 s on an H200")
    ap.add_argument("--l", type=int, default=None,
                    help="distillation vectors (default: RunConfig, 7 <= |D|/8; --plain / --quick 4 = |D|/8)")
    ap.add_argument("--stage1_restarts", type=int, default=None,
                    help="train.py seeds tried in every stage-1 warm-up phase; the lowest L_distill goes on "
                         "(default: RunConfig, 1; --plain: 3 in the first phase and 1 in the others)")
    ap.add_argument("--stage1_steps", type=int, default=None,
                    help="steps of stage 1's final, whole-passage phase (default: RunConfig, 500; --plain 1,000; "
                         "--quick 400; --clm_curriculum's CLM phase too); validated every 500 (--quick: 200), the best "
                         "checkpoint is MEND's stage 1")
    ap.add_argument("--distiller_extra_layers", type=int, default=None,
                    help="identity-initialized blocks added to the distiller (a copy of the LLM); 0 = the plain copy "
                         "(default: RunConfig, 2; --quick: 0)")
    ap.add_argument("--clm_curriculum", action="store_true",
                    help="HyperTuning's CLM pretraining (also Table 4's CLM row) through MEND's stage-1 curriculum: "
                         "the like-for-like comparison (about MEND's stage 1 again: ~9 min more in --plain)")
    args = ap.parse_args(argv)
    for name in ("llm_steps", "llm_tries", "l", "stage1_restarts", "stage1_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"argument --{name}: expected an integer >= 1, got {getattr(args, name)}")
    if args.item_words is not None and not 1 <= args.item_words[0] <= args.item_words[1]:
        ap.error(f"argument --item_words: expected 1 <= MIN <= MAX, got {args.item_words[0]} {args.item_words[1]}")
    if args.fillers is not None and not 0 <= args.fillers[0] <= args.fillers[1]:
        ap.error(f"argument --fillers: expected 0 <= MIN <= MAX, got {args.fillers[0]} {args.fillers[1]}")
    if args.distiller_extra_layers is not None and args.distiller_extra_layers < 0:
        ap.error(f"argument --distiller_extra_layers: expected an integer >= 0, got {args.distiller_extra_layers}")
    if args.llm_from is not None and (args.llm_steps or args.llm_tries or args.llm_init):
        ap.error("argument --llm_from: reuses a trained LLM, so --llm_steps / --llm_tries / --llm_init do not apply")
    if args.llm_init == "induction" and args.family != "gpt2":
        ap.error(f"argument --llm_init: induction is for --family gpt2 (learned positions), got {args.family}")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda asked for, but torch.cuda.is_available() is False (a CPU build of torch, "
                 "or no GPU visible); use --device cpu")
    rcfg = RunConfig.quick() if args.quick else RunConfig.plain() if args.plain else RunConfig()
    if args.llm_steps:
        rcfg.llm = dict(rcfg.llm, steps=args.llm_steps)
    if args.llm_tries:
        rcfg.llm = dict(rcfg.llm, tries=args.llm_tries)
    if args.llm_init or args.family != "gpt2":
        rcfg.llm = dict(rcfg.llm, init=args.llm_init or "random")
    if rcfg.llm.get("init", "random") == "random" and not args.quick:  # an LLM learned from scratch: stop 26's
        rcfg.stage1_fallback = STAGE1_FALLBACK                            # first-phase fallback, as until stop 34,
        if not args.plain:                                                # and the warm-ups at lr 2e-3, as until
            rcfg.stage1_warmup = STAGE1_WARMUP_2E3                        # stop 35 (--plain has its own)
    llm = LMConfig(**rcfg.llm)
    if llm.tries > 1 and llm.steps < llm.probe_step:
        ap.error(f"argument --llm_steps: {llm.steps} ends before the LLM's in-context probe at step {llm.probe_step} "
                 f"({llm.tries} tries); raise --llm_steps or pass --llm_tries 1")
    if args.l:
        rcfg.l = args.l
    if args.stage1_restarts:
        rcfg.stage1_restarts = args.stage1_restarts
    if args.stage1_steps:
        rcfg.stage1_steps = args.stage1_steps
    if args.distiller_extra_layers is not None:
        rcfg.distiller_extra_layers = args.distiller_extra_layers
    rcfg.clm_curriculum = args.clm_curriculum
    wcfg = (WorldConfig.quick(args.seed) if args.quick else WorldConfig.plain(args.seed) if args.plain else
            WorldConfig(seed=args.seed))
    if args.fillers is not None:
        wcfg.fillers_per_input = tuple(args.fillers)
    if args.item_words is not None:
        wcfg.item_words = tuple(args.item_words)
    return run_pipeline(args.out, args.family, args.seed, args.quick, args.threads, world_cfg=wcfg, run_cfg=rcfg,
                        device=device, llm_from=args.llm_from)


if __name__ == "__main__":
    main()
