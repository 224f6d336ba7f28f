"""
Stress loop for SIGTERM under torchrun: the scenario of
test_distributed.py::test_sigterm_to_torchrun_saves_once_and_stops_every_process, N times.

    python tests/stress_sigterm.py --runs=30 [--busy=1] [--tee] [--keep=DIR]

Each run: a 2-process torchrun of gpt.py on a tiny model, SIGTERM to torchrun when the first process
prints step 20, then check that 'saved ddp' is printed and the checkpoint's step is >= 20. The full
stdout and stderr of failed runs (every rank's, prefixed [default0]/[default1] with --tee) go to --keep.
--busy=K runs K busy-looping processes alongside, to load the machine.
"""
import argparse
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4',
        '--eval_interval=10', '--eval_iters=2', '--log_interval=10', '--warmup_iters=2', '--max_new_tokens=30']


def busy():
    while True:
        pass


def one_run(workdir, tee, stop_step):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    if tee:
        cmd += ['--tee=3', f'--log-dir={workdir}/logs']
    cmd += [os.path.join(ROOT, 'gpt.py'), *TINY, '--dropout=0.0', '--max_iters=100000', '--out_dir=ddp']
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    head = []
    for line in proc.stdout:
        head.append(line)
        if f'  step {stop_step}/' in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = ''.join(head) + proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    ckpt = os.path.join(workdir, 'ddp', 'ckpt.pt')
    step = torch.load(ckpt, weights_only=True)['step'] if os.path.exists(ckpt) else None
    ok = 'SIGTERM' in out and 'saved ddp' in out and step is not None and stop_step <= step < 100000
    return ok, proc.returncode, step, out, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=30)
    ap.add_argument('--busy', type=int, default=0)
    ap.add_argument('--tee', action='store_true')
    ap.add_argument('--stop_step', type=int, default=20)
    ap.add_argument('--keep', default='/tmp/stress_failures')
    args = ap.parse_args()
    os.makedirs(args.keep, exist_ok=True)
    busies = [mp.Process(target=busy, daemon=True) for _ in range(args.busy)]
    for b in busies:
        b.start()
    text = open(os.path.join(ROOT, 'input.txt'), encoding='utf-8').read(20000)
    fails = 0
    try:
        for i in range(args.runs):
            workdir = tempfile.mkdtemp(prefix='stress')
            with open(os.path.join(workdir, 'input.txt'), 'w', encoding='utf-8') as f:
                f.write(text)
            t0 = time.time()
            ok, rc, step, out, err = one_run(workdir, args.tee, args.stop_step)
            print(f"run {i + 1}: {'ok  ' if ok else 'FAIL'} rc={rc} ckpt step={step} ({time.time() - t0:.1f}s)", flush=True)
            if not ok:
                fails += 1
                dest = os.path.join(args.keep, f'fail{int(time.time())}_{i}')
                os.makedirs(dest)
                open(os.path.join(dest, 'stdout.txt'), 'w').write(out)
                open(os.path.join(dest, 'stderr.txt'), 'w').write(err)
                if os.path.isdir(os.path.join(workdir, 'logs')):
                    shutil.copytree(os.path.join(workdir, 'logs'), os.path.join(dest, 'logs'))
                print(f"  kept in {dest}", flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        for b in busies:
            b.terminate()
    print(f"{args.runs - fails} of {args.runs} passed, {fails} failed (busy={args.busy}, tee={args.tee})")
    return 1 if fails else 0


if __name__ == '__main__':
    sys.exit(main())
