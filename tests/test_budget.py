""" the time budget as one rule: progress is the larger of step / max_iters and the share of max_time spent, it
never goes back, the step at which it reaches 1 is the last; and the learning-rate schedule over progress """
import math
import os
import re
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import gpt
from conftest import TINY, log_rows
from test_cli import STEP_LINE

NO_STEPS = [a for a in TINY if not a.startswith('--max_iters')]  # so max_time ends the run


def virtual_clock(monkeypatch, seconds_per_batch=0.1, slower=None, step=0, eval_batch=0.001):
    """ gpt.py's clock, made to advance with each batch drawn: a training step 100 ms, an evaluation's batch 1 ms,
    a run that depends on the code, not on how busy the machine is. slower=(k, s): from step k on (a run resumed
    at step), each training batch takes s """
    now, steps = [1e9], [step]

    def get_batch(*args, **kwargs):
        training = kwargs.get('generator', args[4] if len(args) > 4 else None) is None  # evaluations have theirs
        steps[0] += training
        now[0] += (slower[1] if slower and steps[0] >= slower[0] else seconds_per_batch) if training else eval_batch
        return draw(*args, **kwargs)
    draw = gpt.get_batch
    monkeypatch.setattr(gpt, 'get_batch', get_batch)
    monkeypatch.setattr(gpt, 'time', SimpleNamespace(time=lambda: now[0], strftime=time.strftime,
                                                     localtime=time.localtime, sleep=time.sleep))
    return now


def last_step(out):
    return int(STEP_LINE.findall(out)[-1][0])


def test_a_budget_run_ends_when_its_time_is_spent_and_its_rate_at_the_end(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    now = virtual_clock(monkeypatch)
    start = now[0]
    gpt.main([*NO_STEPS, '--max_time=8', '--eval_interval=30', '--max_new_tokens=0'])
    out = capsys.readouterr().out
    saved = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == saved['max_iters'] == last_step(out) > 30  # ended by the time, not max_iters
    assert 7 < now[0] - start <= 8  # the whole run, its end included, fills the budget (1% and the exit kept)
    assert saved['progress'] == 1.0 and 'cannot be kept' not in out
    lrs = [float(r['lr']) for r in log_rows(workdir / 'out')]
    assert lrs[-1] == pytest.approx(gpt.min_lr_frac * gpt.learning_rate)  # the decay ended with the time
    assert re.search(r'  step 10/~\d+ \|', out)  # the progress line estimates the last step


def test_max_iters_ends_a_budget_run_that_has_time_left_on_the_schedule_of_steps(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch)
    gpt.main([*NO_STEPS, '--max_time=100', '--max_iters=60', '--eval_interval=30'])
    out = capsys.readouterr().out
    assert 'to step 60 (max_iters) or as many as fit in 100 s (max_time), whichever is fewer' in out
    assert [s for s, _, _ in STEP_LINE.findall(out)] == ['0', '30', '60']
    budget = [float(r['lr']) for r in log_rows(workdir / 'out')]
    gpt.main([*NO_STEPS, '--max_time=0', '--max_iters=60', '--eval_interval=30', '--out_dir=no-budget'])
    assert budget == [float(r['lr']) for r in log_rows(workdir / 'no-budget')]


def test_a_budget_too_short_for_one_step_is_said_at_the_start_and_ends_at_once(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch, eval_batch=0.5)  # each evaluation (eval_iters=2, 2 splits) takes 2 s
    gpt.main([*NO_STEPS, '--max_time=3', '--eval_interval=1'])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if 'cannot be kept' in line)
    assert line.startswith('time budget 3 s cannot be kept:') and 'not one step fits; it ends now' in line
    assert '--max_time=' in line and '--eval_iters' in line and '--max_new_tokens' in line
    assert [s for s, _, _ in STEP_LINE.findall(out)] == ['0'] and 'whole split' in out


@pytest.mark.parametrize('slower', [(30, 1.0), (30, 0.3), (30, 0.04)], ids=['10x-slower', '3x-slower', 'faster'])
def test_a_machine_whose_speed_changes_ends_in_time_and_the_rate_never_rises(workdir, monkeypatch, capsys, slower):
    monkeypatch.chdir(workdir)
    now = virtual_clock(monkeypatch, slower=slower)
    start = now[0]
    gpt.main([*NO_STEPS, '--max_time=10', '--eval_interval=10', '--warmup_iters=5', '--max_new_tokens=0'])
    out = capsys.readouterr().out
    assert now[0] - start <= 10 and last_step(out) > 30
    lrs = [float(r['lr']) for r in log_rows(workdir / 'out')]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # past the warmup: no rise
    assert lrs[-1] == pytest.approx(gpt.min_lr_frac * gpt.learning_rate)


def lrs_of_a_run(monkeypatch, args, stop_at=None):
    """ every step's learning rate of gpt.main(args) on the slowing virtual clock; Ctrl-C after stop_at """
    lrs, first = {}, [0]
    set_lr = gpt.set_lr

    def record(optimizer, lr):
        step = len(lrs) + first[0]
        lrs[step] = lr
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        set_lr(optimizer, lr)
    with monkeypatch.context() as m:
        m.setattr(gpt, 'set_lr', record)
        if '--init_from=resume' in args:
            first[0] = torch.load('out/ckpt.pt', weights_only=True)['step']
        virtual_clock(m, slower=(30, 0.3), step=first[0])
        gpt.main(args)
    return lrs


def test_a_budget_run_cut_and_resumed_keeps_its_clock_and_schedule(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    args = [*NO_STEPS, '--max_time=12', '--eval_interval=10', '--warmup_iters=5', '--max_new_tokens=0']
    whole = lrs_of_a_run(monkeypatch, [*args, '--out_dir=whole'])
    cut = lrs_of_a_run(monkeypatch, args, stop_at=35)
    assert 'Ctrl-C' in capsys.readouterr().out and torch.load('out/ckpt.pt', weights_only=True)['step'] == 36
    rest = lrs_of_a_run(monkeypatch, ['--device=cpu', '--init_from=resume', '--max_new_tokens=0'])
    assert min(rest) == 36 and sorted({**cut, **rest}) == sorted(whole)  # it ends at the same step
    assert [rest.get(s, cut.get(s)) for s in sorted(whole)] == pytest.approx([whole[s] for s in sorted(whole)],
                                                                           rel=1e-9)


def test_a_finished_budget_run_samples_and_trains_on_with_more_time(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    virtual_clock(monkeypatch)
    gpt.main([*NO_STEPS, '--max_time=3', '--eval_interval=10', '--max_new_tokens=0'])
    end = torch.load('out/ckpt.pt', weights_only=True)['step']
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume'])
    assert f'has finished its {end} steps: sampling only' in capsys.readouterr().out
    gpt.main(['--device=cpu', '--init_from=resume', '--max_time=5'])
    on = torch.load('out/ckpt.pt', weights_only=True)
    assert on['step'] > end and on['elapsed'] <= 5
    lrs = [float(r['lr']) for r in log_rows(workdir / 'out') if int(r['step']) >= end]
    assert lrs == pytest.approx([gpt.min_lr_frac * gpt.learning_rate] * len(lrs))  # at the end's rate


# the learning-rate schedule

def test_learning_rate_warms_up_then_decays_to_its_end_over_progress():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr_frac=0.1, warmup_iters=10)
    lrs = [gpt.get_lr(s, cfg, s / 100, 10 / 100) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_a_run_that_max_iters_ends_has_the_cosine_over_its_steps():
    cfg = SimpleNamespace(learning_rate=1e-2, min_lr_frac=0.06, warmup_iters=50)
    for step in range(50, 3001, 37):  # the cosine from the end of the warmup (step 50) to max_iters (3000)
        steps = 0.06e-2 + 0.5 * (1 + math.cos(math.pi * (step - 50) / (3000 - 50))) * (1e-2 - 0.06e-2)
        assert gpt.get_lr(step, cfg, step / 3000, 50 / 3000) == pytest.approx(steps, rel=1e-12)


def test_the_decay_follows_the_peak_and_never_rises_above_it():
    for peak in (3e-4, 6e-3, 1e-1):  # the lecture's 3e-4 edited in: it decays to a tenth of 3e-4, not of 6e-3
        cfg = SimpleNamespace(learning_rate=peak, min_lr_frac=0.1, warmup_iters=50)
        lrs = [gpt.get_lr(s, cfg, min(1.0, s / 1000), 0.05) for s in range(1200)]
        assert max(lrs) <= peak and lrs[-1] == pytest.approx(peak / 10)


def test_training_on_past_the_end_goes_on_at_min_lr(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=40'])
    lrs = {int(r['step']): float(r['lr']) for r in log_rows(workdir / 'out')}
    # no jump back up the schedule
    assert lrs[20] == lrs[30] == lrs[40] == pytest.approx(gpt.min_lr_frac * gpt.learning_rate)
    assert lrs[10] > lrs[20]
