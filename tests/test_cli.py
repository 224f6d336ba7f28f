""" the scripts run as a user runs them: python gpt.py, python bigram.py, and their settings """
import os
import re
import subprocess
import sys

import gpt
from conftest import ROOT, TINY, run_script

STEP_LINE = re.compile(r'^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$', re.M)


def test_importing_gpt_prints_nothing_and_touches_nothing(tmp_path):
    p = subprocess.run([sys.executable, '-c', 'import gpt, bigram'], cwd=tmp_path, capture_output=True, text=True,
                       env={'PYTHONPATH': ROOT, 'PATH': ''})
    assert p.returncode == 0 and p.stdout == '' and p.stderr == ''
    assert list(tmp_path.iterdir()) == []


def test_gpt_trains_prints_the_lectures_step_lines_and_a_sample(workdir):
    p = run_script(workdir, *TINY, '--prompt=ROMEO:')
    assert p.returncode == 0, p.stderr
    steps = [int(s) for s, _, _ in STEP_LINE.findall(p.stdout)]
    assert steps == [0, 10, 20]
    assert 'parameters:' in p.stdout and 'tokens per step' in p.stdout and 'device: cpu' in p.stdout
    sample = p.stdout.split('ROMEO:', 1)[1]
    assert len(sample.strip()) > 10


def test_max_iters_0_without_a_checkpoint_samples_the_untrained_model(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--max_iters=0', '--prompt=ROMEO:'])
    out = capsys.readouterr().out
    assert not STEP_LINE.findall(out) and len(out.split('ROMEO:', 1)[1].strip()) > 10
    assert not (workdir / 'out' / 'ckpt.pt').exists()


def test_bigram_loss_falls_like_the_lectures(workdir):
    p = run_script(workdir, '--device=cpu', '--max_iters=1500', '--eval_interval=500', '--eval_iters=20',
                   '--max_new_tokens=50', script='bigram.py')
    assert p.returncode == 0, p.stderr
    vals = [float(v) for _, _, v in STEP_LINE.findall(p.stdout)]
    assert 4.0 < vals[0] < 5.0 and vals[-1] < 2.8


def test_bigram_says_what_model_it_is(workdir):
    p = run_script(workdir, '--device=cpu', '--max_iters=10', '--eval_iters=2', '--max_new_tokens=5', script='bigram.py')
    assert p.returncode == 0, p.stderr
    assert 'model: BigramLanguageModel, block_size 8' in p.stdout and 'layers' not in p.stdout


def test_bigram_names_itself_and_the_kept_runs_and_refuses_what_it_has_not(workdir):
    args = ['--device=cpu', '--max_iters=10', '--eval_iters=2', '--max_new_tokens=5', '--out_dir=b']
    assert 'BigramLanguageModel has no n_layer' in one_line_error(run_script(workdir, *args, '--n_layer=4',
                                                                             script='bigram.py'))
    assert run_script(workdir, *args, script='bigram.py').returncode == 0
    assert run_script(workdir, *args, script='bigram.py').returncode == 0  # the first run is kept in previous/
    os.remove(workdir / 'b' / 'ckpt.pt')
    line = one_line_error(run_script(workdir, '--device=cpu', '--init_from=resume', '--out_dir=b', script='bigram.py'))
    assert 'python bigram.py' in line and os.path.join('b', 'previous') in line


def test_same_seed_same_losses(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    runs = []
    for out_dir, seed in (('a', 1337), ('b', 1337), ('c', 7)):
        gpt.main([*TINY, f'--out_dir={out_dir}', f'--seed={seed}'])
        runs.append(STEP_LINE.findall(capsys.readouterr().out))
    assert runs[0] == runs[1] != []
    assert runs[2] != runs[0]


def test_help_lists_every_constant_with_default_and_comment(workdir):
    p = run_script(workdir, '--help')
    assert p.returncode == 0
    assert re.search(r"--n_embd=\d+ +width of the embedding", p.stdout)
    assert f"--learning_rate={gpt.learning_rate!r} " in p.stdout and "--device='auto'" in p.stdout
    b = run_script(workdir, '--help', script='bigram.py')
    assert "--learning_rate=0.01" in b.stdout and "--block_size=8" in b.stdout


def one_line_error(p):
    """ the script failed with a single line on stderr, and no traceback """
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0
    assert len(lines) == 1 and lines[0].startswith('error: '), p.stderr
    return lines[0]


def test_unknown_setting_names_the_closest(workdir):
    line = one_line_error(run_script(workdir, '--max_iter=5'))
    assert 'max_iters' in line


def test_wrong_type_is_refused(workdir):
    line = one_line_error(run_script(workdir, '--max_iters=lots'))
    assert 'int' in line and 'max_iters' in line
    line = one_line_error(run_script(workdir, '--qkv_bias=1'))
    assert 'qkv_bias must be True or False, not 1' in line


def test_values_are_literals_never_code(workdir):
    line = one_line_error(run_script(workdir, "--max_iters=__import__('os').getpid()"))
    assert 'max_iters' in line


def test_overrides_reach_the_run(workdir):
    p = run_script(workdir, *TINY, '--max_iters=10', '--eval_interval=5', '--temperature=1')
    assert p.returncode == 0, p.stderr
    assert [int(s) for s, _, _ in STEP_LINE.findall(p.stdout)] == [0, 5, 10]
