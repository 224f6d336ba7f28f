""" the time budget: a run times its first steps, plans how many fit in max_time, and keeps to the plan; and the
learning-rate schedule """
import os
import re
import signal
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


def test_the_plan_fills_the_budget_and_no_more():
    cfg = SimpleNamespace(max_time=100, eval_interval=500)
    def end(n):  # training, the evaluations on the way (at 500, 1000, ...), then the last one, the split, the sample
        return 5.0 + (n - 50) * 0.05 + ((n - 1) // 500) * 1.2 + 3.0
    n = gpt.plan_steps(cfg, 50, 50000, step_s=0.05, elapsed=5.0, eval_s=1.2, final_s=3.0)
    assert n % 50 == 0 and end(n) <= 0.97 * 100 < end(n + 50)  # 3% is kept for noise
    assert gpt.plan_steps(cfg, 50, 400, step_s=0.05, elapsed=5.0, eval_s=1.2, final_s=3.0) == 400  # max_iters first
    assert gpt.plan_steps(cfg, 50, 50000, step_s=0.05, elapsed=95.0, eval_s=1.2, final_s=3.0) == 50  # none fits


def test_evaluations_are_counted_one_by_one():
    assert gpt.evaluations(0, 0, 500) == 1  # the last one only
    assert gpt.evaluations(0, 1000, 500) == 3  # at 0, 500 and 1000
    assert gpt.evaluations(50, 1000, 500) == 2  # at 500 and 1000
    assert gpt.evaluations(3, 7, 1) == 5  # at 3, 4, 5, 6 and 7
    cfg = SimpleNamespace(max_time=10, eval_interval=1)  # an evaluation after every step: each one counts
    n = gpt.plan_steps(cfg, 4, 50000, step_s=0.01, elapsed=5.0, eval_s=0.3, final_s=1.0)
    assert 5.0 + (n - 4) * 0.31 + 1.0 <= 9.7 < 5.0 + (n - 3) * 0.31 + 1.0


def virtual_clock(monkeypatch, seconds_per_batch=0.01, slower=None, step=0):
    """ gpt.py's clock, made to advance 10 ms with each batch drawn: a plan that depends on the code, not on how
    busy the machine is. slower=(k, s): from step k on (a run resumed at step), each training batch takes s """
    now, steps = [1e9], [step]
    def get_batch(*args, **kwargs):
        training = kwargs.get('generator', args[4] if len(args) > 4 else None) is None  # evaluations have theirs
        steps[0] += training
        now[0] += slower[1] if slower and training and steps[0] >= slower[0] else seconds_per_batch
        return draw(*args, **kwargs)
    draw = gpt.get_batch
    monkeypatch.setattr(gpt, 'get_batch', get_batch)
    monkeypatch.setattr(gpt, 'time', SimpleNamespace(time=lambda: now[0], strftime=time.strftime,
                                                     localtime=time.localtime))
    return now


def test_a_budget_run_plans_its_steps_and_keeps_to_them(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch)
    gpt.main([*NO_STEPS, '--max_time=8', '--eval_interval=500'])
    out = capsys.readouterr().out
    line = re.search(r'time budget 8 s: (\d+) steps at 10 ms/step and (\d+) evaluations? at ([\d.]+) s, done at', out)
    planned, evals = int(line.group(1)), int(line.group(2))
    assert planned % 50 == 0 and planned > 50 and evals == planned // 500 + 1  # at 500, 1000, ... and the last
    last = [int(s) for s, _, _ in STEP_LINE.findall(out)][-1]
    assert last == planned and 'slowed down' not in out and 'cannot be kept' not in out
    saved = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == saved['config']['max_iters'] == last and saved['config']['lr_decay_iters'] == planned


def test_max_iters_ends_a_budget_run_that_has_time_left(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch)
    gpt.main([*NO_STEPS, '--max_time=100', '--max_iters=60', '--eval_interval=30'])
    out = capsys.readouterr().out
    assert 'to step 60 (max_iters) or as many as fit in 100 s (max_time), whichever is fewer' in out
    assert 'time budget 100 s: 60 steps (max_iters) at 10 ms/step and 1 evaluation at' in out  # the last one
    assert [s for s, _, _ in STEP_LINE.findall(out)] == ['0', '30', '60']


def test_a_budget_that_even_the_shortest_run_overruns_is_said_at_the_start(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch, seconds_per_batch=0.5)  # each evaluation (eval_iters=2, 2 splits) takes 2 s
    gpt.main([*NO_STEPS, '--max_time=3', '--eval_interval=1'])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if 'cannot be kept' in line)
    assert line.startswith('time budget 3 s cannot be kept: even stopping now, at step 0')
    assert '--max_time=' in line and '--eval_interval' in line and '--max_new_tokens' in line
    assert [s for s, _, _ in STEP_LINE.findall(out)] == ['0'] and 'whole split' in out  # then it ends at once
    assert 'slowed down' not in out


def test_a_short_budget_plans_after_a_few_steps_and_ends_in_time(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    now = virtual_clock(monkeypatch, seconds_per_batch=0.05)  # an evaluation (4 batches) takes 0.2 s
    start = now[0]
    gpt.main([*NO_STEPS, '--max_time=4', '--eval_interval=1', '--max_new_tokens=0'])
    out = capsys.readouterr().out
    planned = int(re.search(r'time budget 4 s: (\d+) steps', out).group(1))
    last = [int(s) for s, _, _ in STEP_LINE.findall(out)][-1]
    assert 4 <= last == planned < 50  # planned before step 50: a short budget cannot wait for it
    assert now[0] - start <= 4 and 'slowed down' not in out


def test_a_replan_that_moves_the_end_never_raises_the_learning_rate(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch, slower=(120, 0.03))  # the machine slows to a third of its speed at step 120
    gpt.main([*NO_STEPS, '--max_time=10', '--eval_interval=100', '--warmup_iters=20'])
    out = capsys.readouterr().out
    assert re.search(r'time budget 10 s: now \d+ steps \(was \d+\)', out)  # the end moved, and it is said
    lrs = [float(r['lr']) for r in log_rows(workdir / 'out')]
    assert len(lrs) > 3 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # past the warmup: no rise
    saved = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)['config']
    assert saved['lr_moved'] is not None and lrs[-1] == pytest.approx(gpt.min_lr_frac * gpt.learning_rate, rel=1e-3)


def test_a_machine_that_speeds_up_gets_a_longer_run_without_a_jump_in_the_rate(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch, slower=(120, 0.004))  # from step 120 on, a step takes 4 ms instead of 10
    gpt.main([*NO_STEPS, '--max_time=10', '--eval_interval=100', '--warmup_iters=20'])
    out = capsys.readouterr().out
    first = int(re.search(r'time budget 10 s: (\d+) steps', out).group(1))
    moves = [int(n) for n in re.findall(r'time budget 10 s: now (\d+) steps \(was \d+\)', out)]
    assert moves and moves[-1] > first and int(STEP_LINE.findall(out)[-1][0]) == moves[-1]  # it took them
    lrs = [float(r['lr']) for r in log_rows(workdir / 'out')]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def lrs_of_a_run(monkeypatch, args, stop_at=None):
    """ every step's learning rate of gpt.main(args) on the slowing virtual clock; Ctrl-C after stop_at """
    lrs = {}
    set_lr = gpt.set_lr
    def record(optimizer, lr):
        step = len(lrs) + first[0]
        lrs[step] = lr
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        set_lr(optimizer, lr)
    first = [0]
    with monkeypatch.context() as m:
        m.setattr(gpt, 'set_lr', record)
        if '--init_from=resume' in args:
            first[0] = torch.load('out/ckpt.pt', weights_only=True)['step']
        virtual_clock(m, slower=(120, 0.03), step=first[0])
        gpt.main(args)
    return lrs


def test_a_run_resumed_after_a_replan_has_every_steps_learning_rate_of_the_unbroken_run(workdir, monkeypatch,
                                                                                       capsys):
    monkeypatch.chdir(workdir)
    args = [*NO_STEPS, '--max_time=10', '--eval_interval=100', '--warmup_iters=20', '--max_new_tokens=0']
    whole = lrs_of_a_run(monkeypatch, [*args, '--out_dir=whole'])
    assert re.search(r'time budget 10 s: now \d+ steps \(was \d+\)', capsys.readouterr().out)
    end = max(whole) + 1  # the last step
    moved_at, _ = torch.load('whole/ckpt.pt', weights_only=True)['config']['lr_moved']
    stop_at = (end - 1) // 100 * 100 + 10  # after the last plan: a resumed run keeps the plan it has
    assert moved_at < stop_at < end
    cut = lrs_of_a_run(monkeypatch, args, stop_at=stop_at)
    assert 'Ctrl-C' in capsys.readouterr().out
    assert torch.load('out/ckpt.pt', weights_only=True)['config']['lr_moved'][0] == moved_at
    rest = lrs_of_a_run(monkeypatch, ['--device=cpu', '--init_from=resume', '--max_new_tokens=0'])
    assert min(rest) == stop_at + 1 and {**cut, **rest} == whole  # every step's rate, bit for bit


def run_planned(cwd, *args, stop_at=None):
    """ a budget run whose plan is fixed at 300 steps (timings differ from run to run), cut by Ctrl-C if asked """
    code = f"""
import os, signal, gpt
gpt.plan_steps = lambda *args: 300
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
    now = virtual_clock(monkeypatch, slower=(100, 0.5))  # from step 100 on, a step takes 50 times as long
    start = now[0]
    gpt.main([*NO_STEPS, '--max_time=3', '--eval_interval=100000'])
    out = capsys.readouterr().out
    planned = int(re.search(r'time budget 3 s: (\d+) steps', out).group(1))
    assert 'has slowed down since the plan, so the run ends now' in out and 'whole split' in out
    last = int(STEP_LINE.findall(out)[-1][0])
    assert 100 <= last < planned and torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)['step'] == last
    assert now[0] - start <= 3 * 1.03


# the learning-rate schedule

def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr_frac=0.1, warmup_iters=10)
    lrs = [gpt.get_lr(s, cfg, 100) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_the_decay_follows_the_peak_and_never_rises_above_it():
    for peak in (3e-4, 6e-3, 1e-1):  # the lecture's 3e-4 edited in: it decays to a tenth of 3e-4, not of 6e-3
        cfg = SimpleNamespace(learning_rate=peak, min_lr_frac=0.1, warmup_iters=50)
        lrs = [gpt.get_lr(s, cfg, 1000) for s in range(1200)]
        assert max(lrs) <= peak and lrs[-1] == pytest.approx(peak / 10)


@pytest.mark.parametrize('moved_at, new_end', [(300, 600), (300, 2000), (51, 52), (999, 1000)])
def test_a_moved_end_continues_from_the_rate_reached(moved_at, new_end):
    cfg = SimpleNamespace(learning_rate=1e-2, min_lr_frac=0.1, warmup_iters=50)
    lr_there = gpt.get_lr(moved_at, cfg, 1000)
    before = [gpt.get_lr(s, cfg, 1000) for s in range(moved_at + 1)]
    after = [gpt.get_lr(s, cfg, new_end, (moved_at, lr_there)) for s in range(moved_at, new_end + 50)]
    assert after[0] == lr_there == before[-1]  # no jump where it moved
    assert all(a >= b for a, b in zip(after, after[1:]))  # it only falls
    assert after[new_end - moved_at] == pytest.approx(1e-3) and after[-1] == pytest.approx(1e-3)


def test_the_schedule_moved_twice_never_rises():
    cfg = SimpleNamespace(learning_rate=1e-2, min_lr_frac=0.1, warmup_iters=50)
    run = SimpleNamespace(step=0, lr_decay_iters=50000, lr_moved=None)
    lrs = []
    for step in range(3000):
        run.step = step
        if step in (50, 500, 1000, 1500):  # the plans: at 50, then the end moves out and back in
            gpt.move_schedule(run, cfg, {50: 2000, 500: 2500, 1000: 1800, 1500: 1800}[step])
        lrs.append(gpt.get_lr(step, cfg, run.lr_decay_iters, run.lr_moved))
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:])) and lrs[1800] == pytest.approx(1e-3)


def test_training_on_past_the_end_goes_on_at_min_lr(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=40'])
    lrs = {int(r['step']): float(r['lr']) for r in log_rows(workdir / 'out')}
    # no jump back up the schedule
    assert lrs[20] == lrs[30] == lrs[40] == pytest.approx(gpt.min_lr_frac * gpt.learning_rate)
    assert lrs[10] > lrs[20]
