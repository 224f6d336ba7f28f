""" save, resume exactly, stop with Ctrl-C, sample later, train on your own text, download the default """
import csv
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import gpt
from conftest import ROOT, TINY, run_script
from test_cli import STEP_LINE, one_line_error


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_a_run_saves_latest_and_best_with_everything_needed(workdir):
    p = run_script(workdir, *TINY)
    assert p.returncode == 0, p.stderr
    ckpt, best = load(workdir / 'out' / 'ckpt.pt'), load(workdir / 'out' / 'best.pt')
    assert ckpt['step'] == 20 and ckpt['model_class'] == 'GPTLanguageModel'
    assert {'model', 'optimizer', 'config', 'model_args', 'chars', 'rng_cpu', 'best_val_loss'} <= ckpt.keys()
    assert ckpt['config']['n_embd'] == 16 and ckpt['model_args']['vocab_size'] == len(ckpt['chars'])
    assert best['best_val_loss'] == ckpt['best_val_loss']
    rows = list(csv.DictReader(open(workdir / 'out' / 'log.csv')))
    assert [int(r['step']) for r in rows] == [0, 10, 20]
    assert min(float(r['val_loss']) for r in rows) == pytest.approx(best['best_val_loss'], abs=1e-4)
    assert set(rows[0]) == {'step', 'train_loss', 'val_loss', 'lr', 'elapsed_s', 'whole_val_loss'}


def test_sample_later_from_a_prompt_without_the_text_file(workdir):
    assert run_script(workdir, *TINY).returncode == 0
    os.remove(workdir / 'input.txt')
    p = run_script(workdir, '--device=cpu', '--init_from=resume', '--max_iters=0', '--prompt=ROMEO:',
                   '--max_new_tokens=40', '--num_samples=2')
    assert p.returncode == 0, p.stderr
    assert not STEP_LINE.findall(p.stdout) and p.stdout.split('block_size 16\n')[1].count('ROMEO:') == 2
    assert not (workdir / 'input.txt').exists()


def test_ctrl_c_saves_and_samples_and_resume_is_exact(workdir):
    args = [*TINY, '--max_iters=600', '--eval_interval=200', '--log_interval=50', '--max_new_tokens=20']
    whole = run_script(workdir, *args, '--out_dir=whole')
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'gpt.py'), *args, '--out_dir=cut'], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})  # as run_script: same threads, same sums
    for line in proc.stdout:
        if line.startswith('  step 50/'):
            proc.send_signal(signal.SIGINT)
            break
    out = line + proc.stdout.read()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert 'Ctrl-C' in out
    stopped = load(workdir / 'cut' / 'ckpt.pt')['step']
    assert 50 <= stopped < 600
    assert len(out.split('saved ', 1)[1].split('\n', 1)[1].strip()) > 0  # the sample is still printed
    resumed = run_script(workdir, *args, '--out_dir=cut', '--init_from=resume')
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(workdir / 'whole' / 'ckpt.pt'), load(workdir / 'cut' / 'ckpt.pt')
    assert a['step'] == b['step'] == 600
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    later = [s for s in STEP_LINE.findall(resumed.stdout)]
    assert later and set(later) <= set(STEP_LINE.findall(whole.stdout))


def test_train_on_your_own_text_with_its_own_vocabulary(workdir):
    (workdir / 'mine.txt').write_text('αβγ δέζ ηθι! ' * 300, encoding='utf-8')
    p = run_script(workdir, *TINY, '--input_file=mine.txt', '--prompt=αβ')
    assert p.returncode == 0, p.stderr
    assert load(workdir / 'out' / 'ckpt.pt')['chars'] == ''.join(sorted(set('αβγ δέζ ηθι!')))
    sample = p.stdout.split('saved ', 1)[1].split('\n', 1)[1].removeprefix('αβ')
    assert set(sample.strip()) <= set('αβγ δέζ ηθι!\n')


class OneFile(http.server.BaseHTTPRequestHandler):
    body = b''
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)
    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(('127.0.0.1', 0), OneFile)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/input.txt'
    httpd.shutdown()


def test_the_default_text_is_downloaded_when_missing_and_checked(tmp_path, server):
    OneFile.body = open(os.path.join(ROOT, 'input.txt'), 'rb').read()[:5000]
    sha = hashlib.sha256(OneFile.body).hexdigest()
    bad = run_script(tmp_path, *TINY, f'--data_url={server}', f'--data_sha256={"0" * 64}')
    assert 'checksum' in one_line_error(bad) and not (tmp_path / 'input.txt').exists()
    p = run_script(tmp_path, *TINY, f'--data_url={server}', f'--data_sha256={sha}')
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'input.txt').read_bytes() == OneFile.body
    assert STEP_LINE.findall(p.stdout)


def test_offline_says_where_to_put_the_file(tmp_path):
    line = one_line_error(run_script(tmp_path, *TINY, '--data_url=http://127.0.0.1:9/input.txt'))
    assert 'input.txt' in line and '--input_file' in line


def test_thousands_of_distinct_characters_train_save_resume_and_sample(workdir):
    rng = __import__('random').Random(0)
    text = ''.join(chr(0x4E00 + rng.randrange(3000)) + ('。\n' if i % 17 == 16 else '') for i in range(60000))
    (workdir / 'zh.txt').write_text(text, encoding='utf-8')
    first = run_script(workdir, *TINY, '--input_file=zh.txt')
    assert first.returncode == 0, first.stderr
    vocab = load(workdir / 'out' / 'ckpt.pt')['chars']
    assert len(vocab) > 2900 and vocab == ''.join(sorted(set(text)))
    resumed = run_script(workdir, *TINY, '--input_file=zh.txt', '--init_from=resume', '--max_iters=30',
                         f'--prompt={text[:3]}')
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _, _ in STEP_LINE.findall(resumed.stdout)] == ['30']
    sample = resumed.stdout.split('saved ', 1)[1].split('\n', 1)[1]
    assert sample.startswith(text[:3])
    sample = sample[3:]
    assert len(sample.strip()) >= 20 and set(sample.strip()) <= set(vocab)


def test_a_sinusoidal_model_trains_resumes_exactly_and_remembers_its_embedding(workdir):
    args = [*TINY, '--position_embedding=sinusoidal', '--max_iters=60', '--eval_interval=20']
    stop_at_step_30 = f"""
import os, signal, gpt
get_lr = gpt.get_lr
def ctrl_c_at_step_30(step, cfg, *end):
    if step == 30:
        os.kill(os.getpid(), signal.SIGINT)
    return get_lr(step, cfg, *end)
gpt.get_lr = ctrl_c_at_step_30
gpt.main({[*args, '--out_dir=cut']!r})
"""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    assert run_script(workdir, *args, '--out_dir=whole').returncode == 0
    p = subprocess.run([sys.executable, '-c', stop_at_step_30], cwd=workdir, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0 and 'Ctrl-C' in p.stdout, p.stderr
    assert load(workdir / 'cut' / 'ckpt.pt')['step'] == 31
    resumed = run_script(workdir, '--device=cpu', '--init_from=resume', '--out_dir=cut')  # no setting repeated
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(workdir / 'whole' / 'ckpt.pt'), load(workdir / 'cut' / 'ckpt.pt')
    assert a['step'] == b['step'] == 60 and b['model_args']['position_embedding'] == 'sinusoidal'
    assert a['model'].keys() == b['model'].keys() and not [k for k in a['model'] if 'position' in k]
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
