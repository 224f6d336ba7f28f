""" the precision of a run: bf16 where the GPU has it in hardware, fp16 with a GradScaler on older GPUs; on a
CPU, bf16 where it has bf16 in hardware and the model is wide, else fp32; fp32 on MPS; the scaler's skipped steps,
its state in the checkpoint, and an exact resume in each precision """
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

import gpt
from conftest import ROOT, TINY
from test_cli import STEP_LINE

GPUS = [((9, 0), 'NVIDIA H200', 'bf16', 'device: cuda (NVIDIA H200), bf16 autocast'),
        ((8, 0), 'NVIDIA A100-SXM4-40GB', 'bf16', 'device: cuda (NVIDIA A100-SXM4-40GB), bf16 autocast'),
        ((7, 5), 'Tesla T4', 'fp16', 'device: cuda (Tesla T4), fp16 autocast + GradScaler'),
        ((7, 0), 'Tesla V100', 'fp16', 'device: cuda (Tesla V100), fp16 autocast + GradScaler')]


def a_gpu(monkeypatch, capability, name):
    """ torch.cuda answering as a GPU of this compute capability and name would; is_bf16_supported says True
    whatever the capability, as PyTorch 2.3 and later do on a T4, where bf16 is emulated """
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)


@pytest.fixture
def tf32_restored():
    """ gpt.autocast turns TF32 on for CUDA: off before the test, as they were after it. Restored by hand,
    not by monkeypatch: torch computes these attributes, and a monkeypatch that undoes a patch of an
    attribute missing from the object's __dict__ deletes it (pytest 9.1 and later) """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def a_model(n_embd=4):
    return gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=3, block_size=4, n_embd=n_embd, n_head=1, n_layer=1))


def device_line(device, capsys, model=None, argv=()):
    gpt.describe(model or a_model(), gpt.CharTokenizer('abc'), device, gpt.get_config(list(argv))[0])
    return capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize('capability, name, kind, line', GPUS)
def test_bf16_needs_compute_capability_8_older_gpus_take_fp16(monkeypatch, capsys, tf32_restored, capability,
                                                              name, kind, line):
    a_gpu(monkeypatch, capability, name)
    cuda, cfg, model = torch.device('cuda'), gpt.get_config([])[0], a_model()
    assert gpt.pick_precision(cuda, cfg, model)[0] == kind
    assert device_line(cuda, capsys).startswith(line + ' (the GPU ')
    monkeypatch.setattr(torch, 'autocast', lambda device_type, dtype: (device_type, dtype))
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, enabled: (device, enabled))
    ctx, scaler = gpt.autocast(cuda, cfg, model)
    assert ctx == ('cuda', dict(bf16=torch.bfloat16, fp16=torch.float16)[kind])
    assert scaler == ('cuda', kind == 'fp16')  # a GradScaler in fp16 only
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_a_precision_the_device_cannot_run_is_refused_in_one_line(monkeypatch, tf32_restored):
    a_gpu(monkeypatch, (7, 5), 'Tesla T4')
    cfg = gpt.get_config(['--precision=bf16'])[0]
    with pytest.raises(SystemExit, match='Tesla T4 has no bf16 in hardware: use --precision=fp16'):
        gpt.pick_precision(torch.device('cuda'), cfg, a_model())
    with pytest.raises(SystemExit, match="precision 'bf16' is not run on Apple MPS"):
        gpt.pick_precision(torch.device('mps'), cfg, a_model())


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\n"


@pytest.mark.parametrize('flags, n_embd, kind', [
    ('avx512f', 384, 'fp32'),  # no bf16 in hardware: fp32 whatever the model (a Zen 3, an older Xeon)
    ('avx512f avx512_bf16', 384, 'bf16'),  # a Zen 4 or 5: bf16 for a wide model
    ('amx_bf16 amx_tile', 384, 'bf16'),  # a Xeon with AMX
    ('avx512f avx512_bf16', 96, 'fp32'),  # the CPU default's 96 wide: fp32 is faster
])
def test_auto_takes_bf16_on_a_cpu_only_where_it_has_bf16_and_the_model_is_wide(tmp_path, monkeypatch, capsys,
                                                                              flags, n_embd, kind):
    (tmp_path / 'cpuinfo').write_text(CPUINFO.format(flags))
    monkeypatch.setattr(gpt, 'CPUINFO', str(tmp_path / 'cpuinfo'))
    model, cpu = a_model(n_embd), torch.device('cpu')
    assert gpt.pick_precision(cpu, gpt.get_config([])[0], model)[0] == kind
    line = device_line(cpu, capsys, model)
    assert line.startswith(f"device: cpu, {gpt.PRECISIONS[kind]} (") and 'CPU threads' in line
    assert gpt.pick_precision(cpu, gpt.get_config(['--precision=fp32'])[0], model)[0] == 'fp32'  # asked for


def test_mps_stays_fp32(monkeypatch, capsys, tf32_restored):
    a_gpu(monkeypatch, (9, 0), 'NVIDIA H200')  # whatever GPU the machine also has
    assert device_line(torch.device('mps'), capsys) == 'device: mps, fp32 (Apple MPS)'


def test_fp32_passes_everything_through():
    ctx, scaler = gpt.autocast(torch.device('cpu'), gpt.get_config(['--precision=fp32'])[0], a_model())
    assert isinstance(ctx, gpt.nullcontext) and not scaler.is_enabled()
    loss = torch.tensor(2.5)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and scaler.state_dict() == {}


# --------------------------------------------------------------------------------------------------
# a T4's code path, fp16 autocast and a GradScaler, run on the CPU: torch.autocast('cpu', dtype=torch.float16)
# and torch.amp.GradScaler('cpu')

FP16 = """
import functools, os, signal, sys, torch, gpt
# a scale too large for the first steps and quick to grow: steps overflow and are skipped all along the run
torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24, growth_interval=4)
get_lr = gpt.get_lr
def ctrl_c_at(step, cfg, *end):
    if step == int(os.environ.get('STOP_AT', -1)):
        os.kill(os.getpid(), signal.SIGINT)
    return get_lr(step, cfg, *end)
gpt.get_lr = ctrl_c_at
gpt.main(sys.argv[1:])
"""


def run_fp16(workdir, *args, stop_at=-1):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, 'STOP_AT': str(stop_at)}
    p = subprocess.run([sys.executable, '-c', FP16, *args], cwd=workdir, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return p


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def same(a, b):
    """ two state dicts (nested dicts, lists, tensors, numbers) hold equal values """
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_an_fp16_run_saves_its_scaler_and_resumes_exactly(workdir):
    args = [*TINY, '--max_iters=30', '--eval_interval=10', '--preview_chars=0', '--plot=False',
            '--max_new_tokens=5', '--precision=fp16']
    whole = run_fp16(workdir, *args, '--out_dir=whole')
    assert 'device: cpu, fp16 autocast + GradScaler' in whole.stdout
    cut = run_fp16(workdir, *args, '--out_dir=cut', stop_at=14)
    assert 'Ctrl-C' in cut.stdout
    stopped = load(workdir / 'cut' / 'ckpt.pt')
    assert stopped['step'] == 15
    assert stopped['scaler'].keys() >= {'scale', '_growth_tracker', 'growth_interval'}
    assert stopped['scaler']['scale'] < 2.0 ** 24  # steps were skipped: the scale came down
    resumed = run_fp16(workdir, '--device=cpu', '--init_from=resume', '--out_dir=cut')
    a, b = (load(workdir / d / 'ckpt.pt') for d in ('whole', 'cut'))
    assert a['step'] == b['step'] == 30
    assert a['scaler'] == b['scaler'] and a['scaler']['scale'] < 2.0 ** 24
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    assert same(a['optimizer'], b['optimizer'])
    later = STEP_LINE.findall(resumed.stdout)
    assert later and set(later) <= set(STEP_LINE.findall(whole.stdout))


def fp16_run(monkeypatch, workdir, *args, inf_grad_at=(), nan_loss_at=()):
    """ gpt.main in fp16 on the CPU; at the steps inf_grad_at an inf is put into lm_head.bias's gradient
    during backward, as an overflow would, at nan_loss_at the training loss becomes NaN; returns, after
    each step, (the weights, the optimizer's state, the scale, the loss, the optimizer's class) """
    monkeypatch.chdir(workdir)
    step, after = [None], []
    get_lr, build_model, after_step = gpt.get_lr, gpt.build_model, gpt.after_step
    def at_step(s, cfg, *end):
        step[0] = s
        return get_lr(s, cfg, *end)
    def with_hooks(*a):
        model = build_model(*a)
        model.lm_head.bias.register_hook(lambda g: g + math.inf if step[0] in inf_grad_at else g)
        model.register_forward_hook(lambda m, i, out: (out[0], out[1] * math.nan)
                                    if m.training and step[0] in nan_loss_at else out)
        return model
    def spy(run, cfg, loss):
        saved = run.optimizer.state_dict()  # MuonWithAdamW's holds Muon's and AdamW's
        state = [d['state'] for d in (saved.values() if 'muon' in saved else [saved])]  # not the groups' lr
        after.append((copy.deepcopy(run.raw_model.state_dict()), copy.deepcopy(state), run.scaler.get_scale(),
                      loss.item(), type(run.optimizer)))
        return after_step(run, cfg, loss)
    monkeypatch.setattr(gpt, 'get_lr', at_step)
    monkeypatch.setattr(gpt, 'build_model', with_hooks)
    monkeypatch.setattr(gpt, 'after_step', spy)
    gpt.main([*TINY, '--eval_interval=100', '--preview_chars=0', '--plot=False', '--max_new_tokens=5',
              '--precision=fp16', *args])
    return after


@pytest.mark.parametrize('grad_clip', ['1.0', '0.0'])
@pytest.mark.parametrize('optimizer', ['muon', 'adamw'])
def test_a_step_whose_gradients_overflow_is_skipped_and_the_run_goes_on(monkeypatch, workdir, optimizer,
                                                                         grad_clip):
    after = fp16_run(monkeypatch, workdir, '--max_iters=8', f'--optim={optimizer}',
                     f'--grad_clip={grad_clip}', inf_grad_at={4})
    assert len(after) == 8  # every step taken, none reported as a diverged loss
    assert after[0][4] is (gpt.MuonWithAdamW if optimizer == 'muon' else torch.optim.AdamW)
    weights, state, scale, loss, _ = zip(*after)
    assert same(weights[4], weights[3]) and same(state[4], state[3])  # step 4: nothing changed
    assert all(not same(weights[i], weights[i - 1]) for i in (1, 2, 3, 5, 6, 7))  # the others trained
    assert scale[3] == 65536.0 and scale[4] == 32768.0 and scale[7] == 32768.0  # halved once, at the overflow
    assert all(map(math.isfinite, loss))


def test_a_diverged_fp16_run_is_still_reported(monkeypatch, workdir):
    with pytest.raises(SystemExit) as e:  # skipped at every step, the scale halved each time: 2**16 ... 2**-1
        fp16_run(monkeypatch, workdir, '--max_iters=30', inf_grad_at=range(100))
    assert str(e.value.code).startswith('error: the gradients overflow fp16 at any loss scale (down to 0.5) '
                                        'at step 17;')
    with pytest.raises(SystemExit) as e:
        fp16_run(monkeypatch, workdir, '--max_iters=30', nan_loss_at={5})
    assert str(e.value.code).startswith('error: the loss became nan at step 6;')


@pytest.mark.parametrize('precision', ['bf16', 'fp32'])
def test_a_run_cut_and_resumed_equals_the_whole_run_in_each_precision(workdir, precision):
    args = [*TINY, '--max_iters=30', '--eval_interval=10', '--max_new_tokens=5', '--max_time=0',
            f'--precision={precision}']
    whole = run_fp16(workdir, *args, '--out_dir=whole')
    assert f'device: cpu, {gpt.PRECISIONS[precision]} (precision=' in whole.stdout
    run_fp16(workdir, *args, '--out_dir=cut', stop_at=14)
    run_fp16(workdir, '--device=cpu', '--init_from=resume', '--out_dir=cut')
    a, b = (load(workdir / d / 'ckpt.pt') for d in ('whole', 'cut'))
    assert a['step'] == b['step'] == 30 and same(a['model'], b['model']) and same(a['optimizer'], b['optimizer'])
