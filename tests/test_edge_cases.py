""" the edges of real use: two runs at once, a stop at any moment, a full disk, a big text, a text that changed,
another folder, a console or a pipe that cannot take the output: nothing lost, and one line to say what to do """
import csv
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

import gpt
from conftest import ROOT, TINY, run_script
from test_cli import STEP_LINE, one_line_error
from test_edges import error_of, load, log_rows, run_python


def start_long_run(cwd, *args, until='  step 20/'):
    """ a training run in a process of its own, left running once it prints a line starting with until """
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--max_iters=100000', *args],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    for line in proc.stdout:
        if line.startswith(until):
            return proc
    raise AssertionError(proc.stderr.read())


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


# a stop at any moment

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


# a full disk

def no_space_for(*names):
    """ open() for gpt.py that fails as a full disk does when writing a file of these names """
    def failing_open(path, mode='r', *args, **kwargs):
        if any(n in str(path) for n in names) and mode[0] in 'wa':
            raise OSError(28, 'No space left on device')
        return open(path, mode, *args, **kwargs)
    return failing_open


def test_a_full_disk_when_the_log_is_written_is_one_line(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(gpt, 'open', no_space_for('log.csv'), raising=False)
    assert 'No space left on device' in error_of(TINY)
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--out_dir=first'])
    monkeypatch.setattr(gpt, 'open', no_space_for('log.csv'), raising=False)
    line = error_of(['--device=cpu', '--init_from=resume', '--out_dir=first', '--max_iters=30'])
    assert 'No space left on device' in line and 'free some disk space' in line


def test_a_full_disk_when_a_checkpoint_is_written_says_so(tmp_path, monkeypatch):
    def torch_on_a_full_disk(obj, path):
        open(path, 'wb').write(b'half')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')
    monkeypatch.setattr(torch, 'save', torch_on_a_full_disk)
    monkeypatch.setattr(gpt.shutil, 'disk_usage', lambda p: namedtuple('usage', 'total used free')(1, 1, 0))
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=3, block_size=4, n_embd=8, n_head=2, n_layer=1))
    run = gpt.SimpleNamespace(step=1, best_val_loss=2.0, elapsed=1.0, raw_model=model, text={}, world=1,
                              optimizer=torch.optim.AdamW(model.parameters()), tokenizer=gpt.CharTokenizer('abc'),
                              max_iters=20, lr_decay_iters=20, planned=True)
    with pytest.raises(SystemExit) as e:
        gpt.save_checkpoint(str(tmp_path / 'ckpt.pt'), run, gpt.get_config([])[0])
    assert 'no space left on the disk' in str(e.value) and 'enforce' not in str(e.value)
    assert os.listdir(tmp_path) == []


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


# a big text

def test_the_final_loss_reads_every_window_of_a_small_split_and_spread_windows_of_a_big_one():
    starts, n = gpt.final_windows(np.zeros(111_541), 64)  # tiny Shakespeare's val split
    assert n == len(starts) == 1742 and list(starts[:3]) == [0, 64, 128]
    starts, n = gpt.final_windows(np.zeros(10_000_001), 64)  # a 100 MB text's
    assert len(starts) == (1 << 17) // 64 and n == 156_250
    assert starts[0] == 0 and starts[-1] == (n - 1) * 64 and (np.diff(starts) > 0).all()
    assert np.ptp(np.diff(starts)) <= 64  # evenly spread


def test_the_final_loss_is_the_exact_mean_over_a_small_split():
    torch.manual_seed(0)
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=5, block_size=8, n_embd=8, n_head=2, n_layer=1))
    data = np.random.default_rng(0).integers(0, 5, 1001).astype(np.uint16)
    cfg = gpt.SimpleNamespace(block_size=8, batch_size=3)
    whole = gpt.whole_split_loss(model, data, cfg, torch.device('cpu'), gpt.nullcontext())
    x = torch.from_numpy(data[:1000].astype(np.int64)).view(-1, 8)
    y = torch.from_numpy(data[1:1001].astype(np.int64)).view(-1, 8)
    assert whole == pytest.approx(model(x, y)[1].item(), abs=1e-5)
    assert gpt.whole_split_loss(model, data, cfg, torch.device('cpu'), gpt.nullcontext(), stop=[2]) == whole

    class StopWhileItRuns(list):  # no stop when the pass begins, one from its first batch on
        def __len__(self):
            self.looks = getattr(self, 'looks', 0) + 1
            return int(self.looks > 1)
    assert gpt.whole_split_loss(model, data, cfg, torch.device('cpu'), gpt.nullcontext(), StopWhileItRuns()) is None


def test_a_big_texts_final_line_says_it_read_spread_windows(workdir):
    text = (workdir / 'input.txt').read_text(encoding='utf-8')
    (workdir / 'big.txt').write_text(text * 80, encoding='utf-8')  # a val split of 160,000 characters
    p = run_script(workdir, *TINY, '--input_file=big.txt', '--max_iters=10')
    assert p.returncode == 0, p.stderr
    assert "step 10: val loss over 8,192 windows spread over the split's 9,999" in p.stdout


# another folder, a text that changed, another number of processes

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


def test_resuming_a_finished_run_says_it_only_samples(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume'])
    out = capsys.readouterr().out
    assert 'has finished its 20 steps: sampling only (--max_iters=N' in out and not STEP_LINE.findall(out)


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


# messages that point the right way

def test_init_from_best_without_best_pt_points_to_resume(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=0'])  # no checkpoint at all
    assert 'train one first (python gpt.py)' in error_of(['--device=cpu', '--init_from=best'])
    gpt.main(TINY)
    os.remove(workdir / 'out' / 'best.pt')
    assert '--init_from=resume' in error_of(['--device=cpu', '--init_from=best'])


def test_bigram_names_itself_and_the_kept_runs_and_refuses_what_it_has_not(workdir):
    args = ['--device=cpu', '--max_iters=10', '--eval_iters=2', '--max_new_tokens=5', '--out_dir=b']
    assert 'BigramLanguageModel has no n_layer' in one_line_error(run_script(workdir, *args, '--n_layer=4',
                                                                             script='bigram.py'))
    assert run_script(workdir, *args, script='bigram.py').returncode == 0
    assert run_script(workdir, *args, script='bigram.py').returncode == 0  # the first run is kept in previous/
    os.remove(workdir / 'b' / 'ckpt.pt')
    line = one_line_error(run_script(workdir, '--device=cpu', '--init_from=resume', '--out_dir=b', script='bigram.py'))
    assert 'python bigram.py' in line and os.path.join('b', 'previous') in line


# the console

def test_a_console_that_cannot_show_the_texts_characters_prints_question_marks(workdir):
    (workdir / 'zh.txt').write_text('床前明月光，疑是地上霜。举头望明月，低头思故乡。\n' * 100, encoding='utf-8')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--input_file=zh.txt'], cwd=workdir,
                       capture_output=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1',
                                                               'PYTHONIOENCODING': 'cp1252'})
    assert p.returncode == 0 and b'Traceback' not in p.stderr, p.stderr
    assert b'???' in p.stdout and b'saved out' in p.stdout


def test_a_reader_that_goes_away_stops_the_run_saved_and_quiet(workdir):
    proc = start_long_run(workdir)
    proc.stdout.close()  # as `python gpt.py | head` does after its lines
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert 'Traceback' not in proc.stderr.read()
    assert 20 <= load(workdir / 'out' / 'ckpt.pt')['step'] < 100000


def test_torch_compile_without_a_compiler_is_one_line_before_anything_moves(workdir):
    assert run_script(workdir, *TINY).returncode == 0
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--torch_compile=True'], cwd=workdir,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'CXX': '/no/such/compiler'})
    assert 'torch.compile does not work here' in one_line_error(p) and '--torch_compile=False' in p.stderr
    assert not (workdir / 'out' / 'previous').exists() and (workdir / 'out' / 'ckpt.pt').exists()
