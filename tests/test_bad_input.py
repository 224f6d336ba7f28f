""" every bad input ends in one line that says what to do, before training, with no checkpoint changed """
import os
import shutil

import pytest
import torch

import gpt
from conftest import ROOT, TINY, run_script
from test_cli import one_line_error


@pytest.mark.parametrize('args, expected', [
    (['--input_file=nothere.txt'], 'nothere.txt'),
    (['--n_embd=30', '--n_head=4'], 'divisible'),
    (['--n_layer=0'], 'n_layer must be positive'),
    (['--batch_size=-2'], 'batch_size must be positive'),
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


@pytest.mark.parametrize('content, expected', [(b'', 'empty'), (b'caf\xe9 au lait\n' * 50, 'not UTF-8')])
def test_bad_text_files(workdir, content, expected):
    (workdir / 'bad.txt').write_bytes(content)
    assert expected in one_line_error(run_script(workdir, *TINY, '--input_file=bad.txt'))


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


def snapshot(folder):
    return {name: (folder / 'out' / name).read_bytes() for name in ('ckpt.pt', 'best.pt')}


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


def test_a_checkpoint_of_another_model(trained):
    line = one_line_error(run_script(trained, '--device=cpu', '--out_dir=out', '--init_from=resume',
                                     '--max_iters=0', script='bigram.py'))
    assert 'GPTLanguageModel' in line and 'BigramLanguageModel' in line


def test_a_prompt_the_checkpoint_never_saw(trained):
    line = one_line_error(run_script(trained, '--device=cpu', '--init_from=resume', '--max_iters=0',
                                     '--prompt=€uro'))
    assert "'€'" in line


def test_a_loss_that_becomes_nan_stops_and_keeps_the_last_good_checkpoint(trained):
    before = snapshot(trained)
    line = one_line_error(run_script(trained, *TINY, '--init_from=resume', '--max_iters=40',
                                     '--learning_rate=1e30', '--min_lr=1e30', '--grad_clip=0.0', '--warmup_iters=0'))
    assert 'at step 22;' in line and 'learning_rate' in line
    assert snapshot(trained) == before


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
    run = gpt.SimpleNamespace(step=1, best_val_loss=2.0, elapsed=1.0, raw_model=model, optimizer=optimizer, text={}, world=1,
                              tokenizer=gpt.CharTokenizer('abc'), max_iters=20, lr_decay_iters=20, planned=True)
    with pytest.raises(SystemExit, match='previous checkpoint is intact'):
        gpt.save_checkpoint(path, run, cfg)
    assert open(path, 'rb').read() == before
    assert torch.load(path, weights_only=True)['step'] == 20
