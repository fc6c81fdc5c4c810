import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigmodel.models.layers import sinusoidal_positions
from bigmodel.models.seq2seq import Seq2Seq, Seq2SeqConfig
from bigmodel.objectives.seq2seq import IGNORE, PairSampler, make_batch, seq2seq_loss
from bigmodel.tasks import seq2seq as task
from bigmodel.text.shards import Pairs
from bigmodel.text.tokenizers import Specials

EOS, PAD, BOS = 0, 1, 2


def model(vocab: int = 40, seed: int = 0, norm: str = "pre", positions: str = "sinusoidal",
          block: int = 24, copy: bool = False) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab_size=vocab, block_size=block, n_layer=2, n_decoder_layer=2,
                        n_head=2, n_embd=16, dropout=0.0, norm=norm, positions=positions,
                        pad_id=PAD, bos_id=BOS, eos_id=EOS, copy_attention=copy)
    return Seq2Seq(cfg).eval()


def pairs_of(rows: list[tuple[list[int], list[int]]]) -> Pairs:
    src = [s for s, _ in rows]
    tgt = [t for _, t in rows]
    return Pairs(np.concatenate(src).astype(np.uint16), np.cumsum([0, *map(len, src)]),
                 np.concatenate(tgt).astype(np.uint16), np.cumsum([0, *map(len, tgt)]), n_bytes=0)


def test_sinusoidal_positions_follow_the_paper():
    pe = sinusoidal_positions(50, 8)
    pos, i = 7, 1  # dimensions 2i and 2i + 1
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


@pytest.mark.parametrize("norm,positions,copy", [("pre", "sinusoidal", False),
                                                 ("post", "learned", False),
                                                 ("pre", "sinusoidal", True)])
def test_outputs_do_not_depend_on_source_padding_and_the_decoder_is_causal(norm, positions, copy):
    m = model(norm=norm, positions=positions, copy=copy)
    src = torch.randint(3, 40, (2, 9))
    lengths = torch.tensor([9, 5])
    tgt = torch.randint(3, 40, (2, 6))
    with torch.no_grad():
        a = m(src, lengths, tgt)
        other = src.clone()
        other[1, 5:] = torch.randint(3, 40, (4,))  # different padding content
        b = m(other, lengths, tgt)
        changed = tgt.clone()
        changed[:, 4] = (changed[:, 4] + 1 - 3) % 37 + 3
        c = m(src, lengths, changed)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a[:, :4], c[:, :4], atol=1e-5)  # positions before 4 cannot see it
    assert not torch.allclose(a[:, 4:], c[:, 4:], atol=1e-4)


def test_the_output_projection_is_the_shared_embedding():
    m = model()
    assert m.lm_head.weight is m.wte.weight
    assert sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for n, p in m.named_parameters() if n != "lm_head.weight")


@pytest.mark.parametrize("copy", [False, True])
def test_stepping_with_the_cache_gives_the_teacher_forced_logits(copy):
    m = model(copy=copy)
    src, lengths = torch.randint(3, 40, (3, 7)), torch.tensor([7, 4, 6])
    tgt = torch.randint(3, 40, (3, 8))
    with torch.no_grad():
        full = m(src, lengths, tgt)
        state = m.start(src, lengths)
        steps = torch.stack([m.step(tgt[:, i:i + 1], state) for i in range(8)], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)


@pytest.mark.parametrize("seed,copy", [(0, False), (1, False), (2, False), (0, True)])
def test_greedy_output_is_identical_with_and_without_the_cache(seed, copy):
    m = model(seed=seed, copy=copy)
    src, lengths = torch.randint(3, 40, (4, 10)), torch.tensor([10, 3, 7, 1])
    limit = torch.tensor([12, 5, 20, 8])
    cached = task.greedy(m, src, lengths, limit, cache=True)
    plain = task.greedy(m, src, lengths, limit, cache=False)
    assert cached == plain
    assert all(len(out) <= n for out, n in zip(cached, limit.tolist()))
    assert all(PAD not in out and BOS not in out and EOS not in out for out in cached)


def test_copy_attention_gives_log_probabilities_that_put_the_copied_share_on_source_tokens():
    m = model(copy=True)
    src, lengths = torch.tensor([[5, 6, 6, 9, PAD]]), torch.tensor([4])
    tgt = torch.tensor([[BOS, 7, 8]])
    with torch.no_grad():
        logp = m(src, lengths, tgt)  # (1, 3, vocab)
        assert torch.allclose(logp.logsumexp(-1), torch.zeros(1, 3), atol=1e-5)
        m.copy_gate.bias.fill_(-30.0)  # the gate sends everything to the copy attention
        on_source = m(src, lengths, tgt).exp()[..., [5, 6, 9]].sum(-1)
    assert torch.allclose(on_source, torch.ones(1, 3), atol=1e-4)  # padding (id 1) gets none


def test_the_copy_attention_learns_to_copy_unseen_sequences_that_the_plain_model_cannot_yet():
    """Copying random sequences: 120 steps. With the copy attention the model copies; without it
    the tied, sqrt(C)-scaled embedding first has to unlearn repeating its input token."""
    def train(copy: bool) -> float:
        torch.manual_seed(0)
        cfg = Seq2SeqConfig(vocab_size=64, block_size=16, n_layer=2, n_decoder_layer=2, n_head=2,
                            n_embd=32, dropout=0.0, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                            copy_attention=copy)
        m = Seq2Seq(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(120):
            src = torch.randint(3, 64, (32, 10))
            tgt_in = torch.cat([torch.full((32, 1), BOS), src[:, :-1]], 1)
            loss = F.cross_entropy(m(src, None, tgt_in).flatten(0, 1), src.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        src = torch.randint(3, 64, (64, 10))
        out = task.greedy(m.eval(), src, None, torch.full((64,), 10))
        return float(np.mean([o == s for o, s in zip(out, src.tolist())]))
    assert train(copy=True) > 0.9  # whole sequences copied exactly
    assert train(copy=False) < 0.1


def test_beam_of_one_is_greedy():
    m = model(seed=3)
    src, lengths = torch.randint(3, 40, (3, 6)), torch.tensor([6, 6, 2])
    limit = torch.tensor([10, 10, 10])
    assert task.beam_search(m, src, lengths, 1, 0.0, limit) == task.greedy(m, src, lengths, limit)


def sequence_score(m: Seq2Seq, src: torch.Tensor, body: list[int], ended: bool, alpha: float) -> float:
    """log P(body [+ EOS] | src) with PAD and BOS ruled out, over the GNMT length penalty."""
    seq = body + ([EOS] if ended else [])
    with torch.no_grad():
        logits = m(src, None, torch.tensor([[BOS] + seq[:-1]]))[0]
    logits[:, [PAD, BOS]] = float("-inf")
    logp = F.log_softmax(logits.float(), -1)
    return logp[torch.arange(len(seq)), torch.tensor(seq)].sum().item() / task.length_penalty(len(seq), alpha)


def test_a_wide_beam_finds_the_best_sequence_exhaustive_search_finds():
    """Vocabulary: EOS, PAD, BOS + 3 tokens; outputs of at most 3 tokens. A beam of 50 keeps
    every hypothesis, so it must return the best of all 40 possible outputs."""
    m = model(vocab=6, seed=4)
    src = torch.tensor([[3, 4, 5, 3]])
    alpha, limit = 0.6, 3
    candidates = [(list(body), True) for n in range(limit) for body in itertools.product([3, 4, 5], repeat=n)]
    candidates += [(list(body), False) for body in itertools.product([3, 4, 5], repeat=limit)]
    best = max(candidates, key=lambda c: sequence_score(m, src, c[0], c[1], alpha))
    out = task.beam_search(m, src, torch.tensor([4]), 50, alpha, torch.tensor([limit]))
    assert out == [best[0]]


def test_make_batch_shifts_the_target_and_ignores_padding():
    pairs = pairs_of([([5, 6, 7, EOS], [8, 9, EOS]), ([5, EOS], [10, 11, 12, 13, EOS])])
    b = make_batch(pairs, np.array([0, 1]), block_size=16, bos=BOS, pad=PAD)
    assert b["src"].tolist() == [[5, 6, 7, EOS], [5, EOS, PAD, PAD]]
    assert b["src_lengths"].tolist() == [4, 2]
    assert b["tgt_in"].tolist() == [[BOS, 8, 9, PAD, PAD], [BOS, 10, 11, 12, 13]]
    assert b["tgt_out"].tolist() == [[8, 9, EOS, IGNORE, IGNORE], [10, 11, 12, 13, EOS]]


def test_a_target_cut_to_the_block_keeps_its_end_of_sequence():
    pairs = pairs_of([([5] * 10 + [EOS], list(range(3, 13)) + [EOS])])
    b = make_batch(pairs, np.array([0]), block_size=4, bos=BOS, pad=PAD)
    assert b["src"].tolist() == [[5, 5, 5, 5]]
    assert b["tgt_in"].tolist() == [[BOS, 3, 4, 5]]
    assert b["tgt_out"].tolist() == [[3, 4, 5, EOS]]


def test_the_loss_is_label_smoothed_cross_entropy_over_real_target_tokens():
    m = model()
    pairs = pairs_of([([5, 6, EOS], [8, EOS]), ([7, EOS], [9, 10, 11, EOS])])
    b = make_batch(pairs, np.array([0, 1]), 24, BOS, PAD)
    with torch.no_grad():
        logits = m(b["src"], b["src_lengths"], b["tgt_in"])
        real = b["tgt_out"] != IGNORE
        logp = F.log_softmax(logits[real], -1)
        y = b["tgt_out"][real]
        eps, V = 0.1, logits.size(-1)
        manual = -((1 - eps) * logp[torch.arange(len(y)), y] + eps / V * logp.sum(-1)).mean()
        assert seq2seq_loss(m, b, eps).item() == pytest.approx(manual.item(), rel=1e-5)


def sampler(pairs: Pairs, seed: int = 0) -> PairSampler:
    sp = Specials(pad=PAD, eot=EOS, bos=BOS, n_special=3, vocab_size=40)
    return PairSampler(pairs, 24, 4, seed, torch.device("cpu"), sp)


def test_sampler_batches_pairs_of_about_one_length_and_resumes_from_its_generator_state():
    rng = np.random.default_rng(0)
    rows = [(list(rng.integers(3, 40, n)) + [EOS], [8, EOS]) for n in rng.integers(1, 20, 64)]
    pairs = pairs_of(rows)
    s = sampler(pairs)
    for _ in range(3):
        s()
    state = s.gen.get_state()
    after = [s() for _ in range(4)]
    resumed = sampler(pairs, seed=99)
    resumed.gen.set_state(state)
    for a, b in zip(after, [resumed() for _ in range(4)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a bucket holds 16 of 64 pairs sorted by length: a batch spans a quarter of the lengths
    spans = [int(b["src_lengths"].max() - b["src_lengths"].min()) for b in after]
    assert max(spans) <= 10
    assert s.target_tokens == 7 * 4 * 2  # every target is 2 tokens (8, EOS)


def test_the_sampler_refuses_a_tokenizer_without_bos():
    pairs = pairs_of([([5, EOS], [6, EOS])])
    sp = Specials(pad=PAD, eot=EOS, n_special=2, vocab_size=40)
    with pytest.raises(Exception, match="bos"):
        PairSampler(pairs, 24, 4, 0, torch.device("cpu"), sp)


def test_max_lengths_are_relative_to_the_source_and_capped_by_the_block():
    assert task.max_lengths(torch.tensor([1, 10, 100]), 1.2, 10, 64).tolist() == [11, 22, 64]


def test_translator_keeps_to_max_new_tokens_and_refuses_bad_params(tiny_seq2seq_dir):
    t = task.Translator(tiny_seq2seq_dir)
    src, lengths = task.encode_sources(t.tok, ["def f(x): return x"], 32, t.model.cfg.pad_id)
    for k in (1, 3):
        ids = task.beam_search(t.model, src, lengths, k, 0.6, torch.tensor([2]))[0]
        assert len(ids) <= 2
    assert t.predict(["def f(x): return x"], {"beam_size": 1, "max_new_tokens": 2})["output"][0] \
        == t.translate(["def f(x): return x"], 1, 2)[0]
    with pytest.raises(Exception, match="must be >= 0"):
        t.predict(["x"], {"beam_size": -1})
    with pytest.raises(Exception, match="string"):
        t.translate([3])  # type: ignore[list-item]


def test_coverage_penalty_is_zero_for_full_coverage_and_ignores_padding():
    mask = torch.tensor([[True, True, False], [True, True, False]])
    cov = torch.tensor([[1.5, 1.0, 0.0], [0.5, 0.25, 0.0]])
    cp = task.coverage_penalty(cov, mask, 0.2)
    assert cp[0].item() == 0.0  # min(cov, 1) = 1 everywhere real; the padding's 0 is left out
    assert cp[1].item() == pytest.approx(0.2 * (math.log(0.5) + math.log(0.25)))
    assert task.coverage_penalty(cov, mask, 0.0).tolist() == [0.0, 0.0]


def test_the_kv_cache_moves_only_its_filled_positions_and_goes_on_from_them():
    from bigmodel.models.layers import KVCache

    cache = KVCache(8)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    cache.append(k, v)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    got_k, got_v = cache.append(k2, v2)
    assert torch.equal(got_k, torch.cat([k[index], k2], dim=2))
    assert torch.equal(got_v, torch.cat([v[index], v2], dim=2))
    cache.reorder(torch.tensor([1]))  # another number of rows: a buffer of that many
    assert cache.append(k2[:1], v2[:1])[0].shape == (1, 2, 7, 4)


@pytest.mark.parametrize("copy", [False, True])
def test_beam_search_moving_only_the_caches_decodes_as_moving_everything(copy, monkeypatch):
    # a beam's parents are its own source's hypotheses, so the source side stays put
    m = model(seed=6, copy=copy)
    src, lengths = torch.randint(3, 40, (4, 7)), torch.tensor([7, 5, 3, 6])
    limit = torch.tensor([9, 9, 6, 9])
    fast = task.beam_search(m, src, lengths, 3, 0.6, limit, beta=0.2)
    from bigmodel.models import seq2seq as seq2seq_model

    everything = seq2seq_model.State.reorder
    monkeypatch.setattr(seq2seq_model.State, "reorder",
                        lambda self, index, same_sources=False: everything(self, index))
    assert task.beam_search(m, src, lengths, 3, 0.6, limit, beta=0.2) == fast


def test_beam_search_with_coverage_restores_the_cross_attention_mode_and_keeps_lengths():
    m = model(seed=5)
    src, lengths = torch.randint(3, 40, (3, 6)), torch.tensor([6, 4, 2])
    out = task.beam_search(m, src, lengths, 3, 0.6, torch.tensor([5, 5, 5]), beta=0.2)
    assert all(len(o) <= 5 for o in out)
    assert not m.decoder[-1].cross.keep_maps  # the fast kernel again after decoding


def test_a_seq2seq_run_interrupted_and_resumed_reaches_the_same_weights_bitwise(tmp_path):
    from bigmodel.config import Optim
    from bigmodel.train.trainer import Trainer
    from tests.unit.crash import assert_resume_is_bitwise

    rng = np.random.default_rng(1)
    pairs = pairs_of([(list(rng.integers(3, 40, n)) + [EOS], list(rng.integers(3, 40, 4)) + [EOS])
                      for n in rng.integers(2, 12, 48)])
    opt = Optim(lr=3e-3, min_lr=3e-4, warmup_steps=3, batch_size=4, device="cpu", dropout=0.1)

    def fresh() -> tuple[Trainer, PairSampler]:
        torch.manual_seed(0)
        return Trainer(model().train(), opt, 16), sampler(pairs)

    def fit(trainer, pair_sampler, draw, checkpoint):  # noqa: ANN001, ANN202
        # throughput counts the target tokens the sampler drew (a counter, not a fixed size)
        return trainer.fit(draw, lambda m, b: seq2seq_loss(m, b, 0.1), evaluate=lambda: {},
                           eval_interval=100, log=lambda m, s: None, log_interval=4,
                           tokens_per_step=lambda: pair_sampler.target_tokens,
                           checkpoint=checkpoint, checkpoint_interval=4 if checkpoint else 0)

    trainer, pair_sampler = fresh()
    result = fit(trainer, pair_sampler, pair_sampler, None)
    assert result.tokens_per_s > 0 and pair_sampler.target_tokens == 16 * 4 * 5  # 5 a pair
    assert_resume_is_bitwise(fresh, fit, tmp_path / "ckpt", crash_at=11, resumed_step=8)
