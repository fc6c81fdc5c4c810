import pytest
import torch
from safetensors.torch import load_model, save_model

from bigmodel.models.bert import BERT, BERTConfig
from bigmodel.models.layers import Block


def model(norm: str = "post", seed: int = 0, nsp: bool = True) -> BERT:
    torch.manual_seed(seed)
    cfg = BERTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, norm=norm,
                     nsp=nsp)
    return BERT(cfg).eval()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_hidden_states_at_real_positions_do_not_depend_on_padding(norm):
    bert = model(norm)
    ids = torch.tensor([[2, 6, 7, 8, 3, 0, 0, 0], [2, 6, 7, 8, 9, 10, 11, 3]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    lengths = torch.tensor([5, 8])
    wide = torch.cat([ids, torch.randint(0, 50, (2, 6))], dim=1)  # more, different padding
    wide[0, 5:8] = torch.randint(0, 50, (3,))
    wide_segments = torch.cat([segments, torch.ones(2, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = bert(ids, lengths, segments)
        b = bert(wide, lengths, wide_segments)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5)
    assert torch.allclose(a[1], b[1, :8], atol=1e-5)


def test_changing_a_later_token_changes_the_outputs_at_earlier_positions():
    bert = model()
    x = torch.randint(5, 50, (2, 12))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1 - 5) % 45 + 5
    with torch.no_grad():
        a, b = bert(x), bert(y)
    assert not torch.allclose(a[:, :10], b[:, :10], atol=1e-4)  # unlike GPT, position 0 sees 10


def test_no_segments_means_every_token_in_segment_zero():
    bert = model()
    x = torch.randint(5, 50, (2, 10))
    with torch.no_grad():
        none = bert(x)
        zeros = bert(x, segments=torch.zeros_like(x))
        ones = bert(x, segments=torch.ones_like(x))
    assert torch.allclose(none, zeros, atol=1e-6)
    assert not torch.allclose(none, ones, atol=1e-4)


def test_tied_mlm_decoder_and_heads_survive_a_safetensors_round_trip(tmp_path):
    bert = model()
    assert bert.mlm_decoder.weight is bert.wte.weight
    save_model(bert, str(tmp_path / "model.safetensors"))
    other = model(seed=1)
    missing, unexpected = load_model(other, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    assert other.mlm_decoder.weight is other.wte.weight
    x = torch.randint(5, 50, (2, 10))
    with torch.no_grad():
        h, h2 = bert(x), other(x)
        assert torch.equal(bert.mlm_logits(h), other.mlm_logits(h2))
        assert torch.equal(bert.nsp_logits(h), other.nsp_logits(h2))


def test_mlm_logits_of_gathered_positions_equal_those_of_the_full_sequence():
    bert = model()
    x = torch.randint(5, 50, (2, 10))
    chosen = torch.rand(2, 10) < 0.3
    with torch.no_grad():
        h = bert(x)
        full = bert.mlm_logits(h)  # (B, T, vocab)
        gathered = bert.mlm_logits(h[chosen])  # (N, vocab)
    assert full.shape == (2, 10, 50)
    assert torch.allclose(full[chosen], gathered, atol=1e-6)
    assert bert.nsp_logits(h).shape == (2, 2)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_attention_maps_are_full_and_give_padding_keys_no_weight(norm):
    bert = model(norm)
    x = torch.randint(5, 50, (2, 10))
    lengths = torch.tensor([10, 6])
    with torch.no_grad():
        fused = bert(x, lengths)
        bert.attention_maps(True)
        explicit = bert(x, lengths)
    maps = bert.blocks[1].attn.last_map
    assert maps.shape == (2, 2, 10, 10)
    assert torch.allclose(fused[0], explicit[0], atol=1e-5)
    assert torch.allclose(fused[1, :6], explicit[1, :6], atol=1e-5)
    above = torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert maps[0, :, above].min() > 0  # bidirectional: weight on later tokens too
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 10))
    assert maps[1, :, :, 6:].abs().max() == 0  # padding keys
    assert maps[1, :, :, :6].min() > 0


def test_post_norm_block_ends_layer_normalised_and_pre_norm_block_does_not():
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 6, 16) + 1
    post = Block(16, 2, causal=False, norm="post").eval()
    pre = Block(16, 2, causal=False, norm="pre").eval()
    pre.load_state_dict(post.state_dict())  # same parameters, only the order differs
    with torch.no_grad():
        y, z = post(x), pre(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)
    assert z.var(-1, unbiased=False).mean() > 2  # pre-norm keeps the raw residual stream


def test_param_count_counts_the_tied_matrix_once_and_leaves_out_position_tables():
    bert = model()
    c = bert.cfg
    unique = {p.data_ptr(): p.numel() for p in bert.state_dict().values()}
    assert bert.num_params(non_embedding=False) == sum(unique.values())
    assert (bert.num_params(non_embedding=False) - bert.num_params()
            == (c.block_size + c.type_vocab_size) * c.n_embd)
    assert bert.flops_per_token() == (6 * bert.num_params()
                                      + 12 * c.n_layer * c.block_size * c.n_embd)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="norm must be"):
        BERT(BERTConfig(vocab_size=50, norm="sandwich"))


def test_without_nsp_there_is_no_next_sentence_head_to_leave_unused():
    plain = model(nsp=False)
    names = {n for n, _ in plain.named_parameters()}
    assert not any(n.startswith(("pooler", "nsp_head")) for n in names)
    with pytest.raises(ValueError, match="no next-sentence head"):
        plain.nsp_logits(plain(torch.randint(5, 50, (1, 4))))
