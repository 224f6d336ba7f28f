""" Muon: the optimizer of the CPU run's weight matrices, its float32 Newton-Schulz equal to torch.optim.Muon's """
import pytest
import torch

import gpt
from conftest import TINY


@pytest.mark.parametrize('shape', [(48, 16), (16, 48)])  # tall and wide
def test_a_muon_step_equals_torch_optim_muons_up_to_bf16_rounding(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_ours = gpt.Muon([ours], lr=0.02, momentum=0.9)
    opt_theirs = torch.optim.Muon([theirs], lr=0.02, momentum=0.9, weight_decay=0.0, adjust_lr_fn='match_rms_adamw')
    for _ in range(2):  # two steps: the momentum buffer counts too
        grad = torch.randn(shape)
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            p.grad = grad.clone()
            opt.step()
    d_ours, d_theirs = ours.detach() - w0, theirs.detach() - w0
    assert (d_ours - d_theirs).norm() / d_theirs.norm() < 2e-2  # bf16 keeps 8 bits of mantissa
    assert d_theirs.norm() > 0.05  # and the step did move the weights


def test_newton_schulz_in_bf16_orthogonalizes_as_in_fp32_to_bf16s_precision():
    G = torch.randn(4, 32, 96)
    fp32, bf16 = gpt.newton_schulz(G), gpt.newton_schulz(G, dtype=torch.bfloat16)
    s = torch.linalg.svdvals(bf16.float())
    assert bf16.dtype == torch.bfloat16 and s.min() > 0.6 and s.max() < 1.3
    assert (bf16.float() - fp32).norm() / fp32.norm() < 5e-2  # bf16 keeps 8 bits of mantissa


def test_a_run_in_bf16_orthogonalizes_in_bf16_and_one_in_fp32_in_fp32():
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1))
    for precision, dtype in (('bf16', torch.bfloat16), ('fp32', torch.float32)):
        cfg, _ = gpt.get_config(['--optim=muon', f'--precision={precision}'])
        assert gpt.configure_optimizer(model, cfg, torch.device('cpu')).muon.dtype == dtype


def test_newton_schulz_orthogonalizes_a_batch_as_each_matrix_alone():
    G = torch.randn(5, 32, 96)
    s = torch.linalg.svdvals(gpt.newton_schulz(G))
    assert s.min() > 0.6 and s.max() < 1.3  # every singular value moved near 1
    one_by_one = torch.stack([gpt.newton_schulz(g) for g in G])
    torch.testing.assert_close(gpt.newton_schulz(G), one_by_one, rtol=1e-4, atol=1e-5)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg, _ = gpt.get_config(['--optim=muon'])
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=2))
    opt = gpt.configure_optimizer(model, cfg, torch.device('cpu'))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g['params']}
    assert muon == {n for n, p in model.named_parameters() if n.startswith('blocks.') and p.dim() == 2}
    assert len(muon) == 2 * (3 * 2 + 1 + 2)  # per layer: q, k, v of 2 heads, proj, the feed-forward's two
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g['params']}
    assert adamw == set(names.values()) - muon and 'lm_head.weight' in adamw
    plain = gpt.configure_optimizer(model, gpt.get_config(['--optim=adamw'])[0], torch.device('cpu'))
    assert isinstance(plain, torch.optim.AdamW)


def test_one_schedule_drives_both_with_muons_scale():
    cfg, _ = gpt.get_config(['--optim=muon', '--muon_lr_scale=2.0'])
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1))
    opt = gpt.configure_optimizer(model, cfg, torch.device('cpu'))
    gpt.set_lr(opt, 1e-3)
    assert {g['lr'] for g in opt.muon.param_groups} == {2e-3}
    tables = {id(model.token_embedding_table.weight), id(model.position_embedding_table.weight)}
    lrs = {id(p): g['lr'] for g in opt.adamw.param_groups for p in g['params']}
    assert {lr for i, lr in lrs.items() if i in tables} == {1e-3 * cfg.embedding_lr_scale}  # 3e-3 on a CPU
    assert {lr for i, lr in lrs.items() if i not in tables} == {1e-3}


def test_one_rate_for_every_weight_when_the_tables_scale_is_1():
    cfg, _ = gpt.get_config(['--optim=adamw', '--embedding_lr_scale=1.0'])
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1))
    opt = gpt.configure_optimizer(model, cfg, torch.device('cpu'))
    gpt.set_lr(opt, 1e-3)
    assert len(opt.param_groups) == 2 and {g['lr'] for g in opt.param_groups} == {1e-3}  # as before the scale


def test_a_muon_run_saves_its_state_and_a_resume_keeps_the_optimizer(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    gpt.main([*TINY, '--optim=muon'])
    ckpt = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['optimizer'].keys() == {'muon', 'adamw'} and ckpt['optimizer']['muon']['state']
    assert ckpt['config']['optim'] == 'muon'
    with pytest.raises(SystemExit, match='optimizer'):
        gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30', '--optim=adamw'])
    gpt.main(['--device=cpu', '--init_from=resume', '--max_iters=30'])


def test_the_schedule_reaches_an_optimizer_loaded_from_a_checkpoint():
    cfg, _ = gpt.get_config(['--optim=muon'])
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1))
    opt = gpt.configure_optimizer(model, cfg, torch.device('cpu'))
    opt.load_state_dict(opt.state_dict())  # as a resumed run does: each optimizer gets new param_groups
    gpt.set_lr(opt, 5e-3)
    assert [g['lr'] for g in opt.muon.param_groups + opt.adamw.param_groups] == [
        5e-3 * cfg.muon_lr_scale, 5e-3, 5e-3, 5e-3 * cfg.embedding_lr_scale]
