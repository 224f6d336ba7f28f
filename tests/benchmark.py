"""
Training and sampling speed of gpt.py's model against the lecture's own model of the same size.

    python tests/benchmark.py                                    # the lecture's sizes (slow on a CPU)
    python tests/benchmark.py --n_layer=2 --n_embd=128 --n_head=4 --block_size=128 --batch_size=24 \
        --dropout=0 --activation=gelu                            # the CPU run's sizes

Both models are built here with the same sizes and timed in one process, alternating A B A B, so
a machine that drifts in speed affects both alike. Training: forward, backward and AdamW step on
random batches (each model trained as its own file trains it). Sampling: characters per second
from one sequence. Then the model FLOP/s of a training step as a share of what a large fp32
matmul reaches on this machine in the same run. Last, gpt.py's model trained with AdamW and with
Muon side by side: the time of a whole step and the optimizer's share of it. Run by hand; pytest does not collect it (its name does not start with test_).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402


# ---- the lecture's model, as its gpt.py writes it (its globals made arguments) ----

class LectureHead(nn.Module):
    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)
        return wei @ v


class LectureMultiHeadAttention(nn.Module):
    def __init__(self, n_embd, num_heads, head_size, block_size, dropout):
        super().__init__()
        self.heads = nn.ModuleList([LectureHead(n_embd, head_size, block_size, dropout) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class LectureFeedFoward(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class LectureBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.sa = LectureMultiHeadAttention(n_embd, n_head, n_embd // n_head, block_size, dropout)
        self.ffwd = LectureFeedFoward(n_embd, dropout)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class LectureGPT(nn.Module):
    def __init__(self, vocab_size, n_embd, n_head, n_layer, block_size, dropout):
        super().__init__()
        self.block_size = block_size
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[LectureBlock(n_embd, n_head, block_size, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T, device=idx.device))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    def generate(self, idx, max_new_tokens):  # as the lecture samples: autograd on, the model's mode as it is
        for _ in range(max_new_tokens):
            logits, loss = self(idx[:, -self.block_size:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


# ---- timing ----

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def matmul_flops(device, n=2048, reps=10):
    """ the FLOP/s of a large fp32 matmul, the most a model's matmuls can hope for on this device """
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    for name, default in dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, vocab_size=65,
                              rounds=3, steps=2, sample_chars=200).items():
        p.add_argument(f'--{name}', type=int, default=default)
    p.add_argument('--dropout', type=float, default=0.2)
    p.add_argument('--activation', default='relu')
    p.add_argument('--device', default='auto')
    a = p.parse_args()
    device = gpt.pick_device(a.device)
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=a.vocab_size, block_size=a.block_size, n_embd=a.n_embd, n_head=a.n_head,
                           n_layer=a.n_layer, dropout=a.dropout, activation=a.activation)
    ours = gpt.GPTLanguageModel(config).to(device)
    cfg, _ = gpt.get_config(['--weight_decay=0.1', '--optim=adamw'])  # as the lecture's model trains
    ours_opt = gpt.configure_optimizer(ours, cfg, device)
    lecture = LectureGPT(a.vocab_size, a.n_embd, a.n_head, a.n_layer, a.block_size, a.dropout).to(device)
    lecture_opt = torch.optim.AdamW(lecture.parameters(), lr=3e-4)
    ctx, scaler = gpt.autocast(device, cfg, ours)  # gpt.py's precision: bf16, fp16 with its GradScaler, or fp32

    def train_ours(x, y):
        with ctx:
            _, loss = ours(x, y)
        ours_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(ours_opt)
        torch.nn.utils.clip_grad_norm_(ours.parameters(), cfg.grad_clip)
        scaler.step(ours_opt)
        scaler.update()

    def train_lecture(x, y):
        _, loss = lecture(x, y)
        lecture_opt.zero_grad(set_to_none=True)
        loss.backward()
        lecture_opt.step()

    x = torch.randint(a.vocab_size, (a.batch_size, a.block_size), device=device)
    y = torch.randint(a.vocab_size, (a.batch_size, a.block_size), device=device)
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    samplers = dict(ours=lambda: ours.generate(start, a.sample_chars), lecture=lambda: lecture.generate(start, a.sample_chars))
    trainers = dict(ours=train_ours, lecture=train_lecture)
    for f in trainers.values():  # warm up: first calls allocate and pick kernels
        f(x, y)
    tok_s = {k: [] for k in trainers}
    chr_s = {k: [] for k in trainers}
    print(f"device {device}, {torch.get_num_threads()} threads; n_layer {a.n_layer}, n_head {a.n_head}, "
          f"n_embd {a.n_embd}, block_size {a.block_size}, batch_size {a.batch_size}, dropout {a.dropout}")
    for r in range(a.rounds):
        for name in trainers:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainers[name](x, y)
            sync(device)
            tok_s[name].append(a.steps * a.batch_size * a.block_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            samplers[name]()
            sync(device)
            chr_s[name].append(a.sample_chars / (time.perf_counter() - t0))
        print(f"round {r + 1}: train tok/s ours {tok_s['ours'][-1]:,.0f}, lecture {tok_s['lecture'][-1]:,.0f}; "
              f"sample chars/s ours {chr_s['ours'][-1]:,.0f}, lecture {chr_s['lecture'][-1]:,.0f}", flush=True)
    med = lambda v: sorted(v)[len(v) // 2]
    ratios = sorted(o / l for o, l in zip(tok_s['ours'], tok_s['lecture']))
    print(f"training: ours {med(tok_s['ours']):,.0f} tok/s, lecture {med(tok_s['lecture']):,.0f} tok/s, "
          f"ratio {med(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")
    # model FLOPs of a training step (forward + backward: 6 per weight per token, plus attention's
    # q @ k and wei @ v) against what this machine's matmul does in the same run: how close to the limit
    weights = sum(p.numel() for n, p in ours.named_parameters() if 'embedding' not in n)
    flops_per_token = 6 * weights + 12 * a.n_layer * a.n_embd * a.block_size
    peak = matmul_flops(device)
    for name in trainers:
        achieved = med(tok_s[name]) * flops_per_token
        print(f"{name}: {achieved / 1e9:.1f} GFLOP/s of model FLOPs, {100 * achieved / peak:.0f}% of this machine's "
              f"fp32 matmul ({peak / 1e9:.0f} GFLOP/s, 2048x2048)")
    sratios = sorted(o / l for o, l in zip(chr_s['ours'], chr_s['lecture']))
    print(f"sampling: ours {med(chr_s['ours']):,.0f} chars/s, lecture {med(chr_s['lecture']):,.0f} chars/s, "
          f"ratio {med(sratios):.2f}x")
    optimizer_share(a, config, device, ctx, x, y, med)


def optimizer_share(a, config, device, ctx, x, y, med):
    """ a step of gpt.py's model with AdamW and with Muon, alternating, and the optimizer's share of each """
    models, optimizers = {}, {}
    for name in ('adamw', 'muon'):
        torch.manual_seed(0)
        models[name] = gpt.GPTLanguageModel(config).to(device)
        optimizers[name] = gpt.configure_optimizer(models[name], gpt.get_config([f'--optim={name}'])[0], device)
    step_s, opt_s = {k: [] for k in models}, {k: [] for k in models}
    for r in range(a.rounds + 1):  # the first round warms up
        for name, model in models.items():
            total = in_optimizer = 0.0
            for _ in range(a.steps):
                sync(device)
                t0 = time.perf_counter()
                with ctx:
                    _, loss = model(x, y)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                sync(device)
                t1 = time.perf_counter()
                optimizers[name].step()
                sync(device)
                total, in_optimizer = total + time.perf_counter() - t0, in_optimizer + time.perf_counter() - t1
            if r:
                step_s[name].append(total / a.steps)
                opt_s[name].append(in_optimizer / a.steps)
    for name in models:
        print(f"{name}: {med(step_s[name]) * 1000:.1f} ms a step, {med(opt_s[name]) * 1000:.1f} ms of it in the "
              f"optimizer ({100 * med(opt_s[name]) / med(step_s[name]):.0f}%)")
    ratios = sorted(m / w for m, w in zip(step_s['muon'], step_s['adamw']))
    print(f"a Muon step takes {med(ratios):.2f}x an AdamW step (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")


if __name__ == '__main__':
    main()
