""" the pictures: out_dir/loss.png after each evaluation, and --plot_attention=True's heatmap of each head over the prompt """
import os
import subprocess
import sys
import warnings

import pytest
import torch

import bigram
import gpt
import lecture_steps
from conftest import ROOT
from conftest import TINY as NO_PLOT
from test_cli import STEP_LINE

TINY = [*NO_PLOT, '--plot=True']  # the tiny run, drawing loss.png

# python -c with matplotlib unimportable, as on a machine that has only requirements.txt
WITHOUT_MATPLOTLIB = f"import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, {ROOT!r}); import gpt; gpt.main(sys.argv[1:])"


def png_size(path):
    """ (width, height) of a PNG file, after checking its 8-byte signature """
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
    assert len(data) > 5000  # lines, text and colour, not an empty canvas
    return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')


def spy(monkeypatch, name):
    """ replace gpt.<name> by a wrapper that records the arguments of each call and then draws as before """
    calls, draw = [], getattr(gpt, name)
    monkeypatch.setattr(gpt, name, lambda *args: (calls.append(args), draw(*args))[1])
    return calls


def test_each_evaluation_draws_loss_png_and_a_resumed_run_draws_its_whole_history(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    calls = spy(monkeypatch, 'draw_loss_curve')
    gpt.main(TINY)
    assert len(calls) == 3  # steps 0, 10 and 20
    assert png_size(workdir / 'out' / 'loss.png') == (700, 450)
    assert 'GPTLanguageModel: 1 layer, 2 heads, n_embd 16, block_size 16\non cpu' == calls[0][2]
    gpt.main([*TINY, '--init_from=resume', '--max_iters=30'])
    assert len(calls) == 4 and png_size(workdir / 'out' / 'loss.png') == (700, 450)
    rows = gpt.read_log(workdir / 'out' / 'log.csv')
    assert [r[0] for r in rows] == [0, 10, 20, 30]
    assert [r[0] for r in rows if r[3] is not None] == [20, 30]  # each run's whole-split val loss, a marked point
    assert sorted(os.listdir(workdir / 'out')) == ['best.pt', 'ckpt.pt', 'data.bin', 'data.json', 'log.csv', 'loss.png',
                                                   'run.lock']
    gpt.main([*TINY, '--max_iters=10'])  # a new run: the last one's picture is kept with its model
    [kept] = (workdir / 'out' / 'previous').iterdir()
    assert png_size(kept / 'loss.png') == (700, 450) and len(gpt.read_log(kept / 'log.csv')) == 4


def test_an_older_log_without_the_whole_split_column_is_drawn(tmp_path):
    log = tmp_path / 'log.csv'
    log.write_text('step,train_loss,val_loss,lr,elapsed_s\n0,4.1,4.2,1e-3,1.0\n')  # an older log: no whole_val_loss
    assert gpt.read_log(log) == [(0, 4.1, 4.2, None)]
    gpt.draw_loss_curve(log, str(tmp_path / 'loss.png'), 'one point')
    assert png_size(tmp_path / 'loss.png') == (700, 450) and os.listdir(tmp_path) == ['log.csv', 'loss.png']


def test_a_drawing_error_is_said_once_and_the_run_goes_on(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    calls = []
    def broken(*args):
        calls.append(args)
        raise ValueError('no room on the page\nsecond line')
    monkeypatch.setattr(gpt, 'draw_loss_curve', broken)
    gpt.main(TINY)
    out = capsys.readouterr().out
    assert len(calls) == 1 and [int(s) for s, _, _ in STEP_LINE.findall(out)] == [0, 10, 20]
    lines = [line for line in out.splitlines() if 'loss.png' in line]
    assert lines == [f"{os.path.join('out', 'loss.png')} is not drawn (ValueError: no room on the page); "
                     "the run goes on without it"]


def test_plot_false_draws_nothing(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    calls = spy(monkeypatch, 'draw_loss_curve')
    gpt.main([*TINY, '--plot=False'])
    assert calls == [] and not (workdir / 'out' / 'loss.png').exists()


def test_without_matplotlib_a_run_trains_without_pictures_and_attention_is_a_one_line_error(workdir):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-c', WITHOUT_MATPLOTLIB, *TINY], cwd=workdir, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert [int(s) for s, _, _ in STEP_LINE.findall(p.stdout)] == [0, 10, 20]
    assert p.stdout.count('pip install matplotlib') == 1  # said once, not at each evaluation
    assert (workdir / 'out' / 'ckpt.pt').exists() and not (workdir / 'out' / 'loss.png').exists()
    p = subprocess.run([sys.executable, '-c', WITHOUT_MATPLOTLIB, *TINY, '--out_dir=att', '--plot_attention=True',
                        '--prompt=ROMEO: '], cwd=workdir, capture_output=True, text=True, timeout=120, env=env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: ') and 'pip install matplotlib' in lines[0]
    assert not (workdir / 'att' / 'ckpt.pt').exists()  # refused before any training


def expected_attention(model, idx):
    """
    Each head's softmax(q k^T / sqrt(hs)) with the causal mask, worked out here from its query and key weights,
    on the input the model's own forward gives it (fused or not), caught on its way into the attention module.
    """
    inputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (gpt.MultiHeadAttention, gpt.Head)):
            hooks.append(m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0])))
    model.eval()
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    T, expected = idx.shape[1], {}
    for name, head in model.named_modules():
        if isinstance(head, gpt.Head):
            parts = name.split('.')  # blocks.0.sa.heads.1: its own input, else that of blocks.0.sa (fused)
            x = next(inputs[p] for p in ('.'.join(parts[:i]) for i in range(len(parts), 0, -1)) if p in inputs)[0]  # (T,C)
            q = x @ head.query.weight.T + (0 if head.query.bias is None else head.query.bias)  # (T,hs)
            k = x @ head.key.weight.T + (0 if head.key.bias is None else head.key.bias)  # (T,hs)
            wei = (q @ k.T) / k.shape[-1] ** 0.5  # (T,T)
            expected[name] = wei.masked_fill(torch.ones(T, T).tril() == 0, float('-inf')).softmax(dim=-1)
    return expected


def assert_maps_are_the_models(maps, model, idx):
    T = idx.shape[1]
    flat = [(name, wei) for heads in maps.values() for name, wei in heads]
    expected = expected_attention(model, idx)
    assert [name for name, _ in flat] == list(expected)
    for name, wei in flat:
        assert wei.shape == (T, T)
        assert torch.allclose(wei.sum(dim=-1), torch.ones(T), atol=1e-6)  # each query's weights sum to 1
        assert (wei.triu(diagonal=1) == 0).all()  # no position attends to a later one
        assert torch.allclose(wei, expected[name], atol=1e-6), name


@pytest.mark.parametrize('qkv_bias', [False, True])
def test_attention_maps_are_what_each_head_computes(qkv_bias):
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=20, block_size=12, n_embd=16, n_head=4, n_layer=2, dropout=0.1, qkv_bias=qkv_bias)
    model = gpt.GPTLanguageModel(config).train()  # fused, in training mode with dropout: maps are drawn without it
    idx = torch.randint(20, (1, 10))
    maps = gpt.attention_maps(model, idx)
    assert list(maps) == ['blocks.0.sa.heads', 'blocks.1.sa.heads'] and all(len(h) == 4 for h in maps.values())
    assert model.training and all(m.fused for m in model.modules() if isinstance(m, gpt.MultiHeadAttention))
    assert all(not h.keep_wei and h.wei is None for h in model.modules() if isinstance(h, gpt.Head))  # as it was
    assert_maps_are_the_models(maps, model, idx)


def test_attention_true_draws_the_heads_over_the_prompt_then_samples(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--n_layer=2'])
    capsys.readouterr()
    calls = spy(monkeypatch, 'draw_attention')
    model = gpt.main(['--init_from=resume', '--max_iters=0', '--prompt=ROMEO: ', '--plot_attention=True', '--max_new_tokens=10'])
    out = capsys.readouterr().out
    path = os.path.join('out', 'attention.png')
    assert f"attention of each head over the prompt: {path}\nROMEO: " in out  # drawn, then sampled as usual
    width, height = png_size(path)
    assert width > 500 and height > 2 * 250  # 2 layers of 2 heads
    [(maps, chars, png, title)] = calls
    assert chars == 'ROMEO: ' and png == path and "attention over 'ROMEO: '" in title
    tokenizer = gpt.CharTokenizer(torch.load(os.path.join('out', 'ckpt.pt'), weights_only=True)['chars'])  # as main's
    assert_maps_are_the_models(maps, model, torch.tensor([tokenizer.encode('ROMEO: ')]))


def lecture_model(step):
    model_class, _ = lecture_steps.step_settings(step)
    torch.manual_seed(0)
    return model_class(gpt.GPTConfig(vocab_size=30, block_size=8, n_embd=32, n_head=4, n_layer=3, dropout=0.0,
                                     activation='relu'))


@pytest.mark.parametrize('step, layout', [
    (1, {'sa_head': ['sa_head']}),
    (2, {'sa_heads.heads': [f'sa_heads.heads.{j}' for j in range(4)]}),
    (3, {'sa_heads.heads': [f'sa_heads.heads.{j}' for j in range(4)]}),
    (4, {f'blocks.{i}.sa.heads': [f'blocks.{i}.sa.heads.{j}' for j in range(4)] for i in range(3)}),
    (5, {f'blocks.{i}.sa.heads': [f'blocks.{i}.sa.heads.{j}' for j in range(4)] for i in range(3)}),
])
def test_the_lectures_models_with_heads_draw_them_too(step, layout, tmp_path):
    model = lecture_model(step)
    idx = torch.randint(30, (1, 8))
    maps = gpt.attention_maps(model, idx)
    assert {group: [name for name, _ in heads] for group, heads in maps.items()} == layout  # a row per layer
    assert_maps_are_the_models(maps, model, idx)
    gpt.draw_attention(maps, 'First Ci', str(tmp_path / 'attention.png'), f"step {step} $x$")
    png_size(tmp_path / 'attention.png')


def test_attention_through_lecture_steps_with_a_prompt_longer_than_block_size(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    lecture_steps.main(['--step=2', '--device=cpu', '--max_iters=2', '--eval_interval=2', '--eval_iters=2',
                        '--max_new_tokens=5', '--prompt=First Citizen:', '--plot_attention=True'])
    out = capsys.readouterr().out
    assert 'the prompt is longer than block_size 8; drawing its last 8 characters' in out
    png_size(workdir / 'out-step2' / 'attention.png')
    png_size(workdir / 'out-step2' / 'loss.png')


@pytest.mark.parametrize('argv, model_class, words', [
    (['--plot_attention=True'], None, 'prompt'),  # nothing to draw over
    (['--plot_attention=True', '--prompt=ROMEO:'], bigram.BigramLanguageModel, 'no heads'),
])
def test_attention_refuses_what_it_cannot_draw_before_training(argv, model_class, words, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as e:
        settings = [a for a in TINY if a.split('=')[0][2:] not in getattr(model_class, 'ignored_settings', ())]
        gpt.main([*settings, *argv], model_class=model_class)
    message = str(e.value)
    assert message.startswith('error: ') and '\n' not in message and words in message
    assert not (workdir / 'out' / 'ckpt.pt').exists()



def drawn_figures(monkeypatch):
    """ each matplotlib figure gpt.py saves, kept for a look at what was drawn """
    figures, save = [], gpt.save_figure
    monkeypatch.setattr(gpt, 'save_figure',
                        lambda fig, path: (figures.append(fig), save(fig, path))[1])
    return figures


def outside(fig, *artists):
    """ the artists (texts, axes) that are not wholly inside the figure as it was last drawn """
    renderer, W, H = fig.canvas.get_renderer(), fig.bbox.width, fig.bbox.height
    boxes = [(a, a.get_window_extent(renderer)) for a in artists]
    return [a for a, b in boxes if not (0 <= b.x0 and b.x1 <= W and 0 <= b.y0 and b.y1 <= H)]


@pytest.mark.parametrize('step, shape', [
    (0, 'BigramLanguageModel: block_size 8'),
    (1, 'OneHeadModel: 1 head, n_embd 32, block_size 8'),  # one head, no blocks: no layer
    (2, 'MultiHeadModel: 4 heads, n_embd 32, block_size 8'),
    (3, 'FeedForwardModel: 4 heads, n_embd 32, block_size 8'),
    (4, 'PlainBlocksModel: 3 layers, 4 heads, n_embd 32, block_size 8'),
    (5, 'ResidualBlocksModel: 3 layers, 4 heads, n_embd 32, block_size 8'),
    (6, 'GPTLanguageModel: 3 layers, 4 heads, n_embd 32, block_size 8'),
])
def test_model_shape_says_what_each_model_has(step, shape):
    assert gpt.model_shape(lecture_model(step)) == shape


def draw_prompt(model, prompt, out_dir):
    """ --plot_attention=True's picture of model over prompt, its characters the model's vocabulary """
    tokenizer = gpt.CharTokenizer(sorted(set(prompt)))
    cfg = type('cfg', (), {'prompt': prompt, 'out_dir': str(out_dir)})
    gpt.draw_prompt_attention(model, tokenizer, cfg, torch.device('cpu'))
    return png_size(out_dir / 'attention.png')


def gpt_model(block_size, n_embd, n_head, n_layer):
    torch.manual_seed(0)
    return gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=30, block_size=block_size, n_embd=n_embd,
                                              n_head=n_head, n_layer=n_layer, dropout=0.0))


def one_head_model(block_size):
    torch.manual_seed(0)
    return lecture_steps.OneHeadModel(gpt.GPTConfig(vocab_size=30, block_size=block_size, n_embd=32,
                                                    n_head=4, n_layer=3, dropout=0.0))


@pytest.mark.parametrize('model, prompt', [
    *[(lambda step=step: lecture_model(step), 'First Citizen') for step in range(1, 7)],
    (lambda: gpt_model(64, 96, 3, 2), 'First Citizen:\nBefore we proceed any further, hear me.'),
    (lambda: one_head_model(256), 'All:\nSpeak, speak.\n' * 14),  # its last 256 characters
], ids=[*(f'step{step}' for step in range(1, 7)), 'gpt-cpu-default', 'one-head-256'])
def test_the_attention_title_is_wholly_inside_the_picture(model, prompt, tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    model = model()
    draw_prompt(model, prompt, tmp_path)
    [fig] = figures
    assert ('layer' in fig.get_suptitle()) == any(isinstance(m, gpt.Block) for m in model.modules())
    assert outside(fig, fig.texts[0], *fig.axes) == []  # the title, each heatmap and the colorbar


def test_the_attention_title_shows_the_prompts_characters_as_they_are(tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    draw_prompt(lecture_model(1), '\\b\n"c\'\t$', tmp_path)  # a backslash, newline, quotes, tab, $
    [fig] = figures
    # one backslash, as in the prompt; the $ escaped for matplotlib: a dollar sign, not $math$
    assert fig.get_suptitle().endswith("attention over '\\b\u21b5\"c'\u21e5\\$'")


@pytest.mark.parametrize('rows, ticks', [
    ([(0, 4.1368, 4.1391, None)], [0]),  # a run stopped at step 0
    ([(0, 4.1368, 4.1391, None), (1, 4.1190, 4.1224, 4.1216)], [0, 1]),  # --max_iters=1
    ([(0, 1234.56789, 1234.56791, None), (1, 1234.56788, 1234.5679, None)], [0, 1]),  # wide labels
    ([(s, 4.2 - s / 2000, 4.25 - s / 2200, None) for s in range(0, 5001, 250)],  # 5000 steps
     [0, 1000, 2000, 3000, 4000, 5000]),
])
def test_the_loss_picture_has_integer_steps_and_its_y_label_inside(rows, ticks, tmp_path, monkeypatch):
    log = tmp_path / 'log.csv'
    log.write_text('step,train_loss,val_loss,lr,elapsed_s,whole_val_loss\n' + ''.join(
        f"{s},{t},{v},1e-3,1.0,{'' if w is None else w}\n" for s, t, v, w in rows))
    figures = drawn_figures(monkeypatch)
    title = 'GPTLanguageModel: 2 layers, 3 heads, n_embd 96, block_size 64\non cpu'
    gpt.draw_loss_curve(log, str(tmp_path / 'loss.png'), title)
    assert png_size(tmp_path / 'loss.png') == (700, 450)
    [fig] = figures
    [ax] = fig.axes
    low, high = ax.get_xlim()
    assert [x for x in ax.get_xticks() if low <= x <= high] == ticks
    labels = [t for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
    assert labels and outside(fig, ax.yaxis.label, ax.title, *labels) == []


def test_a_cjk_prompt_is_drawn_in_the_installed_fonts_without_a_warning(tmp_path, monkeypatch):
    import matplotlib
    from matplotlib import font_manager
    figures, before = drawn_figures(monkeypatch), list(matplotlib.rcParams['font.family'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        draw_prompt(lecture_model(2), '日本語:\nこんにちは', tmp_path)
    assert caught == []
    families = [*before, *gpt.CJK_FONTS]  # matplotlib's own font first, then each CJK font where it has the glyph
    [fig] = figures
    texts = [fig.texts[0], *fig.axes[0].get_xticklabels(), *fig.axes[0].get_yticklabels()]
    assert all(t.get_fontfamily() == families for t in texts)
    assert matplotlib.rcParams['font.family'] == before  # as it was before the picture
    installed = {f.name for f in font_manager.fontManager.ttflist}
    if set(gpt.CJK_FONTS) & installed:  # with a CJK font installed, the prompt's characters are drawn in it
        from matplotlib.font_manager import _find_fonts_by_props
        assert len(_find_fonts_by_props(texts[0].get_fontproperties())) > 1
