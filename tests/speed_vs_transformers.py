"""Speed check (a script, not a pytest test): forward of model.py's GPT-2 vs transformers' GPT2LMHeadModel on the
same random gpt2-small-shaped weights (n_layer 12, n_embd 768, vocab 50257), CPU fp32, inference mode.

    .venv/bin/python tests/speed_vs_transformers.py --T 1024 --runs 5

Both models are timed alternately (ours, theirs, ours, ...) after one warm-up each; the medians and the ratio
ours / transformers are printed (< 1 means ours is faster). transformers is test-only; model.py never imports it.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=1024, help="sequence length")
    ap.add_argument("--B", type=int, default=1, help="batch size")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention kernel")
    ap.add_argument("--mask", action="store_true", help="pass an all-ones attention_mask (boolean-mask path)")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # gpt2-small shape, random weights
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation=args.attn).eval()
        ours = model.from_pretrained(d)
    ids = torch.randint(0, 50257, (args.B, args.T))
    kw = dict(attention_mask=torch.ones_like(ids)) if args.mask else {}

    with torch.inference_mode():
        diff = (ours(ids, **kw).logits - ref(ids, **kw).logits).abs().max().item()  # also the warm-up
        times = {"ours": [], "transformers": []}
        for _ in range(args.runs):
            for name, m in (("ours", ours), ("transformers", ref)):
                t0 = time.perf_counter()
                m(ids, **kw)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (attn={args.attn}), "
          f"threads {torch.get_num_threads()}, B={args.B} T={args.T} fp32 CPU, mask={args.mask}, "
          f"max-abs logits diff {diff:.2e}")
    for k, v in times.items():
        print(f"{k:>12}: median {med[k]:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in v)})")
    print(f"ratio ours / transformers = {med['ours'] / med['transformers']:.3f}")


if __name__ == "__main__":
    main()
