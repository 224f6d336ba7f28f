""" a stop at any moment: Ctrl-C, SIGTERM, a reader that goes away; a run from a notebook or a thread leaves the
signal handlers alone; and one run at a time in an out_dir """
import os
import signal
import subprocess
import sys
import threading

import pytest

import gpt
from conftest import ROOT, TINY, error_of, load, log_rows, run_script


def run_python(cwd, code):
    """ python -c code with gpt importable, as a script of the user's would run it """
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT})


def start_long_run(cwd, *args, until='  step 20/'):
    """ a training run in a process of its own, left running once it prints a line starting with until """
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--max_iters=100000', *args],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    for line in proc.stdout:
        if line.startswith(until):
            return proc
    raise AssertionError(proc.stderr.read())


def ctrl_c_in(cwd, name):
    """ a tiny run of gpt.py in a process of its own, with Ctrl-C on the first call of gpt.<name> """
    return run_python(cwd, f"""
import os, signal, gpt
function, calls = gpt.{name}, []
def ctrl_c_first(*args):
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return function(*args)
gpt.{name} = ctrl_c_first
gpt.main({TINY!r})
""")


# SIGTERM and a reader that goes away

def test_sigterm_saves_and_exits_without_sampling(workdir):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--max_iters=100000'], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    for line in proc.stdout:
        if line.startswith('  step 20/'):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read()
    assert 'SIGTERM' in out and out.rstrip().splitlines()[-1].startswith('saved out')  # and no sample after it
    assert 20 <= load(workdir / 'out' / 'ckpt.pt')['step'] < 100000


def test_a_reader_that_goes_away_stops_the_run_saved_and_quiet(workdir):
    proc = start_long_run(workdir)
    proc.stdout.close()  # as `python gpt.py | head` does after its lines
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert 'Traceback' not in proc.stderr.read()
    assert 20 <= load(workdir / 'out' / 'ckpt.pt')['step'] < 100000


# Ctrl-C at any moment

def test_a_run_stopped_in_its_last_step_still_evaluates_and_logs(workdir):
    p = run_python(workdir, f"""
import os, signal, gpt
get_lr = gpt.get_lr
def ctrl_c_in_the_last_step(step, cfg, *end):
    if step == cfg.max_iters - 1:
        os.kill(os.getpid(), signal.SIGINT)
    return get_lr(step, cfg, *end)
gpt.get_lr = ctrl_c_in_the_last_step
gpt.main({TINY!r})
""")
    assert p.returncode == 0 and 'Ctrl-C' in p.stdout, p.stderr
    rows = log_rows(workdir / 'out')
    assert [r['step'] for r in rows] == ['0', '10', '20'] and rows[-1]['whole_val_loss']
    assert load(workdir / 'out' / 'ckpt.pt')['step'] == 20
    assert load(workdir / 'out' / 'best.pt')['best_val_loss'] == pytest.approx(min(float(r['val_loss']) for r in rows[1:]), abs=1e-4)


def test_ctrl_c_in_the_first_evaluation_saves_step_0_and_keeps_the_previous_model(workdir):
    assert run_script(workdir, *TINY).returncode == 0
    before = (workdir / 'out' / 'ckpt.pt').read_bytes()
    p = ctrl_c_in(workdir, 'estimate_loss')  # in the first evaluation
    assert p.returncode == 0 and 'Ctrl-C' in p.stdout and 'saved out/ckpt.pt at step 0' in p.stdout, p.stderr
    assert load(workdir / 'out' / 'ckpt.pt')['step'] == 0
    kept = list((workdir / 'out' / 'previous').iterdir())
    assert len(kept) == 1 and (kept[0] / 'ckpt.pt').read_bytes() == before
    assert run_script(workdir, '--device=cpu', '--init_from=resume', '--max_iters=10').returncode == 0


def test_a_stop_during_the_final_loss_skips_it_with_the_model_already_saved(workdir):
    p = ctrl_c_in(workdir, 'final_windows')  # as the final loss begins
    assert p.returncode == 0 and 'step 20: the val loss over the whole split is skipped: stopped' in p.stdout, p.stderr
    assert load(workdir / 'out' / 'ckpt.pt')['step'] == 20
    assert log_rows(workdir / 'out')[-1]['step'] == '20' and log_rows(workdir / 'out')[-1]['whole_val_loss'] == ''


# notebooks and threads: signal handlers left alone

def test_from_a_notebook_argv_and_ctrl_c_are_left_alone(workdir):
    p = run_python(workdir, f"""
import signal, sys, gpt
sys.argv = ['ipykernel_launcher.py', '-f', 'kernel.json']  # what Jupyter passes
before = signal.getsignal(signal.SIGINT)
try:
    gpt.main([*{TINY!r}, '--learning_rate=1e30', '--warmup_iters=0'])  # fails while training
except SystemExit as e:
    print('failed:', e)
assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
tiny = dict(a.removeprefix('--').split('=') for a in {TINY!r})
gpt.main(defaults={{k: type(getattr(gpt, k))(v) for k, v in tiny.items()}})
print('ok')
""")
    assert p.returncode == 0 and 'failed: error: the loss became' in p.stdout and p.stdout.endswith('ok\n'), p.stderr


def test_gpt_main_runs_in_a_thread(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    result = []
    thread = threading.Thread(target=lambda: result.append(gpt.main(TINY)))
    thread.start()
    thread.join(timeout=60)
    assert result and result[0].config.n_embd == 16


# two runs, one out_dir

def test_a_second_run_in_a_busy_out_dir_is_refused_and_a_killed_run_leaves_no_lock(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    first = start_long_run(workdir)
    try:
        line = error_of(TINY)
        assert 'out is in use by another training run' in line and f'pid {first.pid}' in line
        gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=0', '--max_new_tokens=5'])  # reading is fine
        gpt.main([*TINY, '--out_dir=elsewhere'])  # and so is another out_dir
    finally:
        first.kill()  # SIGKILL: no handler, no cleanup
        first.wait(timeout=60)
    assert gpt.main([*TINY, '--max_iters=10']).config.n_embd == 16  # the lock went with the process
