""" bigram.py and lecture_steps.py start as gpt.py does: the same console, signals, clock and
refusals, through gpt.run_script """
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

import gpt
import lecture_steps
from conftest import ROOT, TINY

SCRIPTS = [['bigram.py'], ['lecture_steps.py', '--step=1'], ['gpt.py', *TINY]]


def start(cwd, script, *args, env=None):
    """ a script's long run in a process of its own, reading its output line by line """
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda s: s[0])
def test_every_script_stops_saved_and_quiet_when_its_reader_goes_away(workdir, script):
    # as `python bigram.py | head -3`: the reader closes the pipe after the first lines
    proc = start(workdir, *script, '--device=cpu', '--max_iters=100000', '--eval_interval=50',
                 '--eval_iters=2', '--out_dir=o')
    for line in proc.stdout:
        if line.startswith('step 50:'):
            break
    proc.stdout.close()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert 'Traceback' not in proc.stderr.read()
    assert torch.load(workdir / 'o' / 'ckpt.pt', weights_only=True)['step'] >= 50


@pytest.mark.parametrize('script', SCRIPTS[:2], ids=lambda s: s[0])
def test_every_script_prints_what_the_console_cannot_show_as_question_marks(workdir, script):
    (workdir / 'zh.txt').write_text('床前明月光，疑是地上霜。举头望明月，低头思故乡。\n' * 100,
                                    encoding='utf-8')
    p = subprocess.run([sys.executable, os.path.join(ROOT, script[0]), *script[1:], '--device=cpu',
                        '--input_file=zh.txt', '--max_iters=20', '--eval_interval=10',
                        '--eval_iters=2', '--max_new_tokens=20', '--out_dir=o'],
                       cwd=workdir, capture_output=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONIOENCODING': 'ascii'})
    assert p.returncode == 0 and b'Traceback' not in p.stderr, p.stderr
    assert b'???' in p.stdout and b'saved o' in p.stdout


def test_the_clock_starts_before_torch_is_loaded(tmp_path):
    # max_time counts from the script's start: gpt.py's clock must be read before torch loads,
    # whichever script imports it
    code = """if 1:
        import sys, time
        class Spy:
            t = None
            def find_spec(self, name, path=None, target=None):
                if name == 'torch' and Spy.t is None:
                    Spy.t = time.time()
        sys.meta_path.insert(0, Spy())
        import {module}, gpt
        print(gpt.started <= Spy.t)"""
    for module in ('bigram', 'lecture_steps', 'gpt'):
        p = subprocess.run([sys.executable, '-c', code.format(module=module)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, 'PYTHONPATH': ROOT})
        assert p.stdout.strip() == 'True', (module, p.stdout, p.stderr)


@pytest.mark.parametrize('script', ['bigram.py', 'lecture_steps.py'])
def test_every_script_hands_main_the_scripts_clock(monkeypatch, script):
    seen = {}
    monkeypatch.setattr(gpt, 'main', lambda argv, **kwargs: seen.update(kwargs, argv=argv))
    monkeypatch.setattr(sys, 'stdout', sys.stdout)  # run_script wraps it: put it back afterwards
    step = ['--step=2'] if script == 'lecture_steps.py' else []
    monkeypatch.setattr(sys, 'argv', [script, *step, '--max_iters=7'])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    assert seen['t_begin'] == gpt.started and seen['argv'] == ['--max_iters=7']


@pytest.mark.parametrize('argv, words', [
    (['--step=0', '--optim=muon'], 'BigramLanguageModel has no blocks of weight matrices'),
    (['--step=1', '--n_head=8'], 'OneHeadModel has no n_head'),
    (['--step=1', '--n_layer=6'], 'OneHeadModel has no n_layer'),
    (['--step=1', '--fused_attention=False'], 'OneHeadModel has no fused_attention'),
    (['--step=2', '--n_layer=6'], 'MultiHeadModel has no n_layer'),
    (['--step=2', '--activation=gelu'], 'MultiHeadModel has no activation'),
    (['--step=3', '--n_layer=6'], 'FeedForwardModel has no n_layer'),
    (['--step=3', '--optim=muon'], 'FeedForwardModel has no blocks of weight matrices'),
    (['--step=5', '--position_embedding=sinusoidal'], 'ResidualBlocksModel has no position_embedding'),
])
def test_a_setting_a_model_does_not_have_is_refused_before_anything_is_written(
        workdir, monkeypatch, argv, words):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as e:
        lecture_steps.main([*argv, '--device=cpu', '--max_iters=5', '--out_dir=o'])
    assert words in str(e.value.code) and '\n' not in str(e.value.code)
    assert not (workdir / 'o' / 'ckpt.pt').exists()


def test_bigram_refuses_muon_which_would_train_nothing(workdir):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bigram.py'), '--device=cpu',
                        '--optim=muon', '--max_iters=5', '--out_dir=o'], cwd=workdir,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and '--optim=adamw' in p.stderr and 'Traceback' not in p.stderr
    assert not (workdir / 'o' / 'ckpt.pt').exists()


@pytest.mark.parametrize('argv', [['--step=4', '--optim=muon'],
                                  ['--step=6', '--position_embedding=sinusoidal']])
def test_what_a_model_has_is_taken(workdir, monkeypatch, argv):
    monkeypatch.chdir(workdir)
    model = lecture_steps.main([*argv, '--device=cpu', '--max_iters=2', '--eval_iters=1',
                                '--max_new_tokens=2', '--out_dir=o'])
    ckpt = torch.load(workdir / 'o' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2 and model is not None
