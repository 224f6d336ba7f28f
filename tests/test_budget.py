""" the time budget: a run times its first steps, plans how many fit in max_time, and keeps to the plan; and the
learning-rate schedule """
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import gpt
from conftest import ROOT, TINY, log_rows
from test_cli import STEP_LINE

NO_STEPS = [a for a in TINY if not a.startswith('--max_iters')]  # so max_time picks the steps


def test_the_plan_fills_the_budget_and_no_more(capsys):
    cfg = SimpleNamespace(max_time=100, eval_interval=500, eval_iters=40, batch_size=32, block_size=64,
                          num_samples=1, max_new_tokens=500, preview_chars=gpt.preview_chars)
    n, final_s = gpt.plan_steps(cfg, torch.device('cpu'), 50, step_s=0.05, elapsed=5.0, eval_s=1.0, char_s=0.004,
                                val_tokens=100_000)
    assert n % 50 == 0
    def total(n):  # training, the evaluations on the way (with a preview), the last one, the whole val split, the sample
        eval_s, token_s = 1.0 + 0.004 * gpt.preview_chars, 1.0 / (2 * 40 * 32 * 64)
        return 5.0 + (n - 50) * 0.05 + (n // 500 + 1) * eval_s + token_s * 100_000 + 0.004 * 500
    assert total(n) <= 0.97 * 100 < total(n + 50)  # 3% is kept for starting up and for noise
    assert f'time budget 100 s: {n} steps at 50 ms/step' in capsys.readouterr().out


def virtual_clock(monkeypatch, seconds_per_batch=0.01):
    """ gpt.py's clock, made to advance 10 ms with each batch drawn: a plan that depends on the code, not on how
    busy the machine is """
    now = [1e9]
    def get_batch(*args, **kwargs):
        now[0] += seconds_per_batch
        return draw(*args, **kwargs)
    draw = gpt.get_batch
    monkeypatch.setattr(gpt, 'get_batch', get_batch)
    monkeypatch.setattr(gpt, 'time', SimpleNamespace(time=lambda: now[0], strftime=time.strftime,
                                                     localtime=time.localtime))


def test_a_budget_run_plans_its_steps_and_keeps_to_them(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch)
    gpt.main([*NO_STEPS, '--max_time=8', '--eval_interval=500'])
    out = capsys.readouterr().out
    planned = int(re.search(r'time budget 8 s: (\d+) steps at 10 ms/step', out).group(1))
    assert planned % 50 == 0 and planned > 50
    last = [int(s) for s, _, _ in STEP_LINE.findall(out)][-1]
    assert last == planned and 'slowed down' not in out
    saved = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == saved['config']['max_iters'] == last and saved['config']['lr_decay_iters'] == planned


def test_max_iters_on_the_command_line_turns_the_budget_off(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*NO_STEPS, '--max_time=5', '--max_iters=60', '--eval_interval=30'])
    out = capsys.readouterr().out
    assert 'time budget' not in out and [s for s, _, _ in STEP_LINE.findall(out)] == ['0', '30', '60']


def run_planned(cwd, *args, stop_at=None):
    """ a budget run whose plan is fixed at 300 steps (timings differ from run to run), cut by Ctrl-C if asked """
    code = f"""
import os, signal, gpt
gpt.plan_steps = lambda *args: (300, 0.0)
train_step = gpt.get_lr
def get_lr(step, cfg, *end):
    if step == {stop_at!r}:
        os.kill(os.getpid(), signal.SIGINT)
    return train_step(step, cfg, *end)
gpt.get_lr = get_lr
gpt.main({[*NO_STEPS, '--max_time=100', '--eval_interval=100', *args]!r})
"""
    p = subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT})
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_a_budget_run_cut_and_resumed_equals_the_whole_run(workdir):
    run_planned(workdir, '--out_dir=whole')
    assert 'Ctrl-C' in run_planned(workdir, '--out_dir=cut', stop_at=170)
    assert torch.load(workdir / 'cut' / 'ckpt.pt', weights_only=True)['step'] == 171
    resumed = run_planned(workdir, '--out_dir=cut', '--init_from=resume')
    assert 'time budget' not in resumed  # it continues to the planned step, no new plan
    a = torch.load(workdir / 'whole' / 'ckpt.pt', weights_only=True)
    b = torch.load(workdir / 'cut' / 'ckpt.pt', weights_only=True)
    assert a['step'] == b['step'] == 300
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name


def test_a_machine_that_slows_after_the_plan_still_ends_in_time(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(gpt, 'plan_steps', lambda *args: (10 ** 6, 0.0))  # a plan this machine cannot keep
    gpt.main([*NO_STEPS, '--max_time=3', '--eval_interval=100000'])
    out = capsys.readouterr().out
    assert 'has slowed down since the plan, so the run ends now' in out and 'whole split' in out
    last = int(STEP_LINE.findall(out)[-1][0])
    assert 50 <= last < 10 ** 6 and torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)['step'] == last


# the learning-rate schedule

def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [gpt.get_lr(s, cfg, 100) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_training_on_past_the_end_goes_on_at_min_lr(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=40'])
    lrs = {int(r['step']): float(r['lr']) for r in log_rows(workdir / 'out')}
    assert lrs[20] == lrs[30] == lrs[40] == pytest.approx(gpt.min_lr)  # no jump back up the schedule
    assert lrs[10] > lrs[20]
