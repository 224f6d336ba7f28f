""" lecture_steps.py: the lecture's models one step at a time, each the size the video builds, and what they teach """
import pytest
import torch

import gpt
import lecture_steps
from test_cli import STEP_LINE

V, C, T, H, L = 65, 32, 8, 4, 3  # the lecture's vocabulary, n_embd, block_size, n_head and n_layer


def lecture_parameter_count(step, V=V):
    """ the video's model at each step, counted by hand: weights and biases of each layer it adds """
    embeddings = V * C + T * C  # token_embedding_table, position_embedding_table
    lm_head = C * V + V
    heads = H * 3 * C * (C // H)  # key, query, value of each head, no bias: as many as one head of C
    first_ffwd = C * C + C  # Linear(C, C) and a ReLU
    block = heads + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)  # sa with proj, ffwd 4x wide inside
    layer_norms = L * 2 * 2 * C + 2 * C  # ln1 and ln2 of each block, and ln_f: a weight and a bias of C each
    return {0: V * V,
            1: embeddings + 3 * C * C + lm_head,
            2: embeddings + heads + lm_head,
            3: embeddings + heads + first_ffwd + lm_head,
            4: embeddings + L * block + lm_head,
            5: embeddings + L * block + lm_head,
            6: embeddings + L * block + layer_norms + lm_head}[step]


def build(step):
    model_class, _ = lecture_steps.step_settings(step)
    torch.manual_seed(0)
    return model_class(gpt.GPTConfig(vocab_size=V, block_size=T, n_embd=C, n_head=H, n_layer=L, dropout=0.0,
                                     activation='relu'))


def test_the_steps_are_the_lectures_in_order():
    assert list(lecture_steps.steps) == [0, 1, 2, 3, 4, 5, 6]
    assert lecture_steps.steps[6][2] is gpt.GPTLanguageModel  # the last step is gpt.py's model itself


@pytest.mark.parametrize('step', range(7))
def test_each_step_has_the_lectures_size_and_shapes(step):
    model = build(step)
    assert sum(p.numel() for p in model.parameters()) == lecture_parameter_count(step)
    idx = torch.randint(V, (4, T))
    logits, loss = model(idx, idx)
    assert logits.shape == (4, T, V) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (4, T, V) and loss is None
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 2 * T)  # longer than block_size: crops
    assert out.shape == (1, 1 + 2 * T)


@pytest.mark.parametrize('step, names', [
    (1, {'token_embedding_table', 'position_embedding_table', 'sa_head', 'lm_head'}),
    (2, {'token_embedding_table', 'position_embedding_table', 'sa_heads', 'lm_head'}),
    (3, {'token_embedding_table', 'position_embedding_table', 'sa_heads', 'ffwd', 'lm_head'}),
    (4, {'token_embedding_table', 'position_embedding_table', 'blocks', 'lm_head'}),
    (5, {'token_embedding_table', 'position_embedding_table', 'blocks', 'lm_head'}),
])
def test_layers_have_the_lectures_names(step, names):
    model = build(step)
    assert {name for name, _ in model.named_children()} == names
    keys = model.state_dict().keys()
    if step < 4:
        assert not any('proj' in k for k in keys)  # the projections come with the blocks
    else:
        assert 'blocks.2.sa.proj.weight' in keys and 'blocks.2.ffwd.net.2.weight' in keys
    assert not any('ln' in k for k in keys)  # LayerNorm comes at step 6


@pytest.mark.parametrize('step', range(1, 7))
def test_future_tokens_do_not_change_the_past(step):
    model = build(step)
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_steps_4_and_5_have_the_same_weights_used_differently():
    plain, residual = build(4), build(5)
    residual.load_state_dict(plain.state_dict())  # strict: the same names and shapes
    idx = torch.randint(V, (2, T))
    assert not torch.allclose(plain(idx)[0], residual(idx)[0])


@pytest.mark.parametrize('step', range(7))
def test_each_step_trains_through_gpt_main(step, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    lecture_steps.main([f'--step={step}', '--device=cpu', '--max_iters=4', '--eval_interval=2', '--eval_iters=2',
                        '--batch_size=8', '--max_new_tokens=10'])
    out = capsys.readouterr().out
    assert [int(s) for s, _, _ in STEP_LINE.findall(out)] == [0, 2, 4]
    ckpt = torch.load(workdir / f'out-step{step}' / 'ckpt.pt', map_location='cpu', weights_only=True)
    model_class, _ = lecture_steps.step_settings(step)
    assert ckpt['model_class'] == model_class.__name__ and ckpt['step'] == 4
    n = sum(t.numel() for t in ckpt['model'].values())
    assert n == lecture_parameter_count(step, V=ckpt['model_args']['vocab_size'])  # this text's vocabulary
    assert ckpt['config']['learning_rate'] == (1e-2 if step == 0 else 1e-3) and ckpt['config']['n_embd'] == 32


def test_the_lectures_settings():
    _, d = lecture_steps.step_settings(3)
    assert (d['batch_size'], d['block_size'], d['n_embd'], d['max_iters'], d['eval_interval']) == (32, 8, 32, 5000, 500)
    assert d['learning_rate'] == 1e-3 and d['min_lr_frac'] == 1.0 and d['warmup_iters'] == 0  # a flat rate
    assert (d['beta1'], d['beta2'], d['weight_decay'], d['grad_clip']) == (0.9, 0.999, 0.01, 0.0)  # torch's AdamW
    assert d['max_time'] == 0 and d['dropout'] == 0.0 and d['activation'] == 'relu' and d['out_dir'] == 'out-step3'
    # gpt.get_config takes any key of defaults without a word, so a misspelt one would silently do nothing
    assert set(lecture_steps.defaults) <= set(gpt.read_constants())


def val_loss(step, capsys, *args):
    lecture_steps.main([f'--step={step}', '--device=cpu', '--max_new_tokens=0', '--max_iters=600',
                        '--eval_interval=600', '--eval_iters=10', *args])
    return float(STEP_LINE.findall(capsys.readouterr().out)[-1][2])


def test_blocks_with_residuals_beat_the_bigram_which_beats_blocks_without(workdir, monkeypatch, capsys):
    # 600 steps each, seeded: the margins are 0.2 and 0.5, several times what the seed moves them
    monkeypatch.chdir(workdir)
    bigram, plain, residual = (val_loss(step, capsys) for step in (0, 4, 5))
    assert residual < bigram - 0.1
    assert bigram < plain - 0.2


def test_help_lists_the_steps_and_bad_steps_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        lecture_steps.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f'--step={k}' in out for k in range(7)) and 'residual' in out
    assert '--block_size=8' in out and '--learning_rate=0.001' in out  # then gpt.py's settings, the lecture's values
    for argv in (['--step=7'], ['--step=x'], ['--step', '3'], [], ['--max_iters=5']):
        with pytest.raises(SystemExit) as e:
            lecture_steps.main(argv)
        assert str(e.value).startswith('error: ') and '--step' in str(e.value) and '\n' not in str(e.value)
