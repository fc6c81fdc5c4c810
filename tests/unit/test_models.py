import torch

import pytest

from bigmodel.errors import BigModelError
from bigmodel.models import registry
from bigmodel.models.bert import BERT, BERTConfig
from bigmodel.models.gpt import GPT, GPTConfig
from bigmodel.models.heads import SequenceClassifier, TokenClassifier, load_finetuned, with_head
from bigmodel.models.layers import SelfAttention

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def test_output_at_a_position_never_depends_on_later_tokens():
    gpt = model()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        a, _ = gpt(x)
        b, _ = gpt(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_embedding_and_output_weights_are_tied_and_survive_save_load(tmp_path):
    gpt = model()
    assert gpt.lm_head.weight.data_ptr() == gpt.wte.weight.data_ptr()
    registry.save(gpt, tmp_path, "gpt", "clm", CFG)
    other = model(seed=1)
    registry.load_weights(other, tmp_path)
    assert other.lm_head.weight.data_ptr() == other.wte.weight.data_ptr()
    x = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        assert torch.equal(gpt(x)[0], other(x)[0])


def test_explicit_attention_maps_match_the_fused_kernel():
    gpt = model()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        fused, _ = gpt(x)
        gpt.attention_maps(True)
        explicit, _ = gpt(x)
    maps = gpt.blocks[0].attn.last_map
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert maps.shape == (2, 2, 10, 10)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 10))
    assert maps[0, 0].triu(1).abs().max() == 0  # causal: no weight on the future


def test_bidirectional_attention_ignores_padding_keys():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, causal=False).eval()
    x = torch.randn(1, 6, 16)
    noisy = x.clone()
    noisy[:, 4:] = torch.randn(1, 2, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    with torch.no_grad():
        assert torch.allclose(attn(x, mask)[:, :4], attn(noisy, mask)[:, :4], atol=1e-6)


def test_classifier_logits_do_not_depend_on_padding_for_either_pooling():
    for pooling in ("last", "mean"):
        clf = SequenceClassifier(model(), n_classes=3, pooling=pooling).eval()
        ids = torch.tensor([[5, 6, 7, 8, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
        wide = torch.cat([ids, torch.full((2, 5), 3)], dim=1)  # more (different) padding
        lengths = torch.tensor([4, 7])
        with torch.no_grad():
            a, b = clf(ids, lengths), clf(wide, lengths)
        assert a.shape == (2, 3)
        assert torch.allclose(a, b, atol=1e-6), pooling


def test_loss_of_an_untrained_model_is_near_uniform():
    gpt = model()
    x = torch.randint(0, 50, (4, 16))
    _, loss = gpt(x, torch.randint(0, 50, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3


BERT_CFG = BERTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("pooling", ["cls", "pooler", "mean", "last"])
def test_bert_classifier_and_tagger_logits_do_not_depend_on_padding(pooling):
    torch.manual_seed(0)
    ids = torch.tensor([[2, 6, 7, 8, 3, 0, 0], [2, 6, 7, 8, 9, 10, 3]])
    wide = torch.cat([ids, torch.full((2, 4), 0)], dim=1)
    lengths = torch.tensor([5, 7])
    clf = SequenceClassifier(BERT(BERT_CFG), n_classes=3, pooling=pooling).eval()
    tagger = TokenClassifier(BERT(BERT_CFG), n_tags=5).eval()
    with torch.no_grad():
        assert torch.allclose(clf(ids, lengths), clf(wide, lengths), atol=1e-5)
        a, b = tagger(ids, lengths), tagger(wide, lengths)
    assert a.shape == (2, 7, 5)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5) and torch.allclose(a[1], b[1, :7], atol=1e-5)


def test_pooler_pooling_is_berts_pooler_over_cls_starting_from_a_pretrained_one():
    torch.manual_seed(0)
    with_nsp = BERT(BERTConfig(**{**BERT_CFG.__dict__, "nsp": True}))
    clf = SequenceClassifier(with_nsp, n_classes=3, pooling="pooler").eval()
    assert torch.equal(clf.pooler.weight, with_nsp.pooler.weight)
    assert clf.pooler.weight is not with_nsp.pooler.weight  # a copy: finetuning moves its own
    ids, lengths = torch.tensor([[2, 6, 7, 3]]), torch.tensor([4])
    with torch.no_grad():
        h = with_nsp.hidden(ids, lengths)[:, 0]
        want = clf.head(torch.tanh(with_nsp.pooler(h)))
        assert torch.allclose(clf(ids, lengths), want, atol=1e-6)
    fresh = SequenceClassifier(BERT(BERT_CFG), n_classes=3, pooling="pooler")
    assert torch.count_nonzero(fresh.pooler.bias) == 0 and 0.01 < fresh.pooler.weight.std() < 0.03


@pytest.mark.parametrize("family, task", [("gpt", "seq_cls"), ("bert", "seq_cls"),
                                          ("bert", "token_cls"), ("gpt", "token_cls")])
def test_a_saved_model_folder_says_its_family_and_task_and_loads_back_equal(tmp_path, family, task):
    torch.manual_seed(0)
    arch = registry.arch_config(family, {"vocab_size": 50, "block_size": 16, "n_layer": 1,
                                         "n_head": 2, "n_embd": 16, "unrelated": 1})
    info = {"task": task, "labels": ["O", "B-X", "I-X"], "max_len": 16, "pooling": "mean"}
    model = with_head(registry.build(family, arch), info).eval()
    registry.save(model, tmp_path, family, task, arch, {k: v for k, v in info.items() if k != "task"})
    loaded, read = load_finetuned(tmp_path)
    assert (read["family"], read["task"]) == (family, task)
    ids, lengths = torch.randint(5, 50, (2, 9)), torch.tensor([9, 6])
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), loaded(ids, lengths))


def test_weights_of_another_architecture_are_one_clear_error(tmp_path):
    registry.save(model(), tmp_path, "gpt", "clm", CFG)
    bigger = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(BigModelError, match="weights do not fit the model"):
        registry.load_weights(bigger, tmp_path)
    (tmp_path / "config.json").write_text('{"gpt": {}}')
    with pytest.raises(BigModelError, match="not a bigmodel model config"):
        registry.read_config(tmp_path)
    with pytest.raises(BigModelError, match="model family 'resnet9' is not known"):
        registry.build("resnet9", {})
