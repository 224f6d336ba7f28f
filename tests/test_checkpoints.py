""" checkpoints and resume: what a run saves, sampling later, an exact resume, the runs kept, the settings and the
text a resume checks, finished runs, init_from=best, and the log across resumes """
import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import gpt
from conftest import ROOT, TINY, error_of, load, log_rows, run_script, snapshot
from test_cli import STEP_LINE


# what a run saves, and sampling from it later

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


def test_sampling_from_a_checkpoint_follows_the_seed(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    samples = []
    for seed in (1, 2, 1):
        capsys.readouterr()
        gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=0', f'--seed={seed}', '--max_new_tokens=60'])
        samples.append(capsys.readouterr().out.rsplit('block_size 16\n', 1)[1])
    assert samples[0] == samples[2] != samples[1]


# a resume is the same run

def test_ctrl_c_saves_and_samples_and_resume_is_exact(workdir):
    # --max_time=0: max_iters ends the run, so no step's rate depends on the clock
    args = [*TINY, '--max_iters=600', '--eval_interval=200', '--log_interval=50', '--max_new_tokens=20', '--max_time=0']
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


def test_a_sinusoidal_model_trains_resumes_exactly_and_remembers_its_embedding(workdir):
    args = [*TINY, '--position_embedding=sinusoidal', '--max_iters=60', '--eval_interval=20', '--max_time=0']
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


# no trained model is lost: kept runs, init_from=best

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


def test_training_on_from_best_is_a_branch_that_keeps_the_run_it_came_from(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--out_dir=early'])  # a checkpoint at step 20, to stand in for a best.pt behind ckpt.pt
    gpt.main([*TINY, '--max_iters=40'])
    shutil.copy(workdir / 'early' / 'ckpt.pt', workdir / 'out' / 'best.pt')
    run_at_40 = (workdir / 'out' / 'ckpt.pt').read_bytes()
    gpt.main(['--device=cpu', '--init_from=best', '--max_iters=30'])
    kept = list((workdir / 'out' / 'previous').iterdir())
    assert len(kept) == 1 and (kept[0] / 'ckpt.pt').read_bytes() == run_at_40
    assert load(workdir / 'out' / 'ckpt.pt')['step'] == 30
    assert [r['step'] for r in log_rows(workdir / 'out')] == ['0', '10', '20', '30']  # the branch's own history


def test_init_from_best_without_best_pt_points_to_resume(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=0'])  # no checkpoint at all
    assert 'train one first (python gpt.py)' in error_of(['--device=cpu', '--init_from=best'])
    gpt.main(TINY)
    os.remove(workdir / 'out' / 'best.pt')
    assert '--init_from=resume' in error_of(['--device=cpu', '--init_from=best'])


# the settings on resume

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


def test_resuming_with_fewer_processes_says_the_tokens_per_step_change(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert ckpt['processes'] == 1
    torch.save({**ckpt, 'processes': 2}, workdir / 'out' / 'ckpt.pt')  # as torchrun with 2 processes saves it
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])
    out = capsys.readouterr().out
    assert 'trained by 2 processes, this run has 1: 128 -> 64 tokens per step' in out
    assert '--gradient_accumulation_steps=2' in out


# the text on resume: another folder, a text that changed

def test_a_resume_from_another_folder_finds_its_text(workdir):
    (workdir / 'notes.txt').write_text('my notes, day by day. ' * 200, encoding='utf-8')
    assert run_script(workdir, *TINY, '--input_file=notes.txt').returncode == 0
    (workdir / 'elsewhere').mkdir()
    p = run_script(workdir / 'elsewhere', '--device=cpu', '--init_from=resume', '--out_dir=../out', '--max_iters=30')
    assert p.returncode == 0, p.stderr
    assert 'downloading' not in p.stdout and load(workdir / 'out' / 'ckpt.pt')['step'] == 30


def test_a_text_edited_since_the_checkpoint_is_named_as_changed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    notes = workdir / 'notes.txt'
    notes.write_text('my notes, day by day. ' * 200, encoding='utf-8')
    gpt.main([*TINY, '--input_file=notes.txt'])
    notes.write_text('my notes, day by day. ' * 200 + '§', encoding='utf-8')
    line = error_of(['--device=cpu', '--init_from=resume', '--max_iters=30'])
    assert 'notes.txt has changed since the model learned it' in line and "new: '§'" in line


def test_an_edit_that_keeps_the_characters_is_said(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    notes = workdir / 'notes.txt'
    notes.write_text('my notes, day by day. ' * 200, encoding='utf-8')
    gpt.main([*TINY, '--input_file=notes.txt'])
    notes.write_text('day by day, my notes. ' * 300, encoding='utf-8')
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])
    assert 'notes.txt has changed since step 20 was saved (same characters)' in capsys.readouterr().out


# finished runs

def test_a_resume_past_max_iters_says_it_only_samples(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=5'])
    assert 'past --max_iters=5: sampling only' in capsys.readouterr().out


def test_resuming_a_finished_run_says_it_only_samples(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume'])
    out = capsys.readouterr().out
    assert 'has finished its 20 steps: sampling only (--max_iters=N' in out and not STEP_LINE.findall(out)


# the log across resumes

def test_elapsed_time_goes_on_across_a_resume(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])
    elapsed = [float(r['elapsed_s']) for r in log_rows(workdir / 'out')]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0


def test_a_resume_logs_each_step_once_and_time_goes_forward(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    with open(workdir / 'out' / 'log.csv', 'a', newline='') as f:  # a row whose checkpoint was never written
        csv.writer(f).writerow([30, '3.0', '3.0', '1e-3', '999.0', ''])
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=40'])
    rows = log_rows(workdir / 'out')
    assert [r['step'] for r in rows] == ['0', '10', '20', '30', '40']
    elapsed = [float(r['elapsed_s']) for r in rows]
    assert elapsed == sorted(elapsed)
