"""train.py: the two training stages of MEND (paper §3.2) and the PromptTuning / HyperTuning baselines, in one
hand-written loop (no Trainer, no accelerate).

  stage pretrain  (meta-distillation pretraining): C4 passages, D = first int(beta*n) tokens, the LLM reads the rest;
                  objective distill (L_distill, Eq. 3; the paper), clm (HyperTuning's conditional LM), clm+distill.
  stage finetune  (meta-distillation finetuning): MetaICL meta-train episodes of --split (K demonstrations + (x, y));
                  objective finetune (L_pred + lam * L_distill, Eq. 4; the paper), pred (L_pred only: the
                  no-L_distill ablation, HyperTuning's finetuning and PromptTuning's default) or distill
                  (L_distill only: the no-L_pred ablation of Table 4).
  --method mend | prompt_tuning (l vectors in LLM space, ignoring D; the PromptTuning baseline, finetune only).

Top to bottom: TrainConfig (the paper's defaults, Table 5 / Appendix A) and argparse; user-error checks (one line,
exit code 1, nothing written); building the frozen LLM, the trainable module and the data stream; atomic
checkpoints (module + optimizer + scaler + scheduler + RNG + data position); validation on the meta-test dev files
with eval.py's scoring and early stopping; the loop (autocast bf16/fp16 + GradScaler, gradient accumulation,
clipping, LR schedule, skipped non-finite steps, progress lines and {out}/log.jsonl); DDP under torchrun.

Connections: model.py (LLM, distiller, tokenizer), data.py (C4Stream, MetaTrainSampler, load_meta_test, collate),
mend.py (MEND, PromptTuning, mend_loss), eval.py (evaluate_tasks / summarize_runs for validation). world.py calls
main(argv) in-process. Run folders: {out}/last (resumable state), {out}/best (the module eval.py loads),
{out}/log.jsonl.
"""
import argparse
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import eval as meval
import mend
import model

STAGES = ("pretrain", "finetune")
OBJECTIVES = {"pretrain": ("distill", "clm", "clm+distill"), "finetune": ("finetune", "pred", "distill")}
METHODS = ("mend", "prompt_tuning")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("linear", "constant", "cosine")
STATE_FILE = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------------------------
# Configuration: the paper's defaults (Table 5, Appendix A; official scripts in the comments where they differ)

@dataclass
class TrainConfig:
    stage: str = "pretrain"             # pretrain (C4) | finetune (MetaICL meta-train of --split)
    split: str = ""                     # finetune: the setting trained on and validated on; pretrain: the setting
                                        # whose meta-test dev files pick the checkpoint ('' = class_to_class, App. A)
    objective: str = ""                 # '' = distill (pretrain) / finetune (finetune; pred for prompt_tuning)
    method: str = "mend"                # mend | prompt_tuning
    init: str = ""                      # finetune: a pretrain checkpoint folder ({out}/best of a pretrain run)
    llm: str = "gpt2-large"             # frozen LLM: hub id or local folder (GPT-2 or T5)
    distiller: str = "gpt2"             # MEND's small LM of the same family (hub id or local folder)
    c4: tuple = ("hub:allenai/c4",)     # C4 shards: files / folders / globs, or hub:allenai/c4 (validation split)
    data_dir: str = "data/metaicl"      # MetaICL folder (config/, data/)
    out: str = ""                       # '' = runs/{stage}-{mend|hypertuning|prompt_tuning}-{split or c4}
    resume: bool = False                # continue {out}/last exactly
    overwrite: bool = False             # allow starting a fresh run in a folder that already holds one
    l: int = 100                        # distillation vectors (placeholders)
    k: int = 16                         # demonstrations per episode
    beta: float = 0.8                   # C4 split: D = first int(beta*n) tokens
    lam: float = 1.0                    # lambda of Eq. 4
    gamma: float = 1.0                  # CLM + gamma * L_distill (Table 4 / Fig. 6a)
    temperature: float = 1.0            # KL temperature (official: 1, no T^2)
    kl_window: str = "paper"            # paper | official (mend.mend_loss)
    placeholder_init: str = "random"    # random N(0, 0.02) | vocab (official finetune asks for vocab, then
                                        # loads the pretrained placeholders over it)
    projection: str = "auto"            # distiller width -> LLM width: auto (official: Linear + tanh when the widths
                                        # differ, identity when equal) | tanh | linear | identity (mend.MEND)
    template: str = "space"             # MetaICL format: space | newline
    max_len: int = 1024                 # C4 passage length (Appendix A)
    min_len: int = 64                   # C4 passages shorter than this (in tokens) are skipped
    lr: float = 5e-5                    # Table 5 (official finetune.sh: 1e-5)
    weight_decay: float = 0.0           # AdamW (0.9, 0.999), eps 1e-8, wd 0 (HF Trainer defaults)
    adam_eps: float = 1e-8
    schedule: str = "linear"            # linear decay to 0 (official, HF default) | constant | cosine
    warmup_steps: int = 0
    max_steps: int = 30000
    batch_size: int = 1                 # episodes per micro-batch per process
    grad_accum: int = 1                 # micro-batches per optimizer step
    grad_clip: float = 1.0              # max grad norm (0 = no clipping)
    eval_every: int = 2000              # validation every N steps and at the last (0 = never; best = the final module)
    save_every: int = 2000              # {out}/last every N steps (and at the end)
    patience: int = 5                   # early stopping: validations without improvement (0 = never stop)
    val_tasks: int = 0                  # validate on the first N (task, seed) entries (0 = all)
    val_max_queries: int = 0            # queries per task for validation (0 = all)
    val_batch_size: int = 16            # (query, option) rows per forward in validation
    precision: str = "auto"             # autocast: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    llm_dtype: str = "fp32"             # frozen LLM weights: fp32 | bf16 | fp16 (GradScaler on; official: int8)
    device: str = ""                    # '' = cuda if available else cpu (cuda:LOCAL_RANK under torchrun)
    seed: int = 100                     # data order and init (official --seed 100)
    log_every: int = 10
    stop_at: int = 0                    # testing: stop after this step without the final save, like a kill

    def run_name(self) -> str:
        """The method a run trains, for its default folder and eval.py's defaults:
        prompt_tuning | mend (distill pretraining, finetune objective) | hypertuning (clm pretraining, and pred
        finetuning of a clm-pretrained --init) | mend-clm_distill (the CLM + gamma*L_distill ablation) |
        mend-pred (pred finetuning of anything else: the "MEND without L_distill" ablation of Table 4) |
        mend-distill (distill finetuning: "MEND without L_pred") | mend-clm (finetune objective from a
        clm-pretrained --init: Table 4's "CLM" pretraining row)."""
        if self.method == "prompt_tuning":
            return "prompt_tuning"
        if self.stage == "pretrain":
            return {"distill": "mend", "clm": "hypertuning"}.get(self.objective, "mend-clm_distill")
        if self.objective == "pred":
            return "hypertuning" if _init_objective(self.init) == "clm" else "mend-pred"
        if self.objective == "distill":
            return "mend-distill"
        return "mend-clm" if _init_objective(self.init) == "clm" else "mend"


def _init_objective(init: str) -> str:
    """The training objective recorded in an --init checkpoint (train_info.json of a best/ folder), or ''."""
    try:
        return str(json.loads((mend.saved_dir(init) / "train_info.json").read_text())["config"]["objective"]) \
            if init else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="MEND training: meta-distillation pretraining (C4) and finetuning "
                                            "(MetaICL), plus the PromptTuning and HyperTuning baselines")
    help_ = {"stage": "pretrain | finetune", "split": "setting (e.g. HR_to_LR, class_to_class, a config/<name>.json)",
             "objective": "pretrain: distill|clm|clm+distill; finetune: finetune|pred|distill",
             "init": "pretrain checkpoint folder for finetuning", "c4": "C4 shards or hub:allenai/c4",
             "out": "run folder", "precision": "auto|fp32|bf16|fp16 (autocast)", "llm_dtype": "fp32|bf16|fp16"}
    for f in fields(TrainConfig):
        name, default = f"--{f.name}", getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(name, action="store_true", help=help_.get(f.name))
        elif isinstance(default, tuple):
            p.add_argument(name, nargs="+", default=list(default), help=help_.get(f.name))
        elif f.name == "l":  # torchrun's own parser reads "--l" as an ambiguous abbreviation: use the alias there
            p.add_argument(name, "--virtual_demo_len", dest="l", type=int, default=default,
                           help="distillation vectors (alias: the official --virtual_demo_len; use it under torchrun)")
        else:
            p.add_argument(name, type=type(default), default=default, help=help_.get(f.name))
    a = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: _tuple(getattr(a, f.name)) if isinstance(getattr(d, f.name), tuple)
                         else getattr(a, f.name) for f in fields(TrainConfig)})
    return check_config(cfg)


def _fail(msg: str):
    """A user error: one line on stderr, exit code 1, no traceback."""
    raise SystemExit(f"train.py: {msg}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Validate the flags that need no file access; fill the stage-dependent defaults."""
    if cfg.stage not in STAGES:
        _fail(f"--stage {cfg.stage!r}: expected one of {', '.join(STAGES)}")
    if cfg.method not in METHODS:
        _fail(f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.method == "prompt_tuning" and cfg.stage != "finetune":
        _fail("--method prompt_tuning: expected --stage finetune (PromptTuning has no pretraining stage)")
    if not cfg.objective:
        cfg.objective = OBJECTIVES[cfg.stage][0] if cfg.method == "mend" or cfg.stage == "pretrain" else "pred"
    if cfg.objective not in OBJECTIVES[cfg.stage]:
        _fail(f"--objective {cfg.objective!r}: expected one of {', '.join(OBJECTIVES[cfg.stage])} "
              f"for --stage {cfg.stage}")
    if cfg.stage == "finetune" and not cfg.split:
        _fail("--split: expected a setting for --stage finetune (e.g. HR_to_LR, class_to_class)")
    if cfg.stage == "pretrain" and not cfg.split:
        cfg.split = "class_to_class"  # Appendix A: pretraining is early-stopped on Class->Class meta-test dev
    for name, choices in (("precision", ("auto",) + tuple(PRECISIONS)), ("llm_dtype", tuple(PRECISIONS)),
                          ("schedule", SCHEDULES), ("kl_window", mend.KL_WINDOWS),
                          ("placeholder_init", mend.INITS), ("projection", mend.PROJECTIONS),
                          ("template", data.TEMPLATES)):
        if getattr(cfg, name) not in choices:
            _fail(f"--{name} {getattr(cfg, name)!r}: expected one of {', '.join(choices)}")
    # numbers: each flag on its own -> "argument --X: expected ..., got V" (NaN and inf are never accepted)
    checks = [(name, getattr(cfg, name) >= 1, ">= 1") for name in ("l", "k", "max_steps", "batch_size",
                                                                   "grad_accum", "log_every", "val_batch_size",
                                                                   "max_len")]
    checks += [(name, getattr(cfg, name) >= 0, ">= 0") for name in ("eval_every", "save_every", "patience",
                                                                    "val_tasks", "val_max_queries", "warmup_steps",
                                                                    "stop_at", "lam", "gamma", "weight_decay")]
    if cfg.stage == "pretrain":  # C4 passages only
        checks += [("min_len", 2 <= cfg.min_len <= cfg.max_len, f"2 <= min_len <= --max_len ({cfg.max_len})")]
    checks += [("beta", 0 < cfg.beta < 1, "0 < beta < 1"),
               ("lr", cfg.lr > 0, "> 0"),
               ("temperature", cfg.temperature > 0, "> 0"),
               ("adam_eps", cfg.adam_eps > 0, "> 0"),
               ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0 = no clipping)")]
    for name, ok, expected in checks:
        value = getattr(cfg, name)
        if not (ok and math.isfinite(value)):
            _fail(f"argument --{name}: expected {expected}, got {value}")
    if cfg.resume and cfg.overwrite:
        _fail("--resume and --overwrite: expected at most one of them")
    return cfg


def default_out(cfg: TrainConfig, setting: str) -> Path:
    """runs/{stage}-{mend|hypertuning|prompt_tuning}-{setting (finetune) | c4 (pretrain)}."""
    return Path(cfg.out or f"runs/{cfg.stage}-{cfg.run_name()}-{setting if cfg.stage == 'finetune' else 'c4'}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed(cfg: TrainConfig):
    """-> (rank, world_size, device). Initialises the process group under torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":  # set_device needs an index: cuda:LOCAL_RANK (0 on one GPU)
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail(f"--device {device}: expected a visible CUDA device (none found); use --device cpu")
        torch.cuda.set_device(torch.device(device))
        model.use_shape_agnostic_attention(device)  # episodes change length every step
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _DistillVia:
    """Routes mend_loss's module(...) / module.distill(...) through the DDP wrapper's forward (so gradients are all-reduced);
    every other attribute comes from the wrapped module."""

    def __init__(self, ddp):
        self.ddp = ddp

    def distill(self, demo_ids, demo_mask):
        return self.ddp(demo_ids, demo_mask)

    __call__ = distill

    def __getattr__(self, name):
        return getattr(self.ddp.module, name)


# ----------------------------------------------------------------------------------------------------------------
# Building: LLM, module, data (every user error here is one line and happens before anything is written)

def load_llm(cfg: TrainConfig, device):
    try:
        llm = model.from_pretrained(cfg.llm, dtype=PRECISIONS[cfg.llm_dtype], device=device)
        tokenizer = model.load_tokenizer(cfg.llm)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"--llm {cfg.llm!r}: expected a local model folder or a Hugging Face hub id that can be fetched now "
              f"({e})")
    return mend.freeze(llm), tokenizer


def _checkpoint_llm(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("llm_name", ""))
    except (OSError, ValueError):
        return ""


def build_module(cfg: TrainConfig, llm, device):
    """MEND (fresh distiller, or --init) or PromptTuning, in fp32 on device, train mode (distiller dropout on,
    as the official code)."""
    torch.manual_seed(cfg.seed)  # the same init on every rank
    if cfg.init:
        path = mend.saved_dir(cfg.init)  # e.g. runs/pretrain-mend/best, or its .best.old after a crash mid-save
        if not (path / "config.json").is_file():
            _fail(f"--init {cfg.init!r}: expected a checkpoint folder with config.json (e.g. runs/pretrain-mend-c4/best)")
        other = _checkpoint_llm(path)
        if other and mend._llm_key(other) != mend._llm_key(cfg.llm):
            _fail(f"--init {cfg.init!r} holds a checkpoint for LLM {other!r}: expected one trained for --llm {cfg.llm!r}")
        try:
            module = mend.load(path, llm_name=cfg.llm, device=device)
        except (ValueError, OSError, RuntimeError) as e:
            _fail(f"--init {cfg.init!r}: expected a MEND/PromptTuning checkpoint loadable for --llm {cfg.llm!r} ({e})")
        if module.d_llm != llm.hidden_size:
            _fail(f"--init {cfg.init!r} produces vectors of width {module.d_llm}: expected the width of --llm "
                  f"{cfg.llm!r} ({llm.hidden_size})")
        if module.l != cfg.l:
            print(f"[train] note: --init {cfg.init} has l={module.l}; --l {cfg.l} is ignored")
        want = mend.PromptTuning if cfg.method == "prompt_tuning" else mend.MEND
        if not isinstance(module, want):
            _fail(f"--init {cfg.init!r} holds a {type(module).__name__} checkpoint: expected {want.__name__} for "
                  f"--method {cfg.method}")
    elif cfg.method == "prompt_tuning":
        init = None
        if cfg.placeholder_init == "vocab":  # rows of the LLM's embedding for l random ids >= 100
            ids = torch.randint(100 if llm.vocab_size > 100 else 0, llm.vocab_size, (cfg.l,))
            init = llm.embed_tokens(ids.to(device)).detach().float().cpu()
        module = mend.PromptTuning(cfg.l, llm.hidden_size, llm_name=cfg.llm, init_embeddings=init).to(device)
    else:
        try:
            distiller = model.from_pretrained(cfg.distiller, dtype=torch.float32, device=device)
        except (FileNotFoundError, ValueError) as e:
            _fail(f"--distiller {cfg.distiller!r}: expected a local model folder or a Hugging Face hub id that can "
                  f"be fetched now ({e})")
        if distiller.is_encoder_decoder != llm.is_encoder_decoder:
            fam = "T5" if llm.is_encoder_decoder else "GPT-2"
            _fail(f"--distiller {cfg.distiller!r}: expected a {fam} model like --llm {cfg.llm!r} (same family)")
        if distiller.vocab_size < llm.vocab_size:
            _fail(f"--distiller {cfg.distiller!r}: vocabulary of {distiller.vocab_size} tokens, expected at least the "
                  f"LLM's {llm.vocab_size} (the distiller reads the LLM tokenizer's ids)")
        if cfg.stage == "finetune":
            print(f"[train] note: finetuning without --init: the distiller {cfg.distiller} starts without "
                  f"meta-distillation pretraining (the 'no pretraining' row of Table 4)")
        module = mend.MEND(distiller, llm.hidden_size, l=cfg.l, init=cfg.placeholder_init, llm_name=cfg.llm,
                           distiller_name=cfg.distiller, projection=cfg.projection)
    return module.float().to(device).train()


def build_stream(cfg: TrainConfig, setting: str, tokenizer, rank: int, world: int):
    """The training episodes of this rank: C4Stream (pretrain) or MetaTrainSampler (finetune). The first episode is
    drawn once and the position rewound, so unreachable data fails here, before anything is written."""
    try:
        if cfg.stage == "pretrain":
            stream = data.C4Stream(list(cfg.c4), tokenizer, beta=cfg.beta, max_len=cfg.max_len, min_len=cfg.min_len,
                                   seed=cfg.seed, rank=rank, world_size=world)
        else:
            stream = data.MetaTrainSampler(cfg.data_dir, setting, tokenizer, k=cfg.k, seed=cfg.seed,
                                           template=cfg.template, rank=rank, world_size=world, verbose=rank == 0)
        state = stream.state_dict()
        next(stream)
        stream.load_state_dict(state)
    except data.DataError as e:
        _fail(f"--{'c4' if cfg.stage == 'pretrain' else 'data_dir'}: {e}")
    return stream


def resolve_split(cfg: TrainConfig) -> str:
    needs_data = cfg.stage == "finetune" or cfg.eval_every > 0
    if needs_data and not Path(cfg.data_dir).is_dir():
        _fail(f"--data_dir {cfg.data_dir!r} does not exist: expected a MetaICL folder with config/ and data/ "
              f"(needed for {'meta-train episodes' if cfg.stage == 'finetune' else 'validation; or pass --eval_every 0'})")
    try:
        return data.resolve_setting(cfg.split, cfg.data_dir if Path(cfg.data_dir).is_dir() else None)
    except data.DataError:
        _fail(f"--split {cfg.split!r}: expected one of {', '.join(data.SETTINGS)} (paper labels like HR_to_LR work "
              f"too) or a setting with config/<name>.json under --data_dir {cfg.data_dir!r}")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder, then swapped in with os.replace; a crash leaves the previous one intact

def atomic_save_dir(dst: Path, write) -> None:
    """write(tmp_dir) fills a fresh folder next to dst; then dst is swapped for it (dst -> .dst.old -> removed).
    A failure inside write() leaves dst untouched; a crash between the two renames leaves .dst.old, which
    mend.saved_dir() falls back to."""
    dst = Path(dst)
    tmp, old = dst.with_name(f".{dst.name}.tmp"), dst.with_name(f".{dst.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in sorted(tmp.rglob("*")) + [tmp]:  # on disk before the rename: a power loss never swaps in
            model.fsync(path)                           # a folder of empty files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)
    model.fsync(dst.parent)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_last(out: Path, module, opt, sched, scaler, state: dict, per_rank: list) -> None:
    """{out}/last: the module (mend.py format, loadable by eval.py) + trainer_state.pt."""
    def write(tmp):
        module.save(tmp)
        torch.save({**state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "per_rank": per_rank},
                   tmp / STATE_FILE)
    atomic_save_dir(out / "last", write)


def save_best(out: Path, module, info: dict) -> None:
    def write(tmp):
        module.save(tmp)
        (tmp / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    atomic_save_dir(out / "best", write)


# ----------------------------------------------------------------------------------------------------------------
# LR schedule and the optimizer step

def lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def optimizer_step(params, opt, scaler, grad_clip: float) -> tuple[float, bool]:
    """Unscale (fp16), clip, step -> (grad norm, skipped). A step whose gradients are not finite is skipped (with
    GradScaler: its own inf check, and the scale is lowered), so the weights never become NaN."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    finite = bool(torch.isfinite(norm))
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(opt)            # skips opt.step() when an inf/NaN was found while unscaling
        scaler.update()
        skipped = scaler.get_scale() < scale or not finite
    else:
        skipped = not finite
        if finite:
            opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), skipped


# ----------------------------------------------------------------------------------------------------------------
# Validation: meta-test dev files of the split (seed 100), scored by eval.py, sharded over the ranks

def load_val_tasks(cfg: TrainConfig, setting: str, tokenizer, rank: int) -> list:
    if cfg.eval_every == 0:
        return []
    try:
        tasks, _ = data.load_meta_test(cfg.data_dir, setting, tokenizer, seeds=(100,), split="dev", k=cfg.k,
                                       template=cfg.template, max_queries=cfg.val_max_queries or None,
                                       verbose=rank == 0)
    except data.DataError as e:
        _fail(f"--data_dir: validation files of {setting}: {e}")
    tasks = tasks[:cfg.val_tasks] if cfg.val_tasks else tasks
    if not tasks and rank == 0:
        print(f"[train] no meta-test dev files for {setting} under {cfg.data_dir}: no validation, "
              f"best = the final module")
    return tasks


def validate(cfg: TrainConfig, llm, module, tasks: list, rank: int, world: int) -> float:
    """Mean over (task, seed) entries of eval.py's metric (macro-F1 / accuracy, percent), computed with
    eval.evaluate_tasks on this rank's share of the tasks and gathered."""
    method = "prompt_tuning" if cfg.method == "prompt_tuning" else "mend"
    mine = meval.evaluate_tasks(llm, method, module, tasks[rank::world], batch_size=cfg.val_batch_size, log=None)
    results = [r for part in _gather(mine, world) for r in part]
    return float(meval.summarize_runs(results)["avg"])


# ----------------------------------------------------------------------------------------------------------------
# The loop

def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _append_log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume: drop the records of steps after the checkpoint (they are recomputed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line half-written when the run was killed
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    model.fsync(tmp)
    os.replace(tmp, path)


# what a run leaves in --out: any of them refuses a fresh run without --resume or --overwrite
RUN_FILES = ("last", "best", ".last.old", ".best.old", "log.jsonl")
# the flags --resume may change: cadence, logging, placement and patience, on which neither the steps' math nor what
# best/ is measured on (--val_tasks, --val_max_queries) depends
RESUME_MAY_CHANGE = ("log_every", "eval_every", "save_every", "stop_at", "device", "val_batch_size", "patience")


def check_resume(cfg: TrainConfig, state: dict, last: Path, precision: str) -> None:
    """--resume continues the same run: every flag outside RESUME_MAY_CHANGE must equal the checkpoint's. LLM names
    are compared as mend._llm_key, folders by the path they resolve to, and --precision by what autocast runs in
    (auto is bf16 on CUDA, fp32 on CPU)."""
    saved, given = dict(state["config"]), asdict(cfg)
    if mend._llm_key(saved["llm"]) != mend._llm_key(cfg.llm):
        _fail(f"--resume: {last} was trained for --llm {saved['llm']!r}: expected --llm {cfg.llm!r}")
    shown = dict(given)  # what the message says was given
    if "precision" in state:
        saved["precision"], given["precision"] = state["precision"], precision
        shown["precision"] = precision if cfg.precision != "auto" else f"auto, i.e. {precision} on this device"

    def same(key):
        a, b = list(_tuple(saved[key])), list(_tuple(given[key]))
        if key in ("init", "data_dir", "c4", "distiller"):
            a, b = [[os.path.realpath(x) if x and not x.startswith("hub:") else x for x in v] for v in (a, b)]
        return a == b

    diff = [f"--{key} {saved[key]!r} (given {shown[key]!r})" for key in given
            if key not in RESUME_MAY_CHANGE + ("out", "resume", "overwrite", "llm") and key in saved and not same(key)]
    if diff:
        _fail(f"--resume: {last} was trained with {', '.join(diff)}: expected the same values (only "
              f"{', '.join('--' + k for k in RESUME_MAY_CHANGE)} may change on resume)")


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    setting = resolve_split(cfg)
    out = default_out(cfg, setting)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    last = mend.saved_dir(out / "last")  # or .last.old after a crash mid-save
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and not (last / STATE_FILE).is_file():
        if found:  # killed before its first save: best/ and log.jsonl, nothing to continue from
            _fail(f"--resume: expected a checkpoint at {out / 'last'} (none found; --out holds only "
                  f"{', '.join(found)}): use --overwrite to restart the run")
        _fail(f"--resume: expected a checkpoint at {out / 'last'} (none found); drop --resume to start a new run")
    if not cfg.resume and not cfg.overwrite and found:
        if (last / STATE_FILE).is_file():
            _fail(f"--out {str(out)!r} already holds a run: expected --resume to continue it or --overwrite to "
                  f"restart")
        _fail(f"--out {str(out)!r} already holds a run without a checkpoint ({', '.join(found)}): expected "
              f"--overwrite to restart it (or another --out)")
    state = None
    if cfg.resume:
        state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=False)
        check_resume(cfg, state, last, precision)

    llm, tokenizer = load_llm(cfg, device)
    if cfg.resume:
        try:
            module = mend.load(last, llm_name=cfg.llm, device=device).float().train()
        except (ValueError, OSError, RuntimeError) as e:
            _fail(f"--resume: {last}: expected a checkpoint loadable for --llm {cfg.llm!r} ({e})")
    else:
        module = build_module(cfg, llm, device)
    stream = build_stream(cfg, setting, tokenizer, rank, world)
    val_tasks = load_val_tasks(cfg, setting, tokenizer, rank)
    pad_id = int(getattr(llm.config, "pad_token_id", None) or 0)

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    amp = torch.autocast(device.type, dtype=PRECISIONS[precision]) if precision != "fp32" else nullcontext()
    # fp16 anywhere in the backward pass (autocast or the frozen LLM's weights): gradients below 6e-8 flush to 0
    # unless the loss is scaled, so the GradScaler runs whenever either is fp16
    scaler = torch.amp.GradScaler(device.type) if "fp16" in (precision, cfg.llm_dtype) else None
    trainable = module
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
        trainable = _DistillVia(ddp)

    step, best, best_step, bad_evals, skipped_total, val_step = 0, -math.inf, 0, 0, 0, -1
    window, n_win = {}, 0  # summed loss terms since the last progress line (this rank), and their step count
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        bad_evals, skipped_total, val_step = state["bad_evals"], state["skipped"], state.get("val_step", -1)
        if state.get("early_stopped"):
            if master:
                print(f"[train] {last} ended by early stopping at step {step}: nothing to resume")
            return {"out": str(out), "step": step, "best": best, "best_step": best_step, "early_stopped": True,
                    "skipped": skipped_total, "log": []}
        mine = state["per_rank"][rank if len(state["per_rank"]) == world else 0]
        try:
            stream.load_state_dict(mine["data"])
        except data.DataError as e:
            _fail(f"--resume: data position of {last}: {e}")
        _set_rng_state(mine["rng"])
        window = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in mine.get("window", {}).items()}
        n_win = mine.get("n_win", 0)  # the first progress line after a resume averages the same steps as without
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout streams (rank 0 = the single-process run)

    log_path = out / "log.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            _truncate_log(log_path, step)
        else:  # a fresh run (--overwrite): the old run's log and checkpoints go
            for path in (out / name for name in RUN_FILES):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        n_train = sum(p.numel() for p in params)
        print(f"[train] {cfg.stage}/{cfg.objective} method={cfg.run_name()} llm={cfg.llm} "
              f"distiller={cfg.distiller if cfg.method == 'mend' else '-'} split={setting} world={world} "
              f"device={device} precision={precision} llm_dtype={cfg.llm_dtype} trainable={n_train:,} "
              f"global batch={cfg.batch_size * cfg.grad_accum * world} out={out}"
              + (f" (resumed at step {step})" if cfg.resume else ""))

    def snapshot():
        per_rank = _gather({"data": stream.state_dict(), "rng": _rng_state(), "n_win": n_win,
                            "window": {k: float(v) for k, v in window.items()}}, world)
        if master:
            save_last(out, module, opt, sched, scaler,
                      {"step": step, "best": best, "best_step": best_step, "bad_evals": bad_evals,
                       "skipped": skipped_total, "early_stopped": stopped_early, "val_step": val_step,
                       "precision": precision, "config": asdict(cfg), "world_size": world}, per_rank)

    def evaluate():
        nonlocal best, best_step, bad_evals, val_step
        val_step = step
        with amp:
            score = validate(cfg, llm, module, val_tasks, rank, world)
        improved = score > best
        if improved:
            best, best_step, bad_evals = score, step, 0
            if master:
                save_best(out, module, {"step": step, "val_score": score, "split": setting, "config": asdict(cfg)})
        else:
            bad_evals += 1
        if master:
            print(f"[val] step {step}: dev score {score:.2f} (best {best:.2f} at step {best_step}; "
                  f"{bad_evals}/{cfg.patience} without improvement)")
            _append_log(log_path, {"type": "val", "step": step, "val_score": score, "best": best,
                                   "best_step": best_step, "bad_evals": bad_evals})
        return cfg.patience > 0 and bad_evals >= cfg.patience

    tok_win, t_win, t_start, step0 = 0, time.time(), time.time(), step
    stopped_early, losses_seen = False, []
    while step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            episodes = [next(stream) for _ in range(cfg.batch_size)]
            batch = data.collate(episodes, pad_id)
            tok_win += int(batch.demo_mask.sum() + batch.query_mask.sum() + batch.target_mask.sum())  # on CPU: no sync
            batch = batch.to(device, non_blocking=True)
            sync = ddp.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
            with sync:
                with amp:
                    terms = mend.mend_loss(llm, trainable, batch, cfg.objective, lam=cfg.lam, gamma=cfg.gamma,
                                           temperature=cfg.temperature, kl_window=cfg.kl_window)
                loss = terms["loss"].float() / cfg.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for key, v in terms.items():
                window[key] = window.get(key, 0.0) + v.detach().float() / cfg.grad_accum
        lr = sched.get_last_lr()[0]  # the rate this step used
        norm, skipped = optimizer_step(params, opt, scaler, cfg.grad_clip)
        skipped_total += skipped
        with warnings.catch_warnings():  # a skipped fp16 step still advances the schedule: lr is a function of step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            sched.step()
        step += 1
        n_win += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            keys = sorted(window)
            vals = _all_reduce_mean(torch.stack([window[k] for k in keys]).to(device) / n_win, world)
            toks = _all_reduce_mean(torch.tensor(float(tok_win), device=device), world).item() * world
            now = time.time()
            rec = {"type": "train", "step": step, **{k: float(v) for k, v in zip(keys, vals.tolist())},
                   "lr": lr, "grad_norm": norm, "tokens_per_s": toks / max(now - t_win, 1e-9),
                   "skipped": skipped_total}
            rec["eta_s"] = (now - t_start) / max(step - step0, 1) * (cfg.max_steps - step)
            if device.type == "cuda":  # peak GPU memory of this rank since the start (the README's footprint figures)
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            losses_seen.append(rec)
            if master:
                terms_s = " ".join(f"{k} {rec[k]:.4f}" for k in keys if k != "loss")
                print(f"[train] step {step}/{cfg.max_steps} | loss {rec['loss']:.4f} ({terms_s}) | lr {rec['lr']:.2e} "
                      f"| {rec['tokens_per_s']:.0f} tok/s | grad {norm:.2f} | skipped {skipped_total} "
                      f"| ETA {_fmt_time(rec['eta_s'])}"
                      + (f" | peak {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else ""), flush=True)
                _append_log(log_path, rec)
            window, n_win, tok_win, t_win = {}, 0, 0, now

        if cfg.eval_every and val_tasks and step % cfg.eval_every == 0:
            if evaluate():
                stopped_early = True
                if master:
                    print(f"[train] early stop at step {step}: {cfg.patience} validations without improvement")
                break
        if cfg.stop_at and step >= cfg.stop_at:
            if world > 1:
                dist.barrier()
            return {"out": str(out), "step": step, "stopped": "stop_at", "log": losses_seen}
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            snapshot()

    if val_tasks and val_step != step:  # the steps after the last validation (or all of them) count too
        evaluate()
    snapshot()
    if not val_tasks and master:  # no validation: the final module is the one eval.py gets
        save_best(out, module, {"step": step, "val_score": None, "split": setting, "config": asdict(cfg)})
    if world > 1:
        dist.barrier()
    if master:
        print(f"[train] done at step {step} in {_fmt_time(time.time() - t_start)}; best dev score "
              f"{best if val_tasks else float('nan'):.2f} at step {best_step}; skipped steps {skipped_total}; "
              + (f"best module in {out / 'best'}" if (out / "best").is_dir() else "no best module (no finite "
                 "dev score)"))
    return {"out": str(out), "step": step, "best": best, "best_step": best_step, "early_stopped": stopped_early,
            "skipped": skipped_total, "log": losses_seen}


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
