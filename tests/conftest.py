"""Shared pytest fixtures: the real data in ../shared/data (skipped with a reason when absent), a tiny BPE
tokenizer trained here, and tiny random GPT-2 / T5 checkpoints saved in the Hugging Face layout by model.py.

Everything is offline and deterministic (fixed seeds); session-scoped so the suite builds each thing once.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is a set of top-level modules, not a package

SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# Tiny models on a 2-core CI machine: one intra-op thread is 5-10x faster than two threads fighting for the
# cores (measured on test_mend/test_eval), and keeps timings stable. DDP tests set their own per process.
torch.set_num_threads(1)

def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_left_padding_and_holes(ours, ref, rows, tol):
    """Decoder-only parity under padding: each of `rows` (1-D id tensors, rows[0] the longest, >= 9 tokens)
    left-padded into one batch, and rows[0] with a 2-token hole + right padding, give the logits `ref` gives the
    unpadded row (positions come from the mask). Returns the holed input, its mask and our logits at its real
    tokens, for further checks."""
    T = len(rows[0])
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits
        assert not out.isnan().any()
        for b, r in enumerate(rows):
            assert maxdiff(out[b, T - len(r):], ref(r[None]).logits[0]) <= tol
        r = rows[0]  # a hole in the middle + right padding: invisible to the tokens after it
        holed = torch.cat([r[:4], torch.tensor([0, 0]), r[4:9], torch.tensor([0])])[None]
        hmask = torch.tensor([[1] * 4 + [0, 0] + [1] * 5 + [0]])
        got = ours(holed, attention_mask=hmask).logits[0][hmask[0].bool()]
        assert maxdiff(got, ref(r[None, :9]).logits[0]) <= tol
    return holed, hmask, got


# A few sentences in the style of the tiny world and the MetaICL prompts; enough for a 400-token BPE.
TINY_TEXT = [
    "the red cube is heavy . label : alpha",
    "the blue sphere is light . label : beta",
    "question : what colour is the sky ? answer : blue",
    "sentence 1 : a cat sat . sentence 2 : a dog ran . entailment",
    "Hello world! This is a tiny corpus for a tiny tokenizer, with numbers 0 1 2 3 4 5 6 7 8 9.",
    "positive negative neutral contradiction entailment yes no true false",
] * 20


def shared_path(*parts) -> Path:
    """Path under ../shared/data, or skip the test with a clear reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is absent (real-data test)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 400) trained on TINY_TEXT; id 0 is <pad>, 1 is <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT, trainer=trainer)
    return tok


def _save_tiny(tmp_path_factory, name, config, tokenizer):
    import model

    torch.manual_seed(0)
    lm = model.build_model(config)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(lm, out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer, d=64 GPT-2 (the tiny 'LLM'), saved as config.json + model.safetensors + tokenizer.json."""
    cfg = dict(model_type="gpt2", vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=512, n_embd=64,
               n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1)
    return _save_tiny(tmp_path_factory, "tiny-gpt2", cfg, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_distiller_dir(tmp_path_factory, tiny_tokenizer):
    """A narrower GPT-2 (d=32) as the distiller, so the projection to the LLM width is exercised."""
    cfg = dict(model_type="gpt2", vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=512, n_embd=32,
               n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    return _save_tiny(tmp_path_factory, "tiny-gpt2-distiller", cfg, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tiny_tokenizer):
    """A 2+2-layer T5 v1.1 (gated-GELU, untied head, d_kv*heads != d_model) as the tiny encoder-decoder LLM."""
    cfg = dict(model_type="t5", vocab_size=tiny_tokenizer.get_vocab_size(), d_model=64, d_kv=8, d_ff=128,
               num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _save_tiny(tmp_path_factory, "tiny-t5", cfg, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_t5_distiller_dir(tmp_path_factory, tiny_tokenizer):
    """A narrower T5 (d=32) whose encoder serves as the distiller for the tiny T5 LLM."""
    cfg = dict(model_type="t5", vocab_size=tiny_tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=64,
               num_layers=2, num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _save_tiny(tmp_path_factory, "tiny-t5-distiller", cfg, tiny_tokenizer)


def write_tiny_metaicl(root: Path, tokens_per_input: int = 6) -> Path:
    """A MetaICL-layout folder with 3 meta-train and 2 meta-test classification tasks and one setting
    `tiny` (config/tiny.json). Every task maps a colour word to its own label word, so ICL can solve it."""
    import json
    import random

    rng = random.Random(0)
    colours = ["red", "blue", "green", "yellow"]
    tasks = {"train_a": ["alpha", "beta"], "train_b": ["yes", "no"], "train_c": ["true", "false"],
             "test_a": ["positive", "negative"], "test_b": ["entailment", "contradiction"]}
    (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
    json.dump({"train": ["train_a", "train_b", "train_c"], "test": ["test_a", "test_b"]},
              open(root / "config" / "tiny.json", "w"))
    for task, labels in tasks.items():
        json.dump({"task_type": "classification", "options": labels}, open(root / "config" / "tasks" / f"{task}.json", "w"))
        (root / "data" / task).mkdir(parents=True, exist_ok=True)
        for seed in (100, 13, 21, 42, 87):
            for split, n in (("train", 16), ("dev", 16), ("test", 8)):
                if split == "test" and seed != 100:
                    continue  # as in ../shared/data: test files under seed 100 only
                with open(root / "data" / task / f"{task}_16_{seed}_{split}.jsonl", "w") as f:
                    for _ in range(n):
                        c = rng.randrange(len(colours))
                        words = [colours[c]] + [rng.choice(["cube", "sphere", "cat", "dog"]) for _ in range(tokens_per_input - 1)]
                        f.write(json.dumps({"task": task, "input": " ".join(words), "output": labels[c % 2],
                                            "options": labels}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_metaicl_dir(tmp_path_factory):
    return write_tiny_metaicl(tmp_path_factory.mktemp("metaicl"))
