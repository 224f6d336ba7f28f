import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpt  # noqa: E402  (importable once ROOT is on the path)

# tiny models run best on one thread, and the tests run side by side (pytest -n 2): the runs in this process
# and, by OMP_NUM_THREADS, those started as scripts
torch.set_num_threads(1)

# a model small enough that a whole run takes a second or two on a CPU; loss.png is drawn where a test asks
TINY = ['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4',
        '--max_iters=20', '--eval_interval=10', '--eval_iters=2', '--log_interval=10', '--warmup_iters=2',
        '--max_new_tokens=30', '--plot=False']


@pytest.fixture
def workdir(tmp_path):
    """ a folder holding the first 20,000 characters of tiny Shakespeare as input.txt """
    with open(os.path.join(ROOT, 'input.txt'), encoding='utf-8') as f:
        (tmp_path / 'input.txt').write_text(f.read(20000), encoding='utf-8')
    return tmp_path


def run_script(cwd, *args, script='gpt.py', timeout=120):
    """ run gpt.py (or bigram.py) as a user would, in cwd; returns the finished process """
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models run best on one thread, and tests run side by side
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def log_rows(folder):
    return list(csv.DictReader(open(folder / 'log.csv')))


def error_of(argv, **kwargs):
    """ gpt.main in this process stopped with one line: that line """
    with pytest.raises(SystemExit) as e:
        gpt.main(argv, **kwargs)
    assert str(e.value.code).startswith('error: ') and '\n' not in str(e.value.code)
    return str(e.value.code)


def snapshot(folder):
    return {name: (folder / 'out' / name).read_bytes() for name in ('ckpt.pt', 'best.pt')}
