import pytest
import torch

from bigmodel.errors import BigModelError
from bigmodel.tasks.clm import TextGenerator, sample
from bigmodel.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def model(seed: int = 0) -> GPT:
    """A random GPT with weights large enough that the next token depends on the whole context
    (the GPT-2 init gives near-uniform logits, under which a broken cache could go unnoticed)."""
    torch.manual_seed(seed)
    gpt = GPT(CFG).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return gpt


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_len, new", [(1, 10), (5, 30), (16, 4), (20, 6)])
def test_greedy_tokens_are_the_same_with_and_without_the_cache_also_past_block_size(prompt_len,
                                                                                    new):
    gpt, idx = model(), prompt(prompt_len)
    cached = sample(gpt, idx, new, temperature=0, use_cache=True)
    full = sample(gpt, idx, new, temperature=0, use_cache=False)
    assert cached.shape == (1, prompt_len + new)
    assert torch.equal(cached, full)
    assert len(set(cached[0, prompt_len:].tolist())) > 1  # not a constant run that hides bugs


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit-softmax"])
def test_cached_chunks_and_single_steps_give_the_full_forward_logits_at_every_position(explicit):
    gpt, idx = model(), prompt(CFG.block_size)
    gpt.attention_maps(explicit)
    with torch.no_grad():
        full, _ = gpt(idx)  # (1, 16, vocab)
        cache = gpt.new_cache()
        # a prefill, a chunk after cached keys (explicit mask), then one token at a time
        pieces = [gpt(idx[:, :5], cache=cache)[0], gpt(idx[:, 5:8], cache=cache)[0]]
        pieces += [gpt(idx[:, t:t + 1], cache=cache)[0] for t in range(8, CFG.block_size)]
    assert cache[0].length == CFG.block_size
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    if explicit:  # the last step's map covers every cached key and sums to one
        last = gpt.blocks[0].attn.last_map
        assert last.shape == (1, CFG.n_head, 1, CFG.block_size)
        assert torch.allclose(last.sum(-1), torch.ones(1, CFG.n_head, 1))


def test_feeding_the_cache_past_block_size_is_refused():
    gpt = model()
    with torch.no_grad():
        cache = gpt.new_cache()
        gpt(prompt(CFG.block_size), cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size"):
            gpt(prompt(1), cache=cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_1_and_a_tiny_top_p_both_pick_the_greedy_token(use_cache):
    gpt, idx = model(), prompt(4)
    greedy = sample(gpt, idx, 12, temperature=0, use_cache=use_cache)
    gen = torch.Generator().manual_seed(0)
    top_k = sample(gpt, idx, 12, temperature=1.5, top_k=1, generator=gen, use_cache=use_cache)
    top_p = sample(gpt, idx, 12, temperature=1.5, top_p=1e-6, generator=gen, use_cache=use_cache)
    assert torch.equal(top_k, greedy)
    assert torch.equal(top_p, greedy)


def test_a_fixed_seed_gives_the_same_sample_twice_and_another_seed_differs():
    gpt, idx = model(), prompt(4)

    def draw(seed: int, use_cache: bool = True) -> torch.Tensor:
        return sample(gpt, idx, 20, temperature=1.5, top_k=20, top_p=0.95,
                      generator=torch.Generator().manual_seed(seed), use_cache=use_cache)

    assert torch.equal(draw(7), draw(7))
    assert torch.equal(draw(7), draw(7, use_cache=False))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
])
def test_bad_sampling_arguments_are_one_line_user_errors(kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(BigModelError, match=match) as err:
        sample(model(), prompt(2), **args)
    assert "\n" not in str(err.value)


def test_an_empty_prompt_is_a_user_error():
    with pytest.raises(BigModelError, match="non-empty prompt"):
        sample(model(), torch.zeros(1, 0, dtype=torch.long), 3)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_stops_right_after_the_eos_token(use_cache):
    gpt, idx = model(), prompt(3)
    free = sample(gpt, idx, 12, temperature=0, use_cache=use_cache)[0, 3:].tolist()
    eos = free[4]
    first = free.index(eos)  # the eos token may already appear earlier
    stopped = sample(gpt, idx, 12, temperature=0, eos_id=eos, use_cache=use_cache)
    assert stopped[0, 3:].tolist() == free[:first + 1]


def test_text_generator_completes_the_same_text_with_and_without_the_cache(tiny_gpt_dir):
    gen = TextGenerator.load(tiny_gpt_dir)  # block_size 32: 40 new tokens run past it
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=g)
    cached = gen.complete("def read(path):", 40, temperature=0, use_cache=True)
    full = gen.complete("def read(path):", 40, temperature=0, use_cache=False)
    assert cached == full and cached
