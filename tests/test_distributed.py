""" data-parallel training with torchrun, and gradient accumulation """
import os
import signal
import subprocess
import sys

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


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    one = gpt.main([*ARGS, '--batch_size=8', '--out_dir=one']).state_dict()
    accumulated = gpt.main([*ARGS, '--batch_size=2', '--gradient_accumulation_steps=4', '--out_dir=acc']).state_dict()
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
