"""Tests for mend.py: the distiller (padding invariance, both families), conditioning of the frozen LLM (alignment
against a direct forward, padding invariance, prefix cache == no cache), the losses against hand-computed values,
gradients (distiller yes, LLM no), checkpoints (bit-exact round trip, refusal for another LLM) and a 50-step overfit.
Tiny random models from conftest; CPU; deterministic."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mend
import model

ATOL = 1e-5


def close(a, b, tol=ATOL):
    """max |a - b| <= tol, relative to the magnitude when above 1 (tiny T5's logits reach ~20: fp32 rounding)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())



def make_batch(rows, pad=0):
    """rows: list of (demo_ids, query_ids, target_ids) lists -> an EpisodeBatch-like object, right-padded."""
    def pad_seg(seqs):
        T = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids, mask
    d, dm = pad_seg([r[0] for r in rows])
    q, qm = pad_seg([r[1] for r in rows])
    t, tm = pad_seg([r[2] for r in rows])
    return SimpleNamespace(demo_ids=d, demo_mask=dm, query_ids=q, query_mask=qm, target_ids=t, target_mask=tm)


def rand_ids(g, n):
    return torch.randint(2, 400, (n,), generator=g).tolist()


def make_rows(seed=0, lens=((13, 5, 3), (7, 2, 4), (20, 6, 1))):
    g = torch.Generator().manual_seed(seed)
    return [(rand_ids(g, a), rand_ids(g, b), rand_ids(g, c)) for a, b, c in lens]


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def family(request, tiny_gpt2_dir, tiny_gpt2_distiller_dir, tiny_t5_dir, tiny_t5_distiller_dir):
    """(llm, llm_dir, distiller_dir) for one family; the LLM frozen, everything in eval mode (no dropout)."""
    llm_dir, dist_dir = ((tiny_gpt2_dir, tiny_gpt2_distiller_dir) if request.param == "gpt2"
                         else (tiny_t5_dir, tiny_t5_distiller_dir))
    llm = mend.freeze(model.from_pretrained(llm_dir))
    return SimpleNamespace(name=request.param, llm=llm, llm_dir=llm_dir, dist_dir=dist_dir)


def build_mend(fam, l=4, init="random", seed=0, projection="auto"):
    torch.manual_seed(seed)
    distiller = model.from_pretrained(fam.dist_dir)
    return mend.MEND(distiller, fam.llm.hidden_size, l=l, init=init, llm_name=str(fam.llm_dir),
                     distiller_name=str(fam.dist_dir), projection=projection).eval()


def row(batch, i):
    return SimpleNamespace(**{k: v[i:i + 1, :int(getattr(batch, k.replace("ids", "mask"))[i].sum())]
                              for k, v in vars(batch).items()})


# -------------------------------------------------------------------------------------------------------------- losses

def test_kl_matches_hand_computation():
    teacher = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [9.0, -9.0, 3.0]]])
    student = torch.tensor([[[0.5, 0.5, 2.0], [3.0, 1.0, -1.0], [1.0, 1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position (garbage) is excluded

    def kl(t, s, T=1.0):
        pt = [math.exp(v / T) for v in t]
        pt = [v / sum(pt) for v in pt]
        ps = [math.exp(v / T) for v in s]
        ps = [v / sum(ps) for v in ps]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps))

    for T in (1.0, 2.0):
        want = (kl([1.0, 2.0, 0.5], [0.5, 0.5, 2.0], T) + kl([0.0, 0.0, 0.0], [3.0, 1.0, -1.0], T)) / 2
        got = mend.kl_distill_loss(teacher, student, mask, temperature=T).item()
        assert abs(got - want) < 1e-6, (T, got, want)
    # forward KL(teacher || student), not the reverse
    rev = (kl([0.5, 0.5, 2.0], [1.0, 2.0, 0.5]) + kl([3.0, 1.0, -1.0], [0.0, 0.0, 0.0])) / 2
    assert abs(mend.kl_distill_loss(teacher, student, mask).item() - rev) > 1e-3


def test_kl_is_zero_for_equal_logits_and_handles_bf16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert mend.kl_distill_loss(x, x.clone(), mask).item() == pytest.approx(0.0, abs=1e-7)
    assert mend.kl_distill_loss(x.bfloat16(), x.bfloat16(), mask).dtype == torch.float32
    assert mend.kl_distill_loss(x, x + 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert mend.kl_distill_loss(x, torch.randn(2, 5, 11, generator=g), mask).item() > 0.01
    assert mend.kl_distill_loss(x, x, torch.zeros_like(mask)).item() == 0.0


def test_pred_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]], [[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]]])
    target = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    nll = lambda z, k: -(z[k] - math.log(sum(math.exp(v) for v in z)))
    want = (nll([2.0, 0.0, 1.0], 0) + nll([0.0, 3.0, 0.0], 1) + nll([1.0, 1.0, 1.0], 2)) / 3
    assert mend.pred_loss(logits, target, mask).item() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------- distiller

@pytest.mark.parametrize("init", ["random", "vocab"])
def test_distill_shape_and_padding_invariance(family, init):
    m = build_mend(family, l=4, init=init)
    batch = make_batch(make_rows(1, ((13, 1, 1), (3, 1, 1), (25, 1, 1), (0, 1, 1))))
    with torch.no_grad():
        S = m.distill(batch.demo_ids, batch.demo_mask)
        assert S.shape == (4, 4, family.llm.hidden_size)
        assert S.abs().max() <= 1.0  # tanh projection (distiller 32 wide -> LLM 64)
        for i in range(4):
            alone = m.distill(*[t[i:i + 1, :int(batch.demo_mask[i].sum())] for t in (batch.demo_ids, batch.demo_mask)])
            assert (S[i:i + 1] - alone).abs().max() <= ATOL
        # left padding (holes anywhere) gives the same as right padding
        ids, msk = batch.demo_ids.clone(), batch.demo_mask.clone()
        n = int(msk[1].sum())
        ids[1] = torch.cat([ids[1, n:], ids[1, :n]])
        msk[1] = torch.cat([msk[1, n:], msk[1, :n]])
        assert (m.distill(ids, msk) - S).abs().max() <= ATOL
        # different demonstrations give different vectors
        assert (S[0] - S[1]).abs().max() > 1e-4


def test_placeholder_init_and_projection_modes(family):
    m = build_mend(family, l=6, init="random")
    assert m.placeholders.shape == (6, 32) and abs(m.placeholders.std().item() - 0.02) < 0.01
    v = build_mend(family, l=6, init="vocab")
    emb = v.distiller.embed_tokens(torch.arange(v.distiller.vocab_size))
    assert all(any(torch.equal(p, e) for e in emb[100:]) for p in v.placeholders)
    lin = build_mend(family, l=3, projection="linear")
    batch = make_batch(make_rows(2))
    with torch.no_grad():
        S = lin.distill(batch.demo_ids, batch.demo_mask)
    assert lin.projection == "linear" and S.shape == (3, 3, 64)
    with pytest.raises(ValueError, match="identity"):
        build_mend(family, projection="identity")  # 32 != 64


# -------------------------------------------------------------------------------------------------------- conditioning

def direct_logits(llm, batch, i, with_demos):
    """Row i scored with a plain forward on token ids (no packing): (query logits, target logits)."""
    r = row(batch, i)
    if llm.is_encoder_decoder:
        enc = torch.cat([r.demo_ids, r.query_ids], 1) if with_demos else r.query_ids
        out = llm(input_ids=enc, decoder_input_ids=llm.shift_right(r.target_ids))
        return None, out.logits
    ids = torch.cat([r.demo_ids, r.query_ids, r.target_ids], 1) if with_demos else torch.cat([r.query_ids, r.target_ids], 1)
    lg = llm(input_ids=ids).logits
    Tq, Ty = r.query_ids.size(1), r.target_ids.size(1)
    T = ids.size(1)
    lg = torch.cat([torch.zeros_like(lg[:, :1]), lg], 1)  # no predictor before the first token: zeros
    prev = lg[:, T - Ty - Tq:T]  # the position before each x/y token
    return prev[:, :Tq], prev[:, Tq:]


@pytest.mark.parametrize("context", [None, "demonstrations"])
def test_llm_logits_align_with_a_direct_forward(family, context):
    llm = family.llm
    batch = make_batch(make_rows(3))
    with torch.no_grad():
        seg = mend.llm_logits(llm, batch, context)
        for i in range(3):
            q, y = direct_logits(llm, batch, i, context is not None)
            ny, nq = int(batch.target_mask[i].sum()), int(batch.query_mask[i].sum())
            assert close(seg.target[i, :ny], y[0])
            if llm.is_encoder_decoder:
                assert seg.query is None
            elif context is None:  # zero-shot: the first query token has no predictor -> zero logits
                assert seg.query[i, 0].abs().max() == 0
                assert close(seg.query[i, 1:nq], q[0, 1:])
            else:
                assert close(seg.query[i, :nq], q[0])


def test_query_logits_false_skips_x_and_keeps_targets(family):
    llm = family.llm
    batch = make_batch(make_rows(3))
    with torch.no_grad():
        for context in (None, "demonstrations"):
            full = mend.llm_logits(llm, batch, context)
            lean = mend.llm_logits(llm, batch, context, query_logits=False)
            assert lean.query is None
            assert torch.equal(lean.target, full.target)
            if not llm.is_encoder_decoder:
                assert torch.equal(lean.after, full.after)


def test_sd_conditioning_batch_equals_rows_alone(family):
    m = build_mend(family)
    batch = make_batch(make_rows(4))
    with torch.no_grad():
        S = m.distill(batch.demo_ids, batch.demo_mask)
        seg = mend.llm_logits(family.llm, batch, S)
        for i in range(3):
            r = row(batch, i)
            alone = mend.llm_logits(family.llm, r, m.distill(r.demo_ids, r.demo_mask))
            ny, nq = r.target_ids.size(1), r.query_ids.size(1)
            assert close(seg.target[i, :ny], alone.target[0])
            if not family.llm.is_encoder_decoder:
                assert close(seg.query[i, :nq], alone.query[0])
                assert close(seg.after[i], alone.after[0])
        if not family.llm.is_encoder_decoder:  # S_D really is the prefix: concat(S_D, E_x, E_y) by hand
            r = row(batch, 0)
            emb = torch.cat([S[:1], family.llm.embed_tokens(torch.cat([r.query_ids, r.target_ids], 1))], 1)
            lg = family.llm(inputs_embeds=emb).logits
            assert close(seg.query[0, :5], lg[0, m.l - 1:m.l + 4])


def test_prefix_cache_equals_uncached(family):
    llm = family.llm
    m = build_mend(family)
    g = torch.Generator().manual_seed(5)
    demo, x = rand_ids(g, 11), rand_ids(g, 4)
    targets = [rand_ids(g, n) for n in (3, 1, 5)]
    with torch.no_grad():
        S = m.distill(torch.tensor([demo]), torch.ones(1, len(demo), dtype=torch.long))  # (1, l, d)
        batch = make_batch([(demo, x, y) for y in targets])
        assert torch.equal(mend.llm_logits(llm, batch, S).target, mend.llm_logits(llm, batch, S.expand(3, -1, -1)).target)
        for ctx, cache_ctx in (("demonstrations", torch.tensor(demo)), (S.expand(3, -1, -1), S)):
            ref = mend.llm_logits(llm, batch, ctx)
            with_x = mend.prefix_cache(llm, cache_ctx, query_ids=torch.tensor(x))
            got = mend.llm_logits(llm, batch, cache=with_x)
            for i, y in enumerate(targets):
                assert close(got.target[i, :len(y)], ref.target[i, :len(y)])
            if not llm.is_encoder_decoder:
                got2 = mend.llm_logits(llm, batch, cache=mend.prefix_cache(llm, cache_ctx))  # demos only cached
                assert close(got2.query, ref.query)
                for i, y in enumerate(targets):
                    assert close(got2.target[i, :len(y)], ref.target[i, :len(y)])
                    assert close(got.after[i], ref.after[i])
            else:
                with pytest.raises(ValueError, match="whole encoder input"):
                    mend.llm_logits(llm, batch, cache=mend.prefix_cache(llm, cache_ctx))


# ------------------------------------------------------------------------------------------------------------ training

def test_gradients_reach_distiller_not_llm(family):
    m = build_mend(family)
    batch = make_batch(make_rows(6))
    out = mend.mend_loss(family.llm, m, batch, "finetune", lam=0.5)
    assert set(out) == {"loss", "pred", "distill"}
    assert abs(out["loss"].item() - (out["pred"].item() + 0.5 * out["distill"].item())) < 1e-5
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in family.llm.parameters())
    assert m.placeholders.grad.abs().sum() > 0
    assert m.proj.weight.grad.abs().sum() > 0 and m.proj.bias.grad.abs().sum() > 0
    trainable = [(n, p) for n, p in m.distiller.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable
                             if "relative_attention_bias" not in n or "encoder.block.0" in n)
    if family.llm.is_encoder_decoder:  # only the T5 encoder (and shared embeddings) train
        assert all(n.startswith(("encoder.", "shared.")) for n, _ in trainable)


def test_gradients_repeat_bit_for_bit_on_two_threads(family):
    """The same step twice gives the same gradients, bit for bit, with 2 CPU threads (the tiny world's setting).
    Regression: indexing the placeholders (P[slot]) accumulated their gradient with index_put_, whose summation
    order varied between runs on 2 threads (this test failed on that code)."""
    m = build_mend(family, l=8)
    g = torch.Generator().manual_seed(3)
    batch = make_batch([(rand_ids(g, 40 + 7 * i), rand_ids(g, 3), rand_ids(g, 4)) for i in range(32)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            m.zero_grad(set_to_none=True)
            mend.mend_loss(family.llm, m, batch, "distill")["loss"].backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert "placeholders" in grads[0]
    for other in grads[1:]:
        assert [n for n in grads[0] if not torch.equal(grads[0][n], other[n])] == []


@pytest.mark.parametrize("objective", ["distill", "clm", "clm+distill", "pred"])
def test_objectives(family, objective):
    m = build_mend(family)
    batch = make_batch(make_rows(7))
    out = mend.mend_loss(family.llm, m, batch, objective, gamma=2.0)
    keys = {"distill": {"distill"}, "clm": {"clm"}, "clm+distill": {"clm", "distill"}, "pred": {"pred"}}[objective]
    assert set(out) == keys | {"loss"} and all(torch.isfinite(v) for v in out.values())
    if objective == "clm+distill":
        assert abs(out["loss"].item() - (out["clm"].item() + 2.0 * out["distill"].item())) < 1e-5
    if "distill" in out:  # L_distill is Eq. 3 over the query positions: x and y (GPT-2), y (T5)
        with torch.no_grad():
            t = mend.llm_logits(family.llm, batch, "demonstrations")
            st = mend.llm_logits(family.llm, batch, m.distill(batch.demo_ids, batch.demo_mask))
            if family.llm.is_encoder_decoder:
                ref = mend.kl_distill_loss(t.target, st.target, batch.target_mask)
            else:
                ref = mend.kl_distill_loss(torch.cat([t.query, t.target], 1), torch.cat([st.query, st.target], 1),
                                           torch.cat([batch.query_mask, batch.target_mask], 1))
        assert ref.item() > 1e-4 and abs(out["distill"].item() - ref.item()) < 1e-5 * max(1.0, ref.item())


def test_official_kl_window_differs_and_works(tiny_gpt2_dir, tiny_gpt2_distiller_dir):
    fam = SimpleNamespace(llm=mend.freeze(model.from_pretrained(tiny_gpt2_dir)), llm_dir=tiny_gpt2_dir,
                          dist_dir=tiny_gpt2_distiller_dir)
    m = build_mend(fam)
    batch = make_batch(make_rows(8, ((9, 0, 6), (4, 0, 3))))  # C4-like: x empty
    with torch.no_grad():
        paper = mend.mend_loss(fam.llm, m, batch, "distill")["distill"]
        official = mend.mend_loss(fam.llm, m, batch, "distill", kl_window="official")["distill"]
        # by hand: positions y_1..y_{n-1} plus the one after the last token
        S = m.distill(batch.demo_ids, batch.demo_mask)
        s, t = mend.llm_logits(fam.llm, batch, S), mend.llm_logits(fam.llm, batch, "demonstrations")
        kls = []
        for i, n in enumerate((6, 3)):
            ts = torch.cat([t.target[i, 1:n], t.after[i:i + 1]])
            ss = torch.cat([s.target[i, 1:n], s.after[i:i + 1]])
            kls.append(F.kl_div(F.log_softmax(ss, -1), F.log_softmax(ts, -1), log_target=True, reduction="none").sum(-1))
        want = torch.cat(kls).mean()
    assert abs(official.item() - want.item()) < 1e-5 and abs(official.item() - paper.item()) > 1e-6


@pytest.mark.parametrize("fam_name", ["gpt2", "t5"])
def test_overfit_one_episode_cuts_distill_loss(fam_name, tiny_gpt2_dir, tiny_gpt2_distiller_dir, tiny_t5_dir,
                                               tiny_t5_distiller_dir):
    llm_dir, dist_dir = ((tiny_gpt2_dir, tiny_gpt2_distiller_dir) if fam_name == "gpt2"
                         else (tiny_t5_dir, tiny_t5_distiller_dir))
    fam = SimpleNamespace(llm=mend.freeze(model.from_pretrained(llm_dir)), llm_dir=llm_dir, dist_dir=dist_dir)
    # one episode with |D| = l: a zero-KL solution exists (S_D = E_D), so the tiny random GPT-2, whose attention
    # is nearly uniform, has no structural KL floor (with l < |D| it plateaus at ~60% of the start)
    m = build_mend(fam, l=16)
    batch = make_batch(make_rows(9, ((16, 4, 4),)))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(50):
        loss = mend.mend_loss(fam.llm, m, batch, "distill")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = mend.mend_loss(fam.llm, m, batch, "distill")["loss"].item()
    print(f"overfit {fam_name}: L_distill {losses[0]:.4g} -> {final:.4g} after 50 steps ({final / losses[0]:.2%})")
    assert final <= 0.2 * losses[0], (losses[0], final)


# ----------------------------------------------------------------------------------------------- baseline, checkpoints

def test_prompt_tuning(family, tmp_path):
    torch.manual_seed(0)
    pt = mend.PromptTuning(5, family.llm.hidden_size, llm_name=str(family.llm_dir))
    batch = make_batch(make_rows(10))
    S = pt.distill(batch.demo_ids, batch.demo_mask)
    assert S.shape == (3, 5, family.llm.hidden_size) and torch.equal(S[0], S[2])
    out = mend.mend_loss(family.llm, pt, batch, "pred")
    out["loss"].backward()
    assert pt.prompt.grad.abs().sum() > 0
    pt.save(tmp_path)
    back = mend.load(tmp_path, llm_name=str(family.llm_dir))
    assert isinstance(back, mend.PromptTuning) and torch.equal(back.prompt, pt.prompt)
    init = torch.arange(5 * family.llm.hidden_size, dtype=torch.float32).view(5, -1)
    assert torch.equal(mend.PromptTuning(5, family.llm.hidden_size, init_embeddings=init).prompt, init)


def test_checkpoint_round_trip_is_bit_exact(family, tmp_path):
    m = build_mend(family, init="vocab")
    with torch.no_grad():  # make every parameter non-default
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    state = torch.random.get_rng_state()
    back = mend.MEND.from_pretrained(tmp_path, llm_name=str(family.llm_dir), dtype="fp32")
    assert torch.equal(torch.random.get_rng_state(), state)  # loading does not touch the global RNG
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back.l, back.init, back.projection, back.d_llm) == (m.l, m.init, m.projection, m.d_llm)
    batch = make_batch(make_rows(11))
    with torch.no_grad():
        assert torch.equal(back.eval().distill(batch.demo_ids, batch.demo_mask), m.distill(batch.demo_ids, batch.demo_mask))
    assert isinstance(mend.load(tmp_path), mend.MEND) and not back.training
    assert mend.load(tmp_path, dtype="bf16").placeholders.dtype == torch.bfloat16
    # same LLM under another spelling is accepted; another LLM is refused naming both
    mend.MEND.from_pretrained(tmp_path, llm_name=str(family.llm_dir) + "/")
    with pytest.raises(ValueError) as e:
        mend.MEND.from_pretrained(tmp_path, llm_name="gpt2-large")
    msg = str(e.value)
    assert "\n" not in msg and str(family.llm_dir) in msg and "gpt2-large" in msg and "refusing" in msg
    with pytest.raises(ValueError, match="not 'prompt_tuning'"):
        mend.PromptTuning.from_pretrained(tmp_path)


def test_errors_are_one_clear_line(family):
    with pytest.raises(ValueError, match="init="):
        build_mend(family, init="zeros")
    batch = make_batch(make_rows(12))
    with pytest.raises(ValueError, match="objective="):
        mend.mend_loss(family.llm, build_mend(family), batch, "kl")
    with pytest.raises(ValueError, match="context="):
        mend.llm_logits(family.llm, batch, "demos")
    with pytest.raises(FileNotFoundError, match="config.json"):
        mend.load("/nonexistent/ckpt")


def test_bf16_llm_with_fp32_distiller(family):
    """The frozen LLM held in bf16 (train.py's memory option) with an fp32 distiller: S_D is cast to the LLM's
    dtype, the losses are computed in fp32, gradients reach the fp32 distiller."""
    llm = mend.freeze(model.from_pretrained(family.llm_dir, dtype=torch.bfloat16))
    m = build_mend(family)
    out = mend.mend_loss(llm, m, make_batch(make_rows(13)), "finetune")
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert m.placeholders.grad.dtype == torch.float32 and m.placeholders.grad.abs().sum() > 0


def test_works_on_data_episode_batches(family):
    """Integration: data.collate's EpisodeBatch (C4-like episodes, x empty) goes through every objective."""
    import data

    g = torch.Generator().manual_seed(14)
    eps = [data.Episode(rand_ids(g, 12), [], rand_ids(g, 5)), data.Episode(rand_ids(g, 7), [], rand_ids(g, 3))]
    batch = data.collate(eps)
    assert torch.equal(batch.demo_ids, make_batch([(e.demo_ids, e.query_ids, e.target_ids) for e in eps]).demo_ids)
    m = build_mend(family)
    for objective in mend.OBJECTIVES:
        out = mend.mend_loss(family.llm, m, batch, objective)
        assert torch.isfinite(out["loss"])
