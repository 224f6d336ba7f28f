""" messages that read right: each names what happened and the command that helps """
import os
import signal
import subprocess
import sys

import pytest

import gpt
from conftest import ROOT, TINY, run_script


def error_line(argv, **kwargs):
    """ gpt.main stopped with one line: that line """
    with pytest.raises(SystemExit) as e:
        gpt.main(argv, **kwargs)
    assert str(e.value.code).startswith('error: ') and '\n' not in str(e.value.code)
    return str(e.value.code)


def test_a_resume_with_another_optimizer_says_the_run_keeps_its_optimizer(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--optimizer=muon'])
    line = error_line(['--device=cpu', '--init_from=resume', '--max_iters=30', '--optimizer=adamw'])
    assert "keeps its optimizer" in line and "optimizer='muon'" in line and 'shape' not in line


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
    line = error_line([*TINY, '--input_file=u16.txt'])
    assert 'UTF-16' in line and 'iconv' in line and 'chunk' not in line


def test_a_text_that_is_not_utf8_names_the_byte(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'latin1.txt').write_bytes(b'caf\xe9 au lait\n' * 50)
    line = error_line([*TINY, '--input_file=latin1.txt'])
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
        line = error_line(['--device=cpu', '--init_from=resume'])
        assert 'a run is training in out' in line and f'pid {proc.pid}' in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_prompt_shows_its_characters_as_typed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    line = error_line([*TINY, '--prompt=\\^_', '--max_iters=0'])
    assert "'\\^_'" in line and '\\\\' not in line


@pytest.mark.parametrize('n, word, expected', [(1, 'step', '1 step'), (2, 'layer', '2 layers'),
                                               (0, 'head', '0 heads')])
def test_plurals(n, word, expected):
    assert gpt.plural(n, word) == expected


def test_one_step_is_said_as_one_step(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=1'])
    out = capsys.readouterr().out
    assert 'training: 1 step to step 1,' in out and '1 steps' not in out
