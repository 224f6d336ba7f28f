""" every bad input ends in one line that says what to do, before training, with no checkpoint changed """
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

import gpt
from conftest import ROOT, TINY, error_of, run_script, snapshot
from test_cli import one_line_error


# bad settings

@pytest.mark.parametrize('args, expected', [
    (['--input_file=nothere.txt'], 'nothere.txt'),
    (['--n_embd=30', '--n_head=4'], 'divisible'),
    (['--n_layer=0'], 'n_layer must be a positive int, not 0: change --n_layer'),
    (['--batch_size=-2'], 'batch_size must be a positive int'),
    (['--dropout=1.0'], 'dropout'),
    (['--device=cuda:7'], "device 'cuda:7' is not available"),
    (['--device=tpu'], 'device'),
    (['--activation=swish'], 'activation must be one of'),
    (['--out_dir=input.txt/sub'], 'out_dir'),
    (['--block_size=3000'], 'too short for block_size=3000'),
    (['--prompt=Zoë'], 'never saw'),
    (['--init_from=resume'], 'no checkpoint'),
])
def test_bad_settings_stop_before_training_with_one_line(workdir, args, expected):
    p = run_script(workdir, *TINY, *args)
    assert expected in one_line_error(p)
    assert 'step 0' not in p.stdout


@pytest.mark.parametrize('args, expected', [
    (['--beta1=1.5'], 'beta1 must be a number at least 0 and below 1'),
    (['--beta2=-1'], 'beta2 must be a number at least 0 and below 1'),
    (['--seed=18446744073709551616'], 'seed must be'),
    (['--temperature=1e-40'], '--temperature=0'),
    (['--learning_rate=1e999'], 'learning_rate must be a number >= 0, not inf'),
    (['--input_file=.'], "input file '.'"),
    (['--max_iter=5'], "did you mean max_iters"),
    (['--zzzz=5'], "unknown setting 'zzzz': see --help"),
    (['--max_iters=lots'], "max_iters must be an int >= 0, not 'lots'"),
    (['--n_embd=96', '--n_head=5'], 'must be divisible by n_head (5): set n_head=4 or 6, or n_embd=100'),
    (['--n_embd=30', '--n_head=4'], 'set n_head=3 or 5, or n_embd=32'),
    (['--min_lr_frac=1.5'], 'min_lr_frac must be a number from 0 to 1, not 1.5'),
    (['--min_lr=1e-2'], 'did you mean min_lr_frac'),
])
def test_settings_that_cannot_work_are_one_line(workdir, monkeypatch, args, expected):
    monkeypatch.chdir(workdir)
    assert expected in error_of([*TINY, *args])
    assert not (workdir / 'out' / 'ckpt.pt').exists()


def test_a_stray_rank_variable_is_one_line(workdir):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY], cwd=workdir, capture_output=True,
                       text=True, timeout=120, env={**os.environ, 'RANK': '0', 'OMP_NUM_THREADS': '1'})
    assert 'torchrun' in one_line_error(p)


def test_torch_compile_without_a_compiler_is_one_line_before_anything_moves(workdir):
    assert run_script(workdir, *TINY).returncode == 0
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--torch_compile=True'], cwd=workdir,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'CXX': '/no/such/compiler'})
    assert 'torch.compile does not work here' in one_line_error(p) and '--torch_compile=False' in p.stderr
    assert not (workdir / 'out' / 'previous').exists() and (workdir / 'out' / 'ckpt.pt').exists()


# bad text files

@pytest.mark.parametrize('content, expected', [(b'', 'empty'), (b'caf\xe9 au lait\n' * 50, 'not UTF-8')])
def test_bad_text_files(workdir, content, expected):
    (workdir / 'bad.txt').write_bytes(content)
    assert expected in one_line_error(run_script(workdir, *TINY, '--input_file=bad.txt'))


# damaged or mismatched checkpoints

@pytest.fixture(scope='module')
def trained_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp('trained')
    shutil.copy(os.path.join(ROOT, 'input.txt'), folder / 'input.txt')
    assert run_script(folder, *TINY).returncode == 0
    return folder


@pytest.fixture
def trained(trained_once, tmp_path):
    """ a folder with a text and the checkpoints of a tiny run on it, fresh for each test """
    shutil.copytree(trained_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_a_truncated_checkpoint(trained):
    path = trained / 'out' / 'ckpt.pt'
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(trained)
    assert 'damaged' in one_line_error(run_script(trained, *TINY, '--init_from=resume', '--max_iters=30'))
    assert snapshot(trained) == before


def test_a_checkpoint_trained_on_another_vocabulary(trained):
    before = snapshot(trained)
    (trained / 'other.txt').write_text('0123456789 ' * 500, encoding='utf-8')
    line = one_line_error(run_script(trained, *TINY, '--init_from=resume', '--max_iters=30',
                                     '--input_file=other.txt'))
    assert 'vocabular' in line
    assert snapshot(trained) == before


def test_a_checkpoint_of_another_format_is_refused_in_one_line(trained):
    path = trained / 'out' / 'ckpt.pt'
    old = torch.load(path, weights_only=True)
    del old['format']  # as a gpt.py from before the format number wrote it
    torch.save(old, path)
    before = snapshot(trained)
    line = one_line_error(run_script(trained, *TINY, '--init_from=resume', '--max_iters=30'))
    assert 'is a checkpoint of format None, and this gpt.py reads format 1' in line and '--out_dir' in line
    assert snapshot(trained) == before


def test_a_checkpoint_of_another_model(trained):
    line = one_line_error(run_script(trained, '--device=cpu', '--out_dir=out', '--init_from=resume',
                                     '--max_iters=0', script='bigram.py'))
    assert 'GPTLanguageModel' in line and 'BigramLanguageModel' in line


def test_a_prompt_the_checkpoint_never_saw(trained):
    line = one_line_error(run_script(trained, '--device=cpu', '--init_from=resume', '--max_iters=0',
                                     '--prompt=€uro'))
    assert "'€'" in line


# a loss that becomes NaN

def test_a_loss_that_becomes_nan_stops_and_keeps_the_last_good_checkpoint(trained):
    before = snapshot(trained)
    line = one_line_error(run_script(trained, *TINY, '--init_from=resume', '--max_iters=40',
                                     '--learning_rate=1e30', '--grad_clip=0.0', '--warmup_iters=0'))
    assert 'at step 22;' in line and 'learning_rate' in line
    assert snapshot(trained) == before


def test_a_loss_that_becomes_nan_gives_advice_that_fits(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    line = error_of([*TINY, '--learning_rate=1e30', '--warmup_iters=0'])
    assert 'nothing was saved' in line and 'grad_clip' not in line  # grad_clip is already on


# a full disk

def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(trained, monkeypatch):
    path = str(trained / 'out' / 'ckpt.pt')
    before = open(path, 'rb').read()
    def failing_save(obj, f, *args, **kwargs):
        with open(f, 'wb') as out:
            out.write(b'half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', failing_save)
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=3, block_size=4, n_embd=8, n_head=2, n_layer=1))
    optimizer = torch.optim.AdamW(model.parameters())
    cfg, _ = gpt.get_config([])
    run = gpt.LoopState(step=1, best_val_loss=2.0, elapsed=1.0, raw_model=model, optimizer=optimizer,
                        tokenizer=gpt.CharTokenizer('abc'), max_iters=20, constants={},
                        scaler=torch.amp.GradScaler('cpu', enabled=False))
    with pytest.raises(SystemExit, match='previous checkpoint is intact'):
        gpt.save_checkpoint(path, run, cfg)
    assert open(path, 'rb').read() == before
    assert torch.load(path, weights_only=True)['step'] == 20


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
    run = gpt.LoopState(step=1, best_val_loss=2.0, elapsed=1.0, raw_model=model,
                        optimizer=torch.optim.AdamW(model.parameters()), tokenizer=gpt.CharTokenizer('abc'),
                        max_iters=20, constants={}, scaler=torch.amp.GradScaler('cpu', enabled=False))
    with pytest.raises(SystemExit) as e:
        gpt.save_checkpoint(str(tmp_path / 'ckpt.pt'), run, gpt.get_config([])[0])
    assert 'no space left on the disk' in str(e.value) and 'enforce' not in str(e.value)
    assert os.listdir(tmp_path) == []


# a console that cannot show the characters

def test_a_console_that_cannot_show_the_texts_characters_prints_question_marks(workdir):
    (workdir / 'zh.txt').write_text('床前明月光，疑是地上霜。举头望明月，低头思故乡。\n' * 100, encoding='utf-8')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--input_file=zh.txt'], cwd=workdir,
                       capture_output=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1',
                                                               'PYTHONIOENCODING': 'cp1252'})
    assert p.returncode == 0 and b'Traceback' not in p.stderr, p.stderr
    assert b'???' in p.stdout and b'saved out' in p.stdout


# messages that read right: each names what happened and the command that helps
def test_a_resume_with_another_optimizer_says_the_run_keeps_its_optimizer(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--optim=muon'])
    line = error_of(['--device=cpu', '--init_from=resume', '--max_iters=30', '--optim=adamw'])
    assert "keeps its optimizer" in line and "optim='muon'" in line and 'shape' not in line


def test_a_checkpoint_of_another_script_names_the_script(workdir):
    args = ['--device=cpu', '--max_iters=5', '--eval_iters=2', '--max_new_tokens=5', '--out_dir=b']
    assert run_script(workdir, *args, script='bigram.py').returncode == 0
    p = run_script(workdir, '--device=cpu', '--init_from=resume', '--out_dir=b')
    line = p.stderr.strip().splitlines()[-1]
    assert 'holds a BigramLanguageModel' in line and 'python bigram.py --out_dir=b' in line, p.stderr


def test_a_stray_rank_variable_names_the_whole_cause(workdir):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY], cwd=workdir,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'RANK': '0', 'OMP_NUM_THREADS': '1'})
    line = p.stderr.strip().splitlines()[-1]
    assert 'expected, but not set)' in line and 'unset RANK' in line, line  # not cut mid-word


def test_first_line_shortens_a_message_at_a_word():
    line = gpt.first_line(ValueError('environment variable MASTER_ADDR expected, but not set'), 30)
    assert line == 'environment variable...'
    assert gpt.first_line(ValueError('\n  two\nlines')) == 'two'


def test_a_utf16_text_is_named_with_the_fix(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'u16.txt').write_bytes('First Citizen:\n'.encode('utf-16') * 50)
    line = error_of([*TINY, '--input_file=u16.txt'])
    assert 'UTF-16' in line and 'iconv' in line and 'chunk' not in line


def test_a_text_that_is_not_utf8_names_the_byte(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'latin1.txt').write_bytes(b'caf\xe9 au lait\n' * 50)
    line = error_of([*TINY, '--input_file=latin1.txt'])
    assert 'not UTF-8' in line and '0xe9' in line and 'chunk' not in line


def test_resuming_while_a_run_trains_and_has_not_saved_says_so(workdir, monkeypatch):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'gpt.py'), *TINY, '--max_iters=100000',
                             '--eval_interval=100000'], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        for line in proc.stdout:
            if line.startswith('  step 10/'):
                break
        monkeypatch.chdir(workdir)
        line = error_of(['--device=cpu', '--init_from=resume'])
        assert 'a run is training in out' in line and f'pid {proc.pid}' in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_prompt_shows_its_characters_as_typed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    line = error_of([*TINY, '--prompt=\\^_', '--max_iters=0'])
    assert "'\\^_'" in line and '\\\\' not in line


@pytest.mark.parametrize('n, word, expected', [(1, 'step', '1 step'), (2, 'layer', '2 layers'),
                                               (0, 'head', '0 heads')])
def test_plurals(n, word, expected):
    assert gpt.plural(n, word) == expected


def test_one_step_is_said_as_one_step(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=1'])
    out = capsys.readouterr().out
    assert 'training: 1 step to step 1 (max_iters)' in out and '1 steps' not in out
