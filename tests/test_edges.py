""" the edges a user hits: no trained model is lost, a resume is the same run, and no traceback """
import csv
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import gpt
from conftest import ROOT, TINY, run_script
from test_bad_input import snapshot
from test_cli import STEP_LINE, one_line_error


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


def run_python(cwd, code):
    """ python -c code with gpt importable, as a script of the user's would run it """
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT})


# lost work

def test_a_new_run_keeps_the_previous_runs_model(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    first = (workdir / 'out' / 'ckpt.pt').read_bytes()
    gpt.main([*TINY, '--max_iters=10'])
    kept = [p for p in (workdir / 'out' / 'previous').iterdir()]
    assert len(kept) == 1 and (kept[0] / 'ckpt.pt').read_bytes() == first
    assert (kept[0] / 'best.pt').exists() and len(log_rows(kept[0])) == 3
    assert load(workdir / 'out' / 'ckpt.pt')['step'] == 10
    assert f'kept in {os.path.join("out", "previous", kept[0].name)}' in capsys.readouterr().out


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


# a resume is the same run

def test_resume_takes_the_settings_of_the_checkpoint(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (workdir / 'notes.txt').write_text('my notes, day by day. ' * 200, encoding='utf-8')
    gpt.main([*TINY, '--input_file=notes.txt', '--out_dir=out-notes', '--learning_rate=0.002'])
    capsys.readouterr()
    model = gpt.main(['--device=cpu', '--init_from=resume', '--out_dir=out-notes', '--max_iters=30'])
    out = capsys.readouterr().out
    assert 'resuming' in out and 'changed: max_iters 20 -> 30' in out and 'block_size 16' in out
    assert model.config.n_embd == 16 and [s for s, _, _ in STEP_LINE.findall(out)] == ['30']
    assert load(workdir / 'out-notes' / 'ckpt.pt')['config']['learning_rate'] == 0.002


def test_a_resume_cannot_change_the_models_shape(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    before = snapshot(workdir)
    line = error_of(['--device=cpu', '--init_from=resume', '--max_iters=30', '--n_layer=3', '--n_embd=32'])
    assert 'n_layer=1' in line and 'n_embd=16' in line and '--out_dir' in line
    assert 'block_size=16' in error_of(['--device=cpu', '--init_from=resume', '--block_size=4'])
    assert snapshot(workdir) == before


def test_a_resume_checks_the_text_against_the_models_block_size(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'short.txt').write_text(open(workdir / 'input.txt').read()[:170], encoding='utf-8')
    gpt.main([*TINY, '--input_file=short.txt'])
    model = gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])  # block_size 16, not 128
    assert model.config.block_size == 16


def test_training_on_past_the_end_goes_on_at_min_lr(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=40'])
    lrs = {int(r['step']): float(r['lr']) for r in log_rows(workdir / 'out')}
    assert lrs[20] == lrs[30] == lrs[40] == pytest.approx(gpt.min_lr)  # no jump back up the schedule
    assert lrs[10] > lrs[20]


def test_sampling_from_a_checkpoint_follows_the_seed(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    samples = []
    for seed in (1, 2, 1):
        capsys.readouterr()
        gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=0', f'--seed={seed}', '--max_new_tokens=60'])
        samples.append(capsys.readouterr().out.rsplit('block_size 16\n', 1)[1])
    assert samples[0] == samples[2] != samples[1]


def test_elapsed_time_goes_on_across_a_resume(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])
    elapsed = [float(r['elapsed_s']) for r in log_rows(workdir / 'out')]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0


def test_a_resume_past_max_iters_says_it_only_samples(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=5'])
    assert 'past --max_iters=5: sampling only' in capsys.readouterr().out


# tracebacks and wrong messages

def test_max_iters_0_without_a_checkpoint_samples_the_untrained_model(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=0', '--prompt=ROMEO:'])
    out = capsys.readouterr().out
    assert not STEP_LINE.findall(out) and len(out.split('ROMEO:', 1)[1].strip()) > 10
    assert not (workdir / 'out' / 'ckpt.pt').exists()


@pytest.mark.parametrize('args, expected', [
    (['--beta1=1.5'], 'beta1 must be at least 0 and below 1'),
    (['--beta2=-1'], 'beta2 must be at least 0 and below 1'),
    (['--seed=18446744073709551616'], 'seed must be'),
    (['--temperature=1e-40'], '--temperature=0'),
    (['--learning_rate=1e999'], 'learning_rate must be a finite number'),
    (['--input_file=.'], "input file '.'"),
    (['--max_iter=5'], "did you mean max_iters"),
    (['--zzzz=5'], "unknown setting 'zzzz': see --help"),
    (['--max_iters=lots'], 'takes an int'),
])
def test_settings_that_cannot_work_are_one_line(workdir, monkeypatch, args, expected):
    monkeypatch.chdir(workdir)
    assert expected in error_of([*TINY, *args])
    assert not (workdir / 'out' / 'ckpt.pt').exists()


def test_a_stray_rank_variable_is_one_line(workdir):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY], cwd=workdir, capture_output=True,
                       text=True, timeout=120, env={**os.environ, 'RANK': '0', 'OMP_NUM_THREADS': '1'})
    assert 'torchrun' in one_line_error(p)


def test_a_loss_that_becomes_nan_gives_advice_that_fits(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    line = error_of([*TINY, '--learning_rate=1e30', '--min_lr=1e30', '--warmup_iters=0'])
    assert 'nothing was saved' in line and 'grad_clip' not in line  # grad_clip is already on


def test_preparations_never_share_a_temporary_file(tmp_path):
    (tmp_path / 'in.txt').write_text('abc' * 100, encoding='utf-8')
    (tmp_path / 'data.bin.tmp').mkdir()  # where every run used to write: another run's, in the way
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert chars == list('abc') and len(data) == 300


def test_an_interrupted_preparation_leaves_no_file_behind(tmp_path, monkeypatch):
    (tmp_path / 'in.txt').write_text('abc' * 100, encoding='utf-8')
    calls = []
    def interrupted(text):
        calls.append(text)
        if len(calls) == 2:  # in the second pass, while writing
            raise KeyboardInterrupt
        return gpt.np.frombuffer(text.encode('utf-32-le'), dtype=gpt.np.uint32)
    monkeypatch.setattr(gpt, 'code_points', interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['in.txt']


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    (tmp_path / 'in.txt').write_bytes('\ufeffhello'.encode('utf-8'))
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert chars == list('ehlo') and len(data) == 5


def test_from_a_notebook_argv_and_ctrl_c_are_left_alone(workdir):
    p = run_python(workdir, f"""
import signal, sys, gpt
sys.argv = ['ipykernel_launcher.py', '-f', 'kernel.json']  # what Jupyter passes
before = signal.getsignal(signal.SIGINT)
try:
    gpt.main([*{TINY!r}, '--learning_rate=1e30', '--min_lr=1e30', '--warmup_iters=0'])  # fails while training
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


def test_bigram_says_what_model_it_is(workdir):
    p = run_script(workdir, '--device=cpu', '--max_iters=10', '--eval_iters=2', '--max_new_tokens=5', script='bigram.py')
    assert p.returncode == 0, p.stderr
    assert 'model: BigramLanguageModel, block_size 8' in p.stdout and 'layers' not in p.stdout
