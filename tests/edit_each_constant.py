"""
Edits each constant at the top of gpt.py as a learner would (a copy of the file with the line changed),
runs the copy as a script on a tiny model, and prints what the edit did: the value the run saved, and
the lines of its output that differ from an unedited run's. Not a test (it takes a few minutes):

    python tests/edit_each_constant.py            # a markdown table, one row per constant
    python tests/edit_each_constant.py seed top_k # the rows of these constants only
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gpt  # noqa: E402

# a tiny run, edited in the file too, so that no command-line setting masks the edit under test
TINY = dict(n_layer='1', n_head='2', n_embd='16', block_size='16', batch_size='4', max_iters='20',
            eval_interval='10', eval_iters='2', log_interval='10', warmup_iters='2', max_new_tokens='30',
            device="'cpu'", plot='False')
# the edit tried for each constant (a value other than the tiny run's)
EDITS = dict(
    batch_size='8', block_size='32', max_iters='30', eval_interval='5', learning_rate='3e-4', device="'mps'",
    eval_iters='4', n_embd='24', n_head='4', n_layer='2', dropout='0.1', seed='7', input_file="'other.txt'",
    data_url="'https://example.invalid/x.txt'", data_sha256="'0' * 64", activation="'relu'",
    position_embedding="'sinusoidal'", qkv_bias='True', fused_attention='False', max_time='0', log_interval='5',
    min_lr_frac='1.0', warmup_iters='30', weight_decay='0.0', beta1='0.8', beta2='0.99', grad_clip='0.0',
    optim="'adamw'", muon_lr_scale='1.0', muon_momentum='0.95', gradient_accumulation_steps='2',
    prompt="'ROMEO:'", plot_attention='True', num_samples='2', max_new_tokens='10', temperature='0.0', top_k='5',
    preview_chars='0', out_dir="'elsewhere'", init_from="'resume'", plot='True', torch_compile='True',
    embedding_lr_scale='1.0',
)


def edited(folder, lines):
    source = open(os.path.join(ROOT, 'gpt.py'), encoding='utf-8').read()
    for name, value in lines.items():
        source = re.sub(rf'^{name} = \((.*?)\)$', f'{name} = 0', source, count=1, flags=re.M | re.S)  # one line
        source, n = re.subn(rf'^{name} = .*?(  # .*)?$', lambda m: f"{name} = {value}{m.group(1) or ''}", source,
                            count=1, flags=re.M)
        assert n == 1, name
    path = os.path.join(folder, 'gpt.py')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(source)
    return path


def run(folder, lines):
    p = subprocess.run([sys.executable, edited(folder, lines)], cwd=folder, capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    out = [re.sub(r'\d+ ms/step.*|\(\d+m\d+s\)|tok/s.*|0m\d\ds', '', line) for line in p.stdout.splitlines()]
    saved = {}
    for d in ('out', 'elsewhere'):
        ckpt = os.path.join(folder, d, 'ckpt.pt')
        if os.path.exists(ckpt):
            saved = torch.load(ckpt, weights_only=True)['config']
    return p.returncode, out, p.stderr.strip().splitlines()[-1:] if p.returncode else [], saved


def main():
    folder = tempfile.mkdtemp()
    text = open(os.path.join(ROOT, 'input.txt'), encoding='utf-8').read(20000)
    for name in ('input.txt', 'other.txt'):
        with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
            f.write(text if name == 'input.txt' else text[:5000])
    _, base, _, _ = run(folder, TINY)
    print('| constant | edited to | exit | saved value | what changed in the output (first lines) |')
    print('| --- | --- | --- | --- | --- |')
    for name in sys.argv[1:] or gpt.read_constants():  # or the constants named
        value = EDITS.get(name)
        if value is None:
            print(f'| {name} | (no edit tried) | | | |')
            continue
        for d in ('out', 'elsewhere'):
            shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
        if name == 'init_from':
            run(folder, {**TINY, 'max_iters': '10'})  # a checkpoint at step 10 to resume, on to step 20
        code, out, err, saved = run(folder, {**TINY, name: value})
        new = [line for line in out if line not in base][:3]
        shown = ' / '.join(line.strip()[:110] for line in err + new).replace('|', '\\|')
        print(f"| {name} | `{value}` | {code} | {saved.get(name, '')!r} | {shown} |", flush=True)


if __name__ == '__main__':
    main()
