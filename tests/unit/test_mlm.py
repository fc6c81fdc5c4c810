import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import BigModelError
from bigmodel.models.bert import BERT, BERTConfig
from bigmodel.objectives.mlm import (
    IGNORE,
    MLMSampler,
    Specials,
    mask_tokens,
    mlm_loss,
    mlm_metrics,
    unigram_baseline,
)
from bigmodel.train.distributed import World

PAD, UNK, CLS, SEP, MASK, FIRST = 0, 1, 2, 3, 4, 5
CPU = torch.device("cpu")
T = 16  # block size: NSP rows hold T - 3 = 13 tokens of A and B


def specials(vocab_size: int) -> Specials:
    return Specials(cls=CLS, sep=SEP, mask=MASK, pad=PAD, vocab_size=vocab_size,
                    first_normal=FIRST)


def positional_stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents of 0..40 tokens, each followed by [SEP]; the token at offset i is FIRST + i, so
    a token tells where in the stream it came from."""
    lengths = np.random.default_rng(seed).integers(0, 41, size=60)
    lengths[:3] = [0, 1, 2]  # the shortest documents are there
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    data = FIRST + np.arange(starts[-1] + lengths[-1] + 1)
    data[starts + lengths] = SEP
    return data.astype(np.uint16), starts


DATA, STARTS = positional_stream()
SP = specials(FIRST + len(DATA))
DOC_LENGTHS = np.diff(STARTS, append=len(DATA)) - 1


def sampler(nsp: bool, batch_size: int = 64, seed: int = 0, world: World | None = None
            ) -> MLMSampler:
    return MLMSampler(DATA, STARTS, T, batch_size, seed, CPU, SP, nsp, world)


def original(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens before masking."""
    return torch.where(batch["labels"] != IGNORE, batch["labels"], batch["idx"])


def doc_of(tokens: list[int]) -> set[int]:
    offsets = np.array(tokens) - FIRST
    return set(np.searchsorted(STARTS, offsets, side="right") - 1)


def assert_contiguous(tokens: list[int]) -> None:
    assert len(doc_of(tokens)) == 1
    assert np.all(np.diff(tokens) == 1)


# mask_tokens


def padded_rows(gen_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """400 rows of [CLS] tokens [PAD]..., with a few [SEP]/[UNK] inside; (idx, maskable)."""
    torch.manual_seed(gen_seed)
    idx = torch.randint(FIRST, FIRST + 1000, (400, 128))
    lengths = torch.randint(20, 129, (400,))
    real = torch.arange(128)[None, :] < lengths[:, None]
    idx[torch.rand(400, 128) < 0.05] = SEP
    idx[torch.rand(400, 128) < 0.02] = UNK
    idx[:, 0] = CLS
    idx[~real] = PAD
    return idx, (idx >= FIRST) & real


def test_mask_tokens_chooses_15_percent_of_each_row_and_corrupts_them_80_10_10():
    idx, maskable = padded_rows()
    sp = specials(FIRST + 1000)
    inputs, labels = mask_tokens(idx, maskable, sp, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    n = maskable.sum(1)
    assert torch.equal(chosen.sum(1), (n * 0.15).round().long().clamp(min=1))
    assert abs(chosen.sum() / n.sum() - 0.15) < 0.005
    assert torch.equal(labels[chosen], idx[chosen])
    assert torch.equal(inputs[~chosen], idx[~chosen])
    masked = inputs[chosen] == MASK
    kept = inputs[chosen] == idx[chosen]
    swapped = ~masked & ~kept
    assert abs(masked.double().mean() - 0.8) < 0.02
    assert abs(kept.double().mean() - 0.1) < 0.02
    assert abs(swapped.double().mean() - 0.1) < 0.02
    assert inputs[chosen][swapped].min() >= FIRST  # random replacements are normal tokens


def test_mask_tokens_never_chooses_specials_or_padding():
    idx, maskable = padded_rows()
    _, labels = mask_tokens(idx, maskable, specials(FIRST + 1000), torch.Generator().manual_seed(0))
    assert (labels[~maskable] == IGNORE).all()
    assert (labels[idx < FIRST] == IGNORE).all()


def test_mask_tokens_gives_a_row_with_few_maskable_tokens_one_target_and_none_zero():
    idx = torch.tensor([[CLS, 7, 8, SEP], [CLS, SEP, PAD, PAD]])
    _, labels = mask_tokens(idx, idx >= FIRST, specials(20), torch.Generator().manual_seed(0))
    assert (labels[0] != IGNORE).sum() == 1
    assert (labels[1] == IGNORE).all()


def test_mask_tokens_is_determined_by_the_generator_seed():
    idx, maskable = padded_rows()
    sp = specials(FIRST + 1000)
    a = mask_tokens(idx, maskable, sp, torch.Generator().manual_seed(3))
    b = mask_tokens(idx, maskable, sp, torch.Generator().manual_seed(3))
    c = mask_tokens(idx, maskable, sp, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# MLMSampler


def test_windows_are_cls_then_a_window_of_the_stream_then_sep():
    batch = sampler(nsp=False)()
    assert set(batch) == {"idx", "labels", "lengths", "segments"}
    for key in ("idx", "labels", "segments"):
        assert batch[key].shape == (64, T) and batch[key].dtype == torch.long
    assert (batch["lengths"] == T).all() and (batch["segments"] == 0).all()
    tokens = original(batch)
    assert (tokens[:, 0] == CLS).all() and (tokens[:, -1] == SEP).all()
    for row in tokens[:, 1:-1].numpy():
        j = int(np.flatnonzero(row != SEP)[0])
        start = row[j] - FIRST - j
        assert np.array_equal(DATA[start:start + T - 2], row)  # the stream's [SEP]s stay
    assert (batch["labels"] != IGNORE).any(1).all()


def split_pair(tokens: list[int], segments: list[int]) -> tuple[list[int], list[int]]:
    """A and B of a row [CLS] A [SEP] B [SEP], checking the layout and the segments."""
    assert tokens[0] == CLS and tokens[-1] == SEP
    mid = tokens.index(SEP, 1)
    a, b = tokens[1:mid], tokens[mid + 1:-1]
    assert a and b and SEP not in b
    assert segments == [0] * (mid + 1) + [1] * (len(b) + 1)
    return a, b


def test_nsp_rows_are_cls_a_sep_b_sep_then_padding_in_two_segments():
    batch = sampler(nsp=True)()
    assert batch["nsp_labels"].shape == (64,) and batch["nsp_labels"].dtype == torch.long
    tokens = original(batch)
    for i, n in enumerate(batch["lengths"].tolist()):
        assert 5 <= n <= T
        split_pair(tokens[i, :n].tolist(), batch["segments"][i, :n].tolist())
        assert (batch["idx"][i, n:] == PAD).all()
        assert (batch["segments"][i, n:] == 0).all()
        assert (batch["labels"][i, n:] == IGNORE).all()
    assert (batch["lengths"] < T).any()  # short documents give padded rows


def test_is_next_b_continues_a_and_not_next_b_comes_from_another_document():
    batch = sampler(nsp=True, batch_size=400)()
    tokens = original(batch)
    for i, n in enumerate(batch["lengths"].tolist()):
        a, b = split_pair(tokens[i, :n].tolist(), batch["segments"][i, :n].tolist())
        assert_contiguous(a)
        assert_contiguous(b)
        (doc,) = doc_of(a)
        span = min(DOC_LENGTHS[doc], T - 3)
        assert len(a) == span // 2
        if batch["nsp_labels"][i] == 0:
            assert b[0] == a[-1] + 1 and doc_of(b) == {doc}
            assert len(a) + len(b) == span
        else:
            (other,) = doc_of(b)
            assert other != doc
            assert len(b) == min(span - len(a), DOC_LENGTHS[other])


def test_nsp_labels_are_half_is_next_half_not_next():
    labels = sampler(nsp=True, batch_size=4000)()["nsp_labels"]
    assert abs(labels.double().mean() - 0.5) < 0.03


def test_documents_too_short_for_a_pair_never_give_a():
    batch = sampler(nsp=True, batch_size=400)()
    tokens = original(batch)
    firsts = [tokens[i, 1].item() for i in range(400)]
    assert min(DOC_LENGTHS[list(doc_of(firsts))]) >= 2


@pytest.mark.parametrize("nsp", [False, True])
def test_same_seed_gives_the_same_batches_and_a_restored_generator_continues_them(nsp):
    a, b = sampler(nsp), sampler(nsp)
    first = [a() for _ in range(2)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, [b(), b()]) for k in x)
    state = a.gen.get_state()
    expected = [a() for _ in range(3)]
    resumed = sampler(nsp, seed=99)
    resumed.gen.set_state(state)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(expected, [resumed() for _ in range(3)])
               for k in x)
    assert not torch.equal(sampler(nsp, seed=1)()["idx"], sampler(nsp)()["idx"])


@pytest.mark.parametrize("nsp", [False, True])
def test_two_ranks_get_disjoint_halves_that_make_up_the_one_process_batch(nsp):
    one = sampler(nsp, batch_size=8)
    ranks = [sampler(nsp, batch_size=8, world=World(rank=r, size=2)) for r in (0, 1)]
    for _ in range(3):
        full = one()
        halves = [r() for r in ranks]
        assert halves[0]["idx"].shape[0] == 4
        assert not torch.equal(halves[0]["idx"], halves[1]["idx"])
        for key in full:
            assert torch.equal(torch.cat([h[key] for h in halves]), full[key]), key


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(BigModelError, match="does not split over 2"):
        sampler(False, batch_size=7, world=World(rank=0, size=2))


def test_too_little_data_for_one_window_or_one_pair_is_refused():
    with pytest.raises(BigModelError, match="only 10 tokens"):
        MLMSampler(DATA[:10], STARTS[:1], T, 4, 0, CPU, SP, nsp=False)
    one_doc = np.array([7, 8, 9, SEP], dtype=np.uint16)
    with pytest.raises(BigModelError, match="next-sentence pairs need"):
        MLMSampler(one_doc, np.array([0]), T, 4, 0, CPU, SP, nsp=True)


# loss, metrics, baseline


def tiny_bert(vocab_size: int, norm: str = "post", nsp: bool = True) -> BERT:
    torch.manual_seed(0)
    return BERT(BERTConfig(vocab_size=vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=32,
                           dropout=0.0, norm=norm, nsp=nsp))


class Wrapped(nn.Module):
    """What DDP looks like to mlm_loss: forward gives hidden states, the model is `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)


@pytest.mark.parametrize("nsp", [False, True])
def test_mlm_loss_is_cross_entropy_over_chosen_positions_plus_nsp(nsp):
    bert = tiny_bert(SP.vocab_size).eval()
    batch = sampler(nsp, batch_size=8)()
    with torch.no_grad():
        h = bert(batch["idx"], batch["lengths"], batch["segments"])
        expected = F.cross_entropy(bert.mlm_logits(h).flatten(0, 1), batch["labels"].flatten(),
                                   ignore_index=IGNORE)
        if nsp:
            expected = expected + F.cross_entropy(bert.nsp_logits(h), batch["nsp_labels"])
        assert torch.allclose(mlm_loss(bert, batch), expected, atol=1e-5)
        assert torch.allclose(mlm_loss(Wrapped(bert), batch), expected, atol=1e-5)


def test_a_batch_with_no_chosen_position_is_refused_not_read_as_divergence():
    bert = tiny_bert(SP.vocab_size)
    batch = sampler(False, batch_size=2)()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    with pytest.raises(BigModelError, match="no chosen positions"):
        mlm_loss(bert, batch)


def test_unigram_baseline_predicts_the_most_frequent_normal_token_add_one_smoothed():
    data = np.array([CLS, 5, 5, 5, 5, 5, 5, SEP, 6, 6, SEP, SEP, SEP], dtype=np.uint16)
    batch = {"labels": torch.tensor([[IGNORE, 5, IGNORE, 6]])}
    got = unigram_baseline(data, Specials(CLS, SEP, MASK, PAD, vocab_size=8, first_normal=5),
                           [batch])
    assert got["masked_accuracy"] == 0.5  # p = (6+1, 2+1, 0+1) / 11 over tokens 5, 6, 7
    assert math.isclose(got["mlm_loss"], -(math.log(7 / 11) + math.log(3 / 11)) / 2)


# training


def constant_documents() -> tuple[np.ndarray, np.ndarray, Specials]:
    """100 documents, each one token (of 20) repeated 30 times: a masked token is whatever the
    rest of its window says, which the unigram distribution cannot know."""
    rng = np.random.default_rng(0)
    docs = [np.full(30, FIRST + rng.integers(20)) for _ in range(100)]
    data = np.concatenate([np.append(d, SEP) for d in docs]).astype(np.uint16)
    return data, np.arange(100) * 31, specials(FIRST + 20)


@pytest.fixture(scope="module", params=["post", "pre"])
def trained(request: pytest.FixtureRequest) -> tuple[BERT, list[float], dict, dict]:
    """A tiny BERT of each norm trained 100 steps; its losses, and metrics and baseline on
    held-out batches."""
    data, starts, sp = constant_documents()
    bert = tiny_bert(sp.vocab_size, request.param)
    train = MLMSampler(data, starts, T, 32, 0, CPU, sp, nsp=False)
    opt = torch.optim.AdamW(bert.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = mlm_loss(bert, train())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    val = MLMSampler(data, starts, T, 32, 1, CPU, sp, nsp=False)
    batches = [val() for _ in range(4)]
    return bert, losses, mlm_metrics(bert, batches), unigram_baseline(data, sp, batches)


def test_post_and_pre_norm_bert_both_learn_masked_tokens(trained):
    _, losses, _, _ = trained
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_trained_bert_beats_the_unigram_baseline(trained):
    bert, _, metrics, baseline = trained
    assert metrics["masked_accuracy"] > baseline["masked_accuracy"] + 0.4
    assert metrics["mlm_loss"] < baseline["mlm_loss"] - 1.0
    assert "nsp_accuracy" not in metrics
    assert bert.training  # mlm_metrics puts back the mode it found


def test_a_bert_run_interrupted_and_resumed_reaches_the_same_weights_bitwise(tmp_path):
    from bigmodel.config import Optim
    from bigmodel.train.trainer import Trainer
    from tests.unit.crash import assert_resume_is_bitwise

    opt = Optim(lr=3e-3, min_lr=3e-4, warmup_steps=3, batch_size=8, device="cpu", dropout=0.1)

    def fresh() -> tuple[Trainer, MLMSampler]:
        torch.manual_seed(0)
        return Trainer(tiny_bert(SP.vocab_size, nsp=True), opt, 16), sampler(True, batch_size=8)

    def fit(trainer, _sampler, draw, checkpoint):  # noqa: ANN001, ANN202
        return trainer.fit(draw, mlm_loss, evaluate=lambda: {}, eval_interval=100,
                           log=lambda m, s: None, log_interval=4, tokens_per_step=8 * T,
                           checkpoint=checkpoint, checkpoint_interval=4 if checkpoint else 0)

    assert_resume_is_bitwise(fresh, fit, tmp_path / "ckpt", crash_at=11, resumed_step=8)
