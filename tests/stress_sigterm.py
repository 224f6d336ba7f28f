"""
Stress loop for SIGTERM, N times, in one of three shapes:

    python tests/stress_sigterm.py --variant=torchrun --runs=30 [--busy=1] [--tee] [--keep=DIR]

--variant=torchrun (the default): the scenario of
    test_distributed.py::test_sigterm_to_torchrun_saves_once_and_stops_every_process: a 2-process torchrun of
    gpt.py on a tiny model, one SIGTERM to torchrun when the first process prints step 20; checks that 'saved ddp'
    is printed and the checkpoint's step is >= 20.
--variant=group-twice: test_signal_shapes.py's scheduler at its time limit: a 2-process torchrun in a session of
    its own with a step of a few hundred ms, SIGTERM to its process group twice, 50 ms apart, at step 2 (torchrun
    passes each on to both processes); checks that the checkpoint is saved once, that both processes stopped
    after the same step, the saved one, and exited 143, and that no process printed a traceback.
--variant=single-twice: plain python gpt.py with the same slow step, SIGTERM twice 50 ms apart at step 2;
    checks exit status 143, one save, the checkpoint at the saved step and no traceback.

The full stdout and stderr of failed runs (every rank's, prefixed [default0]/[default1] with --tee) go to
--keep. --busy=K runs K busy-looping processes alongside, to load the machine.
"""
import argparse
import multiprocessing as mp
import os
import re
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


# a step of a few hundred ms on one thread: the second SIGTERM, 50 ms after the first, mostly lands mid-step
SLOW = [*TINY, '--n_layer=2', '--n_head=4', '--n_embd=192', '--block_size=128', '--batch_size=8', '--dropout=0.0',
        '--max_iters=100000', '--eval_interval=100000', '--log_interval=1', '--plot=False']
# gpt.py run as the script it is, telling on stderr the step each process stopped after and how it exited
WATCHED = """
import os, runpy, sys
GPT, rank = {gpt!r}, os.environ.get('RANK', '0')
def watch(frame, event, arg):
    if event == 'return' and frame.f_code.co_name == 'train' and frame.f_code.co_filename == GPT:
        print(f"rank {{rank}}: stopped after step {{frame.f_locals['run'].step}}", file=sys.stderr, flush=True)
sys.setprofile(watch)
try:
    runpy.run_path(GPT, run_name='__main__')
except SystemExit as e:
    print(f"rank {{rank}}: exit {{e.code}}", file=sys.stderr, flush=True)
    raise
"""


def one_run(workdir, tee, stop_step=None, variant='torchrun'):
    stop_step = stop_step or (20 if variant == 'torchrun' else 2)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    if tee:
        cmd += ['--tee=3', f'--log-dir={workdir}/logs']
    if variant == 'torchrun':
        cmd += [os.path.join(ROOT, 'gpt.py'), *TINY, '--dropout=0.0', '--max_iters=100000', '--out_dir=ddp']
    elif variant == 'group-twice':
        with open(os.path.join(workdir, 'watched.py'), 'w') as f:
            f.write(WATCHED.format(gpt=os.path.join(ROOT, 'gpt.py')))
        cmd += ['watched.py', *SLOW, '--out_dir=ddp']
    else:
        cmd = [sys.executable, os.path.join(ROOT, 'gpt.py'), *SLOW, '--out_dir=ddp']
    err_file = open(os.path.join(workdir, 'stderr.txt'), 'w')  # a file: no pipe to fill while stdout is read
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env,
                            start_new_session=variant != 'torchrun')  # a job of its own, as under a scheduler
    send = {'torchrun': lambda: proc.send_signal(signal.SIGTERM),
            'group-twice': lambda: os.killpg(proc.pid, signal.SIGTERM),  # kill -TERM -- -PGID
            'single-twice': lambda: proc.send_signal(signal.SIGTERM)}[variant]
    head = []
    for line in proc.stdout:
        head.append(line)
        if f'  step {stop_step}/' in line:
            for _ in range(1 if variant == 'torchrun' else 2):
                try:
                    send()
                except ProcessLookupError:
                    pass
                time.sleep(0.05)
            break
    out = ''.join(head) + proc.stdout.read()
    proc.wait(timeout=120)
    err_file.close()
    err = open(os.path.join(workdir, 'stderr.txt')).read()
    ckpt = os.path.join(workdir, 'ddp', 'ckpt.pt')
    step = torch.load(ckpt, weights_only=True)['step'] if os.path.exists(ckpt) else None
    ok = 'SIGTERM' in out and 'saved ddp' in out and step is not None and stop_step <= step < 100000
    if variant != 'torchrun':  # saved once, at the checkpoint's step; one message; no traceback of a process
        ok = ok and re.findall(r'^(?:\[default\d\]:)?saved ddp/ckpt\.pt at step (\d+) ', out, flags=re.M) == [str(step)]
        ok = ok and out.count('SIGTERM: stopping after this step and saving') == 1
        ok = ok and 'gpt.py", line' not in err and 'watched.py", line' not in err and 'Connection closed' not in err
    if variant == 'single-twice':
        ok = ok and proc.returncode == 143 and 'Traceback' not in err
    if variant == 'group-twice':  # torchrun, stopped by the signal, ends with status 1 and a traceback of its own
        stopped = dict(re.findall(r'^(?:\[default\d\]:)?rank (\d): stopped after step (\d+)$', err, flags=re.M))
        exits = dict(re.findall(r'^(?:\[default\d\]:)?rank (\d): exit (.*)$', err, flags=re.M))
        ok = ok and stopped == {'0': str(step), '1': str(step)} and exits == {'0': '143', '1': '143'}
        ok = ok and proc.returncode in (1, -signal.SIGTERM)  # -15: the second came as torchrun itself exited
    return ok, proc.returncode, step, out, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--variant', choices=['torchrun', 'group-twice', 'single-twice'], default='torchrun')
    ap.add_argument('--runs', type=int, default=30)
    ap.add_argument('--busy', type=int, default=0)
    ap.add_argument('--tee', action='store_true')
    ap.add_argument('--stop_step', type=int, default=None, help='default: 20 for torchrun, else 2')
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
            ok, rc, step, out, err = one_run(workdir, args.tee, args.stop_step, args.variant)
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
    print(f"{args.runs - fails} of {args.runs} passed, {fails} failed (variant={args.variant}, busy={args.busy}, "
          f"tee={args.tee})")
    return 1 if fails else 0


if __name__ == '__main__':
    sys.exit(main())
