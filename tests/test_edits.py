""" what a learner edits at the top of gpt.py is what runs: an edited constant does what the same --name=value
does, each run here as a learner runs it, a copy of gpt.py with the line changed, started as a script """
import os
import re
import shutil
import subprocess
import sys

import pytest

import gpt
from conftest import ROOT, TINY, load, log_rows
from test_cli import STEP_LINE

SMALL = [a for a in TINY if not a.startswith('--max_iters')]  # a tiny model; the run's length is the edit's


def edited_copy(folder, **lines):
    """ gpt.py copied into folder with each named constant's value rewritten, its comment kept """
    source = open(os.path.join(ROOT, 'gpt.py'), encoding='utf-8').read()
    for name, value in lines.items():
        source, n = re.subn(rf'^{name} = .*?(  # .*)?$', lambda m: f"{name} = {value}{m.group(1) or ''}", source,
                            count=1, flags=re.M)
        assert n == 1, name
    path = folder / 'gpt.py'
    path.write_text(source, encoding='utf-8')
    return path


def run(script, cwd, *args):
    p = subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr
    return p.stdout


def losses(out):
    return STEP_LINE.findall(out)


@pytest.fixture
def learner(workdir):
    """ a folder of the learner's own: the text, and a copy of gpt.py to edit """
    (workdir / 'mine').mkdir()
    shutil.copy(workdir / 'input.txt', workdir / 'mine' / 'input.txt')
    return workdir / 'mine'


def test_max_iters_edited_in_the_file_is_the_step_count_as_on_the_command_line(workdir, learner):
    edited = run(edited_copy(learner, max_iters=30), learner, *SMALL)  # the CPU's max_time = 180 is on
    given = run(os.path.join(ROOT, 'gpt.py'), workdir, *SMALL, '--max_iters=30')
    assert 'training: 30 steps to step 30 (max_iters) or as many as fit in 180 s (max_time)' in edited
    assert losses(edited) == losses(given) and losses(edited)[-1][0] == '30'
    assert load(learner / 'out' / 'ckpt.pt')['step'] == 30


def test_max_time_edited_in_the_file_ends_the_run_as_on_the_command_line(workdir, learner):
    edited = run(edited_copy(learner, max_time=4), learner, *SMALL, '--eval_interval=100000')
    given = run(os.path.join(ROOT, 'gpt.py'), workdir, *SMALL, '--max_time=4', '--eval_interval=100000')
    for out in (edited, given):
        assert 'or as many as fit in 4 s (max_time), whichever is fewer' in out
        assert int(losses(out)[-1][0]) < 50000  # the budget, not max_iters, ended it


def test_learning_rate_edited_in_the_file_is_the_peak_and_the_decay_follows_it(workdir, learner):
    args = [*SMALL, '--max_iters=60', '--warmup_iters=10']
    run(edited_copy(learner, learning_rate='3e-4'), learner, *args)
    run(os.path.join(ROOT, 'gpt.py'), workdir, *args, '--learning_rate=3e-4')
    edited = [float(r['lr']) for r in log_rows(learner / 'out')]
    given = [float(r['lr']) for r in log_rows(workdir / 'out')]
    assert edited == given and max(edited) <= 3e-4 and edited[-1] == pytest.approx(3e-4 * gpt.min_lr_frac, rel=1e-3)


def test_a_file_edited_before_a_resume_is_taken_and_said(workdir, learner):
    run(edited_copy(learner, max_iters=20), learner, *SMALL)
    script = edited_copy(learner, learning_rate='3e-4', max_iters=40)
    out = run(script, learner, '--device=cpu', '--init_from=resume')
    assert ("learning_rate 0.01 -> 0.0003 (edited in the file)" in out
            and 'changed: max_iters 20 -> 40 (edited in the file)' in out)
    assert losses(out)[-1][0] == '40'
    saved = load(learner / 'out' / 'ckpt.pt')['config']
    assert saved['learning_rate'] == 3e-4 and max(float(r['lr']) for r in log_rows(learner / 'out')[3:]) <= 3e-4
    # the command line still wins, and a line put back is no edit
    out = run(script, learner, '--device=cpu', '--init_from=resume', '--max_iters=50', '--learning_rate=1e-4')
    assert 'max_iters 40 -> 50,' in out and 'learning_rate 0.0003 -> 0.0001' in out and 'edited' not in out


def test_a_shape_edited_before_a_resume_is_refused_to_train_and_taken_from_the_checkpoint_to_sample(learner):
    run(edited_copy(learner, max_iters=20), learner, *SMALL)
    edited = edited_copy(learner, max_iters=40, n_layer=3, n_embd=32)
    p = subprocess.run([sys.executable, str(edited), '--device=cpu', '--init_from=resume'],
                       cwd=learner, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.count('\n') == 1
    assert ('keeps its shape (n_embd=16, n_layer=1): put back n_embd = 16 and n_layer = 1 at the top, or train a new '
            'model with another --out_dir') in p.stderr
    out = run(edited, learner, '--device=cpu', '--init_from=resume', '--max_iters=0', '--prompt=ROMEO:')
    assert 'model: GPTLanguageModel, 1 layer, 2 heads, n_embd 16' in out and 'ROMEO:' in out  # the checkpoint's


def test_each_constant_at_the_top_is_a_setting(workdir):
    """ every constant of the block reaches cfg: one that did not would be an edit that does nothing """
    cfg, _ = gpt.get_config([])
    assert set(gpt.read_constants()) == set(vars(cfg))


def test_a_warmup_as_long_as_the_run_is_said(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*SMALL, '--max_iters=10', '--warmup_iters=50'])
    out = capsys.readouterr().out
    assert 'note: warmup_iters=50 is not shorter than the run (10 steps)' in out and 'set warmup_iters below 10' in out
    gpt.main([*SMALL, '--max_iters=10', '--warmup_iters=5', '--out_dir=b'])
    assert 'warmup_iters' not in capsys.readouterr().out


@pytest.mark.parametrize('args, line', [
    (['--optim=muon'], "optimizer: Muon (lr 0.012, momentum 0.9) for the blocks' 9 matrices, AdamW (lr 0.01, "
                           "betas 0.9, 0.95) for the rest, the embedding tables at lr 0.03, weight decay 0.1; "
                           f"learning rate: 2 warmup steps, then a cosine decay to {gpt.min_lr_frac:g}x at the end"),
    (['--optim=adamw', '--min_lr_frac=1.0', '--warmup_iters=0', '--embedding_lr_scale=1.0'],
     "optimizer: AdamW (lr 0.01, betas 0.9, 0.95), weight decay 0.1; learning rate: flat"),
])
def test_the_start_of_a_run_names_the_optimizer_and_the_precision(workdir, monkeypatch, capsys, args, line):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, *args])
    out = capsys.readouterr().out.splitlines()
    assert line in out and out[0].startswith('device: cpu, fp32')
