"""
SIGTERM in the shape schedulers send it: to a whole process group, and more than once. Slurm at its time
limit, `timeout` and `kill -- -PGID` signal every process of the job, and torchrun passes each SIGTERM it
receives on to its processes, so a process of gpt.py gets two or three within milliseconds. However many
come, and whenever, the run finishes its step, saves once and exits 143; only a second Ctrl-C quits at once.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY

GPT = os.path.join(ROOT, 'gpt.py')
# a step of a few hundred ms on one thread, so that a second signal 50 ms after the first mostly lands in the
# middle of the step; no assertion depends on where it lands
SLOW = [*TINY, '--n_layer=2', '--n_head=4', '--n_embd=192', '--block_size=128', '--batch_size=8', '--dropout=0.0',
        '--max_iters=100000', '--eval_interval=100000', '--log_interval=1', '--plot=False']
GAP = 0.05  # between two signals, as a scheduler's and torchrun's arrive

# gpt.py run as the script it is (its __main__ block), watched through sys.setprofile: the process tells on stderr
# the step it stopped after and how it exited (under torchrun only the first process prints, and torchrun does
# not report how its processes ended when a signal stops it), and it can send itself signals at given moments:
# PLAN is a list of (event, function of gpt.py, condition on its arguments, signals), each done once, in order
WATCHED = """
import os, runpy, signal, sys, time
GPT, PLAN, rank = {gpt!r}, {plan!r}, os.environ.get('RANK', '0')
def watch(frame, event, arg):
    if frame.f_code.co_filename != GPT:
        return
    if event == 'return' and frame.f_code.co_name == 'train':
        print(f"rank {{rank}}: stopped after step {{frame.f_locals['run'].step}}", file=sys.stderr, flush=True)
    if PLAN and (event, frame.f_code.co_name) == PLAN[0][:2] and eval(PLAN[0][2], {{}}, frame.f_locals):
        for name in PLAN.pop(0)[3]:
            os.kill(os.getpid(), getattr(signal, name))
            time.sleep({gap})  # its handler runs in here
sys.setprofile(watch)
try:
    runpy.run_path(GPT, run_name='__main__')
except SystemExit as e:
    print(f"rank {{rank}}: exit {{e.code}}", file=sys.stderr, flush=True)
    raise
"""


def watched(cwd, plan=()):
    (cwd / 'watched.py').write_text(WATCHED.format(gpt=GPT, plan=list(plan), gap=GAP))
    return 'watched.py'


def start(cwd, cmd):
    """ cmd in a session of its own, as a job under a scheduler, its stderr into a file; the process """
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=open(cwd / 'stderr.txt', 'w'), text=True,
                            start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def finish(proc, cwd):
    """ the rest of proc's stdout, and its stderr, once it has ended """
    out = proc.stdout.read()
    proc.wait(timeout=120)
    return out, (cwd / 'stderr.txt').read_text()


def sigterm_twice_while_training(proc, send):
    """ at step 2's progress line, SIGTERM by send(), then again GAP later; stdout and the exit status """
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith('  step 2/'):
            for _ in range(2):
                with contextlib.suppress(ProcessLookupError):
                    send(signal.SIGTERM)
                time.sleep(GAP)
            break
    out = ''.join(head) + proc.stdout.read()
    return out, proc.wait(timeout=120)


def saved_step(out, out_dir):
    """ the step of the one 'saved' line in out """
    saves = re.findall(rf'^saved {out_dir}/ckpt\.pt at step (\d+) ', out, flags=re.M)
    assert len(saves) == 1, out
    return int(saves[0])


def ckpt_step(path):
    return torch.load(path, weights_only=True)['step']


def test_sigterm_twice_to_a_process_saves_once_and_exits_143(workdir):
    proc = start(workdir, [sys.executable, GPT, *SLOW])
    out, rc = sigterm_twice_while_training(proc, lambda sig: os.kill(proc.pid, sig))
    err = (workdir / 'stderr.txt').read_text()
    assert rc == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert 'Traceback' not in err, err
    step = saved_step(out, 'out')
    assert out.rstrip().splitlines()[-1].startswith('saved out')  # and no sample after it
    assert out.count('SIGTERM: stopping after this step and saving\n') == 1 and 'quit at once' not in out
    assert ckpt_step(workdir / 'out' / 'ckpt.pt') == step >= 2


def test_sigterm_twice_to_torchruns_process_group_saves_once_and_stops_both_at_one_step(workdir):
    proc = start(workdir, [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           watched(workdir), *SLOW, '--out_dir=ddp'])
    # kill -TERM -- -PGID, twice: torchrun has each one and passes each on to both processes (it starts them in
    # sessions of their own, so they have it from torchrun alone)
    out, rc = sigterm_twice_while_training(proc, lambda sig: os.killpg(proc.pid, sig))
    err = (workdir / 'stderr.txt').read_text()
    stopped = dict(re.findall(r'^rank (\d): stopped after step (\d+)$', err, flags=re.M))
    assert stopped.keys() == {'0', '1'} and stopped['0'] == stopped['1'], out[-2000:] + err[-3000:]
    assert dict(re.findall(r'^rank (\d): exit (.*)$', err, flags=re.M)) == {'0': '143', '1': '143'}, err
    # torchrun itself ends with status 1 and a traceback of its own: the signal, raised in it as SignalException
    # (or, where the second signal comes late, as torchrun is already exiting after its processes, by that signal)
    raised = set(re.findall(r'^(\w[\w.]*(?:Error|Exception|Interrupt))\b', err, flags=re.M))
    assert rc in (1, -signal.SIGTERM), err
    assert raised == {'torch.distributed.elastic.multiprocessing.api.SignalException'}, err
    assert 'Connection closed' not in err and 'watched.py", line' not in err and 'gpt.py", line' not in err, err
    step = saved_step(out, 'ddp')
    assert int(stopped['0']) == step >= 2
    assert out.count('SIGTERM: stopping after this step and saving\n') == 1 and 'quit at once' not in out
    assert ckpt_step(workdir / 'ddp' / 'ckpt.pt') == step


AT_STEP_3 = ('call', 'get_lr', 'step == 3')  # as step 3 begins


@pytest.mark.parametrize('plan', [
    [(*AT_STEP_3, ['SIGTERM', 'SIGTERM'])],  # both in the step
    [(*AT_STEP_3, ['SIGTERM']), ('call', 'save_checkpoint', 'True', ['SIGTERM'])],  # the second as it saves
    [(*AT_STEP_3, ['SIGTERM']), ('return', 'stop_on_signals', 'True', ['SIGTERM'])],  # after, on its way out
], ids=['in-the-step', 'in-the-save', 'on-the-way-out'])
def test_a_second_sigterm_at_any_moment_of_the_stop_is_the_same_stop(workdir, plan):
    proc = start(workdir, [sys.executable, watched(workdir, plan), *TINY, '--max_iters=100000'])
    out, err = finish(proc, workdir)
    assert proc.returncode == 128 + signal.SIGTERM and 'rank 0: exit 143' in err, out[-2000:] + err[-3000:]
    assert 'Traceback' not in err, err
    assert out.count('SIGTERM: stopping after this step and saving\n') == 1
    assert saved_step(out, 'out') == ckpt_step(workdir / 'out' / 'ckpt.pt') == 4
    assert out.rstrip().splitlines()[-1].startswith('saved out')  # and no sample after it


def test_sigterm_twice_in_the_final_loss_skips_it_with_the_model_saved_and_exits_143(workdir):
    plan = [('call', 'final_windows', 'True', ['SIGTERM', 'SIGTERM'])]  # as the final loss begins
    proc = start(workdir, [sys.executable, watched(workdir, plan), *TINY])
    out, err = finish(proc, workdir)
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in err, out[-2000:] + err[-3000:]
    assert 'step 20: the val loss over the whole split is skipped: stopped' in out
    assert out.count('SIGTERM: stopping after this step and saving\n') == 1
    assert saved_step(out, 'out') == ckpt_step(workdir / 'out' / 'ckpt.pt') == 20
    assert out.rstrip().splitlines()[-1].startswith('saved out')


def test_a_second_ctrl_c_quits_at_once(workdir):
    proc = start(workdir, [sys.executable, watched(workdir, [(*AT_STEP_3, ['SIGINT', 'SIGINT'])]), *TINY,
                           '--max_iters=100000'])
    out, err = finish(proc, workdir)
    assert proc.returncode == 130 and 'Traceback' not in err, out[-2000:] + err[-3000:]
    assert out.count('Ctrl-C: stopping after this step and saving (Ctrl-C again to quit at once)\n') == 1
    assert 'saved' not in out and 'stopped after step' not in err  # quit in step 3, before it ended
    assert not (workdir / 'out' / 'ckpt.pt').exists()  # the run saves at evaluations, and step 0's is not saved
