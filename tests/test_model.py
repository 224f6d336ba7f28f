""" the model, as executable lecture notes: each test is one property a reader should believe """
import math

import pytest
import torch
from torch.nn import functional as F

import gpt


def tiny(**kw):
    args = dict(vocab_size=65, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    return gpt.GPTLanguageModel(gpt.GPTConfig(**args))


def test_shapes_of_logits_and_loss():
    model = tiny()
    idx = torch.randint(65, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 65)
    assert loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 65) and loss is None


def test_loss_at_init_is_close_to_uniform_guess():
    model = tiny()
    idx = torch.randint(65, (8, 16))
    _, loss = model(idx, torch.randint(65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.3


@pytest.mark.parametrize('fused', [True, False])
def test_causality_future_tokens_do_not_change_the_past(fused):
    model = tiny(fused_attention=fused).eval()
    idx = torch.randint(65, (2, 16))
    t = 7
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 65
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_a_tiny_model_overfits_one_batch():
    model = tiny(n_layer=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize('qkv_bias', [False, True])
def test_fused_attention_equals_the_lectures_per_head_attention(qkv_bias):
    config = gpt.GPTConfig(vocab_size=65, block_size=16, n_embd=32, n_head=4, dropout=0.0, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    mha = gpt.MultiHeadAttention(config)
    if qkv_bias:
        for h in mha.heads:  # non-zero biases, so a misplaced one would show
            for linear in (h.key, h.query, h.value):
                torch.nn.init.normal_(linear.bias, std=0.1)
    x = torch.randn(3, 16, 32)
    w = torch.randn(3, 16, 32)  # a loss that weighs every output differently
    results = []
    for fused in (False, True):
        mha.fused = fused
        mha.zero_grad()
        xi = x.clone().requires_grad_()
        out = mha(xi)
        (out * w).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in mha.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-5)
    assert torch.allclose(gx1, gx2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_mathematical_trick_three_ways_and_as_attention():
    torch.manual_seed(1337)
    B, T, C = 4, 8, 2
    x = torch.randn(B, T, C)
    # version 1: for loops, each position averages itself and the positions before it
    xbow = torch.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            xbow[b, t] = torch.mean(x[b, :t + 1], 0)
    # version 2: a matrix multiply with a lower triangular matrix whose rows sum to 1
    wei = torch.tril(torch.ones(T, T))
    wei = wei / wei.sum(1, keepdim=True)
    xbow2 = wei @ x  # (T,T) @ (B,T,C) -> (B,T,C)
    # version 3: softmax of a masked matrix of zeros
    wei = torch.zeros((T, T)).masked_fill(torch.tril(torch.ones(T, T)) == 0, float('-inf'))
    xbow3 = F.softmax(wei, dim=-1) @ x
    assert torch.allclose(xbow, xbow2, atol=1e-6)
    assert torch.allclose(xbow, xbow3, atol=1e-6)
    # and a Head whose queries are all zero scores every past position alike: uniform attention
    head = gpt.Head(gpt.GPTConfig(vocab_size=1, block_size=T, n_embd=C, dropout=0.0), head_size=C)
    with torch.no_grad():
        head.query.weight.zero_()
        head.value.weight.copy_(torch.eye(C))
    assert torch.allclose(head(x), xbow, atol=1e-6)


@pytest.mark.parametrize('variant', [dict(activation='gelu'), dict(activation='relu'), dict(qkv_bias=True),
                                     dict(qkv_bias=False), dict(position_embedding='sinusoidal'),
                                     dict(position_embedding='learned')])
def test_each_variant_trains(variant):
    model = tiny(n_layer=1, **variant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    act = model.blocks[0].ffwd.net[1]
    if 'activation' in variant:
        assert isinstance(act, torch.nn.GELU if variant['activation'] == 'gelu' else torch.nn.ReLU)
    if 'qkv_bias' in variant:
        assert (model.blocks[0].sa.heads[0].key.bias is not None) == variant['qkv_bias']
    if 'position_embedding' in variant:
        learned = isinstance(model.position_embedding_table, torch.nn.Embedding)
        assert learned == (variant['position_embedding'] == 'learned')


# the position embedding: the lecture's learned table, or the Transformer paper's fixed sin/cos waves

@pytest.mark.parametrize('C', [10, 9])  # an odd width ends on a sin
def test_the_sinusoidal_table_is_the_papers_formula(C):
    T = 16
    table = gpt.SinusoidalPositions(T, C)(torch.arange(T))  # (T,C)
    assert table.shape == (T, C)
    for pos in range(T):
        for c in range(C):
            angle = pos / 10000 ** (2 * (c // 2) / C)
            expected = math.sin(angle) if c % 2 == 0 else math.cos(angle)  # sin at even channels, cos at odd
            assert table[pos, c].item() == pytest.approx(expected, abs=1e-5)


def test_the_sinusoidal_embedding_is_neither_a_parameter_nor_saved():
    learned, fixed = tiny(), tiny(position_embedding='sinusoidal')
    n_learned = sum(p.numel() for p in learned.parameters())
    assert sum(p.numel() for p in fixed.parameters()) == n_learned - 16 * 32  # block_size x n_embd fewer
    assert 'position_embedding_table.weight' in learned.state_dict()  # the lecture's names, as they were
    assert not [k for k in fixed.state_dict() if k.startswith('position_embedding')]


def test_a_sinusoidal_position_changes_what_a_token_predicts():
    model = tiny(position_embedding='sinusoidal')
    logits, _ = model(torch.zeros((1, 8), dtype=torch.long))  # the same token at 8 positions
    assert not torch.allclose(logits[0, 0], logits[0, 7], atol=1e-4)


# LayerNorm, as the lecture writes it by hand

class LayerNorm1d:
    """ the lecture's LayerNorm: normalize each row's features, then a learned scale and shift """

    def __init__(self, dim, eps=1e-5):
        self.eps = eps
        self.gamma = torch.ones(dim)
        self.beta = torch.zeros(dim)

    def __call__(self, x):
        xmean = x.mean(1, keepdim=True)  # batch mean
        xvar = x.var(1, keepdim=True, unbiased=False)  # batch variance (nn.LayerNorm's: divided by n)
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)  # normalize to unit variance
        return self.gamma * xhat + self.beta


def test_the_lectures_layernorm_equals_nn_layernorm():
    x = torch.randn(32, 100) * 3 + 2
    assert torch.allclose(LayerNorm1d(100)(x), torch.nn.LayerNorm(100)(x), atol=1e-5)


def test_layernorm_normalizes_each_tokens_features():
    x = torch.randn(32, 100) * 3 + 2
    out = LayerNorm1d(100)(x)
    assert torch.allclose(out.mean(dim=1), torch.zeros(32), atol=1e-5)  # each row: mean 0
    assert torch.allclose(out.std(dim=1, unbiased=False), torch.ones(32), atol=1e-3)  # and std 1
    assert out[:, 0].std() > 0.5 and abs(out[:, 0].mean()) > 1e-3  # a column is not normalized


def test_batchnorm_normalizes_each_feature_across_the_batch_and_keeps_buffers():
    x = torch.randn(32, 100) * 3 + 2
    bn = torch.nn.BatchNorm1d(100)
    out = bn(x)
    assert torch.allclose(out.mean(dim=0), torch.zeros(100), atol=1e-5)  # each column: mean 0
    assert torch.allclose(out.std(dim=0, unbiased=False), torch.ones(100), atol=1e-3)  # and std 1
    assert not torch.allclose(out.mean(dim=1), torch.zeros(32), atol=1e-2)  # a row is not normalized
    assert {'running_mean', 'running_var'} <= dict(bn.named_buffers()).keys()  # LayerNorm keeps none
    assert not list(torch.nn.LayerNorm(100).buffers())


def test_generate_never_feeds_more_than_block_size_and_restores_the_mode():
    model = tiny(block_size=8)
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    for mode in (True, False):
        model.train(mode)
        out = model.generate(torch.zeros((1, 1), dtype=torch.long), 20)
        assert out.shape == (1, 21)
        assert model.training == mode
    assert max(lengths) == 8


def test_greedy_decoding_is_deterministic_whatever_the_seed():
    model = tiny()
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(model.generate(torch.zeros((1, 1), dtype=torch.long), 20, temperature=0))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(3)
    assert torch.equal(model.generate(torch.zeros((1, 1), dtype=torch.long), 20, top_k=1), outs[0])
    sampled = [model.generate(torch.zeros((1, 1), dtype=torch.long), 20, temperature=2.0) for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])


def test_top_k_only_samples_the_k_most_likely():
    model = tiny()
    torch.manual_seed(0)
    idx = torch.zeros((1, 1), dtype=torch.long)
    logits, _ = model(idx)
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    for _ in range(30):
        nxt = model.generate(idx, 1, temperature=5.0, top_k=3)[0, -1].item()
        assert nxt in allowed
