""" data-parallel training with torchrun, and gradient accumulation """
import os
import signal
import subprocess
import sys

import pytest
import torch

import gpt
from conftest import ROOT, TINY
from test_cli import STEP_LINE

ARGS = [*TINY, '--dropout=0.0', '--max_iters=4', '--eval_interval=2', '--max_new_tokens=5']


def test_two_processes_equal_one_process_accumulating_over_the_same_batches(workdir, capsys, monkeypatch):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'tests', 'ddp_worker.py'), *ARGS, '--out_dir=ddp'],
                       cwd=workdir, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count('step 4: train loss') == 1  # only the first process prints
    assert '2 processes' in p.stdout
    ranks = [torch.load(workdir / f'weights_rank{r}.pt', weights_only=True) for r in (0, 1)]
    monkeypatch.chdir(workdir)
    single = gpt.main([*ARGS, '--gradient_accumulation_steps=2', '--out_dir=single']).state_dict()
    saved = torch.load(workdir / 'ddp' / 'ckpt.pt', weights_only=True)['model']
    for name, w in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], w, atol=1e-5), name
        assert torch.equal(saved[name], ranks[0][name]), name
    ddp_losses = STEP_LINE.findall(p.stdout)
    single_losses = STEP_LINE.findall(capsys.readouterr().out)
    assert len(ddp_losses) == len(single_losses) == 3
    for a, b in zip(ddp_losses, single_losses):  # evaluation across processes reports what one process does
        assert a[0] == b[0]
        assert abs(float(a[1]) - float(b[1])) < 2e-4 and abs(float(a[2]) - float(b[2])) < 2e-4


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(workdir, monkeypatch, optimizer):
    monkeypatch.chdir(workdir)
    args = [*ARGS, f'--optim={optimizer}']
    one = gpt.main([*args, '--batch_size=8', '--out_dir=one']).state_dict()
    accumulated = gpt.main([*args, '--batch_size=2', '--gradient_accumulation_steps=4', '--out_dir=acc']).state_dict()
    for name, w in one.items():
        assert torch.allclose(w, accumulated[name], atol=1e-5), name
    assert not torch.allclose(one['lm_head.weight'], gpt.main([*ARGS, '--out_dir=other']).state_dict()['lm_head.weight'])


def test_sigterm_to_torchrun_saves_once_and_stops_every_process(workdir):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(ROOT, 'gpt.py'), *TINY, '--dropout=0.0', '--max_iters=100000',
                             '--out_dir=ddp'], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:
        if line.startswith('  step 20/'):
            proc.send_signal(signal.SIGTERM)  # as a scheduler does; torchrun passes it on to both processes
            break
    out = proc.stdout.read()
    proc.wait(timeout=60)
    assert 'SIGTERM' in out and 'saved ddp' in out, out + proc.stderr.read()[-2000:]
    assert 20 <= torch.load(workdir / 'ddp' / 'ckpt.pt', weights_only=True)['step'] < 100000


def torchrun(cwd, *args, script='gpt.py'):
    """ a 2-process torchrun of gpt.py (or a worker script of the tests) as a user types it; the finished process """
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


def test_sigterm_reaching_one_process_alone_stops_both_at_the_same_step(workdir):
    # the second process has SIGTERM right after its evaluation at step 20, where the first goes on to step 21:
    # both must stop after the same step (21, once both know), or the first waits in an all_reduce for a process
    # that has gone, crashes and saves nothing
    p = torchrun(workdir, *TINY, '--dropout=0.0', '--max_iters=100000', '--out_dir=ddp', script='tests/signal_worker.py')
    assert 'saved ddp/ckpt.pt at step 21' in p.stdout, p.stdout[-1000:] + p.stderr[-3000:]
    assert 'Connection closed' not in p.stderr
    assert torch.load(workdir / 'ddp' / 'ckpt.pt', weights_only=True)['step'] == 21


@pytest.mark.parametrize('args, error', [
    (['--n_layr=3'], "error: unknown setting 'n_layr'; did you mean n_layer"),
    (['--input_file=nope.txt'], "error: cannot read the input file 'nope.txt'"),  # the second process waits for the first
    (['--init_from=resume'], "error: no checkpoint at out/ckpt.pt"),
])
def test_an_error_under_torchrun_is_one_line_at_the_end(workdir, args, error):
    p = torchrun(workdir, *TINY, *args)
    assert p.returncode == 1
    out = p.stdout + p.stderr
    assert out.count(error) == 1, out  # the first process's alone
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    # torchrun's report of a failed process ends with its root cause: the error line, then a border of ====
    assert lines[-2].startswith('  traceback : error: ') and error in lines[-2] and set(lines[-1]) == {'='}, out
    # one traceback, torchrun's own (its way to print the report, which a process cannot change); none of a process
    assert out.count('Traceback') == 1 and 'raise ChildFailedError(' in out and '[rank' not in out
    assert 'Warning' not in out and 'gpt.py", line' not in out


def test_torchrun_prints_once_without_warnings(workdir):
    p = torchrun(workdir, *TINY, '--dropout=0.0', '--max_iters=2', '--eval_interval=2', '--out_dir=ddp')
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(workdir, *TINY, '--max_iters=4', '--eval_interval=2', '--out_dir=ddp', '--init_from=resume')
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('resuming ddp/ckpt.pt at step 2') == 1 and p.stdout.count('step 4: train loss') == 1
    assert 'Warning' not in p.stderr, p.stderr
