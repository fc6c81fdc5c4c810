import torch

from bigmodel.models.gpt import GPT, GPTClassifier, GPTConfig, load_weights, save
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
    save(gpt, CFG, tmp_path)
    other = model(seed=1)
    load_weights(other, tmp_path)
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
        clf = GPTClassifier(model(), n_classes=3, pooling=pooling).eval()
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
