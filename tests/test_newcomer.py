""" what a newcomer hits: constants edited with the wrong type, a model sampled after the file is put back, a
folder that is only read, a vocabulary that differs, another script's checkpoint, and the small ones """
import os
import subprocess
import sys

import pytest
import torch

import gpt
from conftest import ROOT, TINY, error_of, load, run_script
from test_cli import one_line_error
from test_edits import SMALL, edited_copy, run


@pytest.mark.parametrize('line, words', [
    (dict(top_k='None'), 'top_k must be an int >= 0, not None'),
    (dict(dropout="'0.1'"), "dropout must be a number at least 0 and below 1, not '0.1'"),
    (dict(batch_size="'8'"), "batch_size must be a positive int, not '8'"),
    (dict(max_time="'20'"), "max_time must be a number >= 0, not '20'"),
    (dict(temperature="'hot'"), "temperature must be a number >= 0, not 'hot'"),
    (dict(n_layer='1.5'), 'n_layer must be a positive int, not 1.5'),
    (dict(plot="'no'"), "plot must be True or False, not 'no'"),
])
def test_a_constant_edited_with_the_wrong_type_is_one_line_that_names_its_line(tmp_path, line, words):
    p = subprocess.run([sys.executable, str(edited_copy(tmp_path, **line)), '--max_iters=0'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    [name] = line
    assert words in one_line_error(p) and f'change the line {name} = ... at the top of the file' in p.stderr
    assert not (tmp_path / 'out').exists()  # refused before the data is read


def test_the_command_line_refuses_the_same_values_in_one_line(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert 'top_k must be an int >= 0, not None: change --top_k' in error_of([*TINY, '--top_k=None'])
    assert "plot must be True or False, not 'no': change --plot" in error_of([*TINY, '--plot=no'])
    assert 'n_layer must be a positive int, not 1.5' in error_of([*TINY, '--n_layer=1.5'])


def test_a_model_trained_from_an_edited_file_samples_and_trains_on_once_the_file_is_put_back(workdir):
    (workdir / 'mine').mkdir()
    mine = workdir / 'mine'
    (mine / 'input.txt').write_text((workdir / 'input.txt').read_text())
    run(edited_copy(mine, n_layer=1, n_embd=32, n_head=2, max_iters=20), mine, '--device=cpu', '--max_time=60',
        '--eval_iters=2', '--max_new_tokens=5')
    put_back = edited_copy(mine)  # the file as it came
    out = run(put_back, mine, '--device=cpu', '--init_from=resume', '--max_iters=0', '--prompt=ROMEO:')
    assert 'model: GPTLanguageModel, 1 layer, 2 heads, n_embd 32' in out and 'ROMEO:' in out
    out = run(put_back, mine, '--device=cpu', '--init_from=resume', '--max_iters=30', '--n_layer=1', '--n_embd=32',
              '--n_head=2')
    assert 'as many as fit in 60 s (max_time, ' in out  # the run keeps its time budget, some of it spent
    assert load(mine / 'out' / 'ckpt.pt')['step'] == 30


def test_sampling_reads_the_checkpoint_and_writes_nothing(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main(TINY)
    before = {p: p.stat().st_mtime_ns for p in (workdir / 'out').iterdir()}
    monkeypatch.setattr(gpt, 'check_out_dir', lambda out_dir: pytest.fail('sampling checked out_dir for writing'))
    monkeypatch.setattr(gpt, 'written_atomically', lambda path: pytest.fail('sampling wrote a file'))
    capsys.readouterr()
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=0', '--prompt=ROMEO:', '--max_new_tokens=10'])
    assert 'ROMEO:' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (workdir / 'out').iterdir()} == before


def test_a_vocabulary_that_differs_lists_all_it_must_and_says_how_many_more(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'wide.txt').write_text(''.join(map(chr, range(0x4e00, 0x4e00 + 60))) * 40, encoding='utf-8')
    gpt.main([*TINY, '--input_file=wide.txt'])
    (workdir / 'narrow.txt').write_text(''.join(map(chr, range(0x4e00, 0x4e00 + 10))) * 400, encoding='utf-8')
    line = error_of(['--device=cpu', '--init_from=resume', '--max_iters=30', '--input_file=narrow.txt'])
    assert 'gone: ' in line and 'and 10 more' in line and 'new: ' not in line  # a subset: nothing new


def test_a_lecture_steps_checkpoint_opened_with_gpt_py_names_its_step(workdir):
    p = run_script(workdir, '--step=2', '--device=cpu', '--max_iters=2', '--eval_iters=1', '--max_new_tokens=2',
                   script='lecture_steps.py')
    assert p.returncode == 0, p.stderr
    line = one_line_error(run_script(workdir, '--device=cpu', '--init_from=resume', '--out_dir=out-step2'))
    assert 'holds a MultiHeadModel' in line and 'python lecture_steps.py --step=2 --out_dir=out-step2' in line


def test_an_out_dir_that_is_a_file_says_so(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / 'notes').write_text('mine')
    assert "out_dir 'notes' is a file, not a folder" in error_of([*TINY, '--out_dir=notes'])


def test_main_given_a_string_says_it_takes_a_list(workdir):
    assert "main takes a list of settings, e.g. main(['--max_iters=200'])" in error_of('--max_iters=5')


def test_ctrl_c_while_torch_loads_quits_quietly(tmp_path):
    code = f"""if 1:
        import runpy, sys
        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == 'torch':
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, CtrlC())
        runpy.run_path({os.path.join(ROOT, 'gpt.py')!r}, run_name='__main__')"""
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and p.stderr == '' and p.stdout == ''


def test_one_character_is_one_character(capsys):
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=1, block_size=4, n_embd=4, n_head=1, n_layer=1))
    gpt.describe(model, gpt.CharTokenizer('a'), torch.device('cpu'), gpt.get_config([])[0])
    assert 'vocabulary: 1 character;' in capsys.readouterr().out


def test_a_renamed_setting_is_taken_by_its_old_name_with_a_pointer_to_the_new(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--optimizer=adamw', '--max_iters=2'])
    out = capsys.readouterr().out
    assert 'note: --optimizer is now --optim: taken as --optim=adamw' in out and 'optimizer: AdamW (lr' in out
    assert load(workdir / 'out' / 'ckpt.pt')['config']['optim'] == 'adamw'
