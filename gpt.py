"""
A character-level GPT, trained from scratch on one text file and then sampled: the model of the
lecture "Let's build GPT: from scratch, in code, spelled out", in the lecture's order and with its
names, made fast on CPU and GPU, with checkpoints, exact resume and sampling from a prompt.

    python gpt.py                        # train on input.txt (tiny Shakespeare), then print a sample
    python gpt.py --max_iters=200        # any constant below can be set like this
    python gpt.py --help                 # every constant, its default and what it means
    python gpt.py --init_from=resume --max_iters=0 --prompt="ROMEO:"   # sample from the saved model

On a CUDA GPU it runs the lecture's model (6 layers, 6 heads, n_embd 384, block 256, 5000 steps).
On a CPU or Apple MPS it runs a smaller model that trains and samples in about 3 minutes.
"""
import ast
import csv
import difflib
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# hyperparameters
# Edit these lines to change the run, or set any of them on the command line (--max_iters=200).
# Where a line holds two values, the first is the lecture's run for a CUDA GPU and the second a
# laptop-size run for a CPU or Apple MPS, picked by whether this machine has CUDA.
cuda = torch.cuda.is_available()
# data
input_file = 'input.txt'  # the text to train on (UTF-8); its characters are the vocabulary
data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'  # fetched when input_file is the default and missing
data_sha256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'  # checksum the download must have
# model
block_size = 256 if cuda else 64  # what is the maximum context length for predictions? (CPU: more, shorter sequences learn faster)
n_embd = 384 if cuda else 96  # width of the embedding of each token
n_head = 6 if cuda else 3  # attention heads per block; n_embd must be divisible by n_head
n_layer = 6 if cuda else 2  # transformer blocks; in 3 minutes of CPU, many steps of a small model beat fewer of a big one
dropout = 0.2 if cuda else 0.0  # 0 on CPU: 3 minutes cannot overfit, and attention keeps its fused kernel
activation = 'gelu'  # feed-forward non-linearity: 'relu' (the lecture) or 'gelu' (GPT-2, a little better here)
qkv_bias = False  # bias on the query/key/value projections (the lecture: no, GPT-2: yes)
fused_attention = True  # all heads at once in one fused kernel; False runs the lecture's per-head code
# training
batch_size = 64 if cuda else 32  # how many independent sequences will we process in parallel?
max_iters = 5000  # total optimizer steps, unless max_time picks them; a resumed run continues up to this
max_time = 0 if cuda else 180  # seconds, start to sample: the run times its first steps and sets max_iters to fit (0 = off; so does --max_iters=N)
eval_interval = 500  # estimate train and val loss every this many steps
eval_iters = 200 if cuda else 40  # batches of each split averaged in one estimate (standard error < 0.01)
log_interval = 100  # print progress every this many steps
learning_rate = 1e-3 if cuda else 6e-3  # peak learning rate, reached after the warmup; a small model takes a larger one
min_lr = 1e-4 if cuda else 6e-4  # the learning rate decays to this, a tenth of the peak, at the run's last step (cosine)
warmup_iters = 100 if cuda else 50  # steps of linear warmup from 0
weight_decay = 0.1 if cuda else 0.0  # AdamW weight decay on weight matrices only; a 3-minute run needs none
beta1 = 0.9  # AdamW beta1
beta2 = 0.99 if cuda else 0.95  # AdamW beta2; below 0.999 since each step sees few tokens, and the short CPU run fewer
grad_clip = 1.0  # clip the gradient norm at this value (0 = off)
gradient_accumulation_steps = 1  # micro-batches per step: a larger batch than fits in memory
# sampling
prompt = ''  # text the sample starts from; '' starts from the vocabulary's first character, as the lecture
num_samples = 1  # how many samples to print
max_new_tokens = 500  # characters generated per sample
temperature = 1.0  # 1 samples the model's distribution, lower is more conservative, 0 is greedy
top_k = 0  # sample only from the k most likely characters (0 = all)
seed = 1337  # random seed of the run
preview_chars = 80  # at each evaluation, print this many characters sampled from a fixed seed (0 = off)
# I/O
out_dir = 'out'  # where checkpoints (ckpt.pt latest, best.pt best val), log.csv and the data cache go
init_from = 'scratch'  # 'scratch', 'resume' (continue from out_dir/ckpt.pt) or 'best' (from out_dir/best.pt)
# system
device = 'auto'  # 'auto' (CUDA, else Apple MPS, else CPU), or 'cpu', 'cuda', 'cuda:1', 'mps'
torch_compile = False  # compile the model with torch.compile: a slow start, then faster steps on a GPU
# ----------------------------------------------------------------------------------------------


# data: the character tokenizer, the text encoded once to token ids on disk, and get_batch

class CharTokenizer:
    """ the lecture's tokenizer: every distinct character of the text is one token """

    def __init__(self, chars):
        self.chars = ''.join(chars)
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = {i: ch for i, ch in enumerate(chars)}

    def encode(self, s):
        """ string -> list of integers; a character the model never saw is an error that names it """
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters the model never saw: {''.join(unknown)!r}")
        return [self.stoi[c] for c in s]

    def decode(self, l):
        """ list of integers -> string """
        return ''.join(self.itos[i] for i in l)


def read_text_chunks(path, chunk_chars=1 << 22):
    """ the file's text, a few million characters at a time, so memory stays small for huge files """
    with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not a character of the text
        while chunk := f.read(chunk_chars):
            yield chunk


def code_points(text):
    return np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)


def prepare_data(path, cache_dir):
    """
    The text's vocabulary and the whole text as token ids (uint16, or uint32 past 65,536 characters),
    encoded with numpy into a file in cache_dir once, then memory-mapped: a text larger than memory
    still trains, and later runs start at once. The cache is rebuilt when the text file changes.
    """
    if not os.path.isfile(path):
        die(f"cannot read the input file '{path}': put a UTF-8 text file there or set --input_file")
    st = os.stat(path)
    key = dict(file=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)
    meta_path, bin_path = os.path.join(cache_dir, 'data.json'), os.path.join(cache_dir, 'data.bin')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        if meta['key'] == key:
            return list(meta['chars']), np.memmap(bin_path, dtype=meta['dtype'], mode='r')
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a stale or damaged one: build it
    tmp = f'{bin_path}.{os.getpid()}.tmp'  # this process's own: two runs may prepare the same folder at once
    try:
        # first pass: which characters occur, counted by code point
        counts = np.zeros(0x110000, dtype=np.int64)
        for chunk in read_text_chunks(path):
            counts += np.bincount(code_points(chunk), minlength=0x110000)
        vocab = np.flatnonzero(counts)  # code points in sorted order, as sorted(set(text))
        if len(vocab) == 0:
            die(f"the input file '{path}' is empty: give it some text to learn from")
        dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
        lookup = np.zeros(0x110000, dtype=dtype)
        lookup[vocab] = np.arange(len(vocab))
        # second pass: each character's code point -> its token id, written straight to disk
        with open(tmp, 'wb') as f:
            for chunk in read_text_chunks(path):
                f.write(lookup[code_points(chunk)].tobytes())
        os.replace(tmp, bin_path)
        chars = [chr(c) for c in vocab]
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(dict(key=key, chars=''.join(chars), dtype=np.dtype(dtype).name), f)
        os.replace(tmp, meta_path)
    except UnicodeDecodeError as e:
        die(f"the input file '{path}' is not UTF-8 text (bad byte at position {e.start} of a chunk): save it as UTF-8")
    except OSError as e:
        die(f"cannot encode '{path}' into {cache_dir} ({e.strerror}): free some disk space or set --out_dir")
    finally:  # an interrupted or failed preparation leaves no half-written file behind
        if os.path.exists(tmp):
            os.remove(tmp)
    return chars, np.memmap(bin_path, dtype=dtype, mode='r')


def download(url, sha256, path):
    """ fetch the default text once, check its checksum, write it atomically """
    import requests
    print(f"{path} not found: downloading tiny Shakespeare from {url}")
    try:
        r = requests.get(url, timeout=30)
        r.raise_for_status()
    except requests.RequestException as e:
        die(f"{path} is missing and the download failed ({type(e).__name__}): put a UTF-8 text file at {path} or set --input_file")
    if hashlib.sha256(r.content).hexdigest() != sha256:
        die(f"the file downloaded from {url} has the wrong checksum: put the text at {path} yourself")
    with open(path + '.tmp', 'wb') as f:
        f.write(r.content)
    os.replace(path + '.tmp', path)


def load_splits(cfg, checkpoint=None):
    """ the vocabulary and the encoded text split 90/10 into train and val, each checked to be long enough """
    if not os.path.exists(cfg.input_file) and cfg.input_file == 'input.txt':
        download(cfg.data_url, cfg.data_sha256, cfg.input_file)
    chars, data = prepare_data(cfg.input_file, cfg.out_dir)
    if checkpoint and ''.join(chars) != checkpoint['chars']:
        differing = ''.join(sorted(set(chars) ^ set(checkpoint['chars'])))
        die(f"{cfg.input_file} and the checkpoint have different vocabularies (differing: {differing[:40]!r}): "
            f"resume on the text it learned ({checkpoint['config']['input_file']}), or train anew with another --out_dir")
    n = int(0.9 * len(data))  # first 90% will be train, rest val
    splits = dict(train=data[:n], val=data[n:])
    for split, d in splits.items():
        if len(d) < cfg.block_size + 1:
            die(f"{cfg.input_file} is too short for block_size={cfg.block_size}: its {split} split has {len(d)} "
                f"characters and needs {cfg.block_size + 1}; use a longer text or a smaller --block_size")
    return chars, splits


def get_batch(data, block_size, batch_size, device, generator=None):
    """ a batch of random chunks of the text: inputs x and targets y, the same characters shifted by one """
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])  # (B,T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])  # (B,T)
    if device.type == 'cuda':  # pinned memory lets the copy to the GPU overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, ctx):
    """
    The mean loss over eval_iters batches of each split. The batches come from a generator of
    their own, the same ones at every evaluation: estimates are comparable from one evaluation to
    the next, and the training's random stream is untouched (so a resumed run matches exactly).
    """
    out = {}
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    for split, data in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        losses = torch.zeros(cfg.eval_iters, device=device)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(data, cfg.block_size, cfg.batch_size, device, generator)
            if k % world == rank:  # under torchrun each process evaluates its share of the batches
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
        if world > 1:
            torch.distributed.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


@torch.no_grad()
def whole_split_loss(model, data, cfg, device, ctx):
    """ the exact mean loss over every character of a split, in non-overlapping block_size windows """
    rank, world = rank_and_world()
    T, B = cfg.block_size, 4 * cfg.batch_size  # forward only: 4 times the batch fits
    n = (len(data) - 1) // T  # windows
    total = torch.zeros(1, device=device)
    model.eval()
    for i in range(rank * B, n, world * B):  # under torchrun each process takes its share
        w = torch.from_numpy(data[i * T:min(n, i + B) * T + 1].astype(np.int64))
        with ctx:
            logits, loss = model(w[:-1].view(-1, T).to(device), w[1:].view(-1, T).to(device))  # (B,T) inputs, targets
        total += loss.item() * (len(w) // T)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return total.item() / n


# ----------------------------------------------------------------------------------------------
# the model

@dataclass
class GPTConfig:
    """ the shape of the model: all a checkpoint needs to rebuild it """
    vocab_size: int
    block_size: int = 256
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.2
    activation: str = 'relu'
    qkv_bias: bool = False
    fused_attention: bool = True


class Head(nn.Module):
    """ one head of self-attention """

    def __init__(self, config, head_size):
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.query = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.register_buffer('tril', torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # input of size (batch, time-step, channels), output of size (batch, time-step, head size)
        B, T, C = x.shape
        k = self.key(x)  # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities"), scaled by the head size (the video scales by C)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B,T,hs) @ (B,hs,T) -> (B,T,T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))  # (B,T,T)
        wei = F.softmax(wei, dim=-1)  # (B,T,T)
        wei = self.dropout(wei)
        # perform the weighted aggregation of the values
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B,T,T) @ (B,T,hs) -> (B,T,hs)
        return out


class MultiHeadAttention(nn.Module):
    """ multiple heads of self-attention in parallel """

    def __init__(self, config):
        super().__init__()
        head_size = config.n_embd // config.n_head
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        self.proj = nn.Linear(head_size * config.n_head, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.fused = config.fused_attention
        self.attn_dropout = config.dropout

    def forward(self, x):
        # fused unless training on a CPU with attention dropout: PyTorch has no fused CPU kernel for that
        # case, and its fallback is slower than the lecture's per-head code
        if self.fused and not (self.training and self.attn_dropout > 0 and x.device.type == 'cpu'):
            out = self.all_heads_at_once(x)  # (B,T,C)
        else:
            out = torch.cat([h(x) for h in self.heads], dim=-1)  # the lecture's way, a head at a time: (B,T,C)
        out = self.dropout(self.proj(out))
        return out

    def all_heads_at_once(self, x):
        """ the same heads with the same weights, as one matmul for every q, k, v and one fused attention kernel """
        B, T, C = x.shape
        nh = len(self.heads)
        w = torch.cat([h.query.weight for h in self.heads] + [h.key.weight for h in self.heads]
                      + [h.value.weight for h in self.heads])  # (3C,C): every head's projections stacked
        b = None
        if self.heads[0].query.bias is not None:
            b = torch.cat([h.query.bias for h in self.heads] + [h.key.bias for h in self.heads]
                          + [h.value.bias for h in self.heads])  # (3C,)
        q, k, v = F.linear(x, w, b).split(C, dim=2)  # 3 x (B,T,C)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        # softmax(q @ k^T * hs**-0.5, causal mask) @ v, as in Head, without materializing (T,T) on GPU
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
                                             is_causal=True)  # (B,nh,T,hs)
        return out.transpose(1, 2).reshape(B, T, C)  # heads side by side, as torch.cat does: (B,T,C)


class FeedForward(nn.Module):
    """ a simple linear layer followed by a non-linearity """

    def __init__(self, config):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU() if config.activation == 'gelu' else nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """ Transformer block: communication followed by computation """

    def __init__(self, config):
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):
    """ a decoder-only transformer that predicts the next character """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)  # final layer norm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # idx and targets are both (B,T) tensor of integers
        tok_emb = self.token_embedding_table(idx)  # (B,T,C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
        x = tok_emb + pos_emb  # (B,T,C)
        x = self.blocks(x)  # (B,T,C)
        x = self.ln_f(x)  # (B,T,C)
        logits = self.lm_head(x)  # (B,T,vocab_size)

        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
        return logits, loss

    @torch.no_grad()  # the lecture samples with autograd on and, after training, with dropout on
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
        # idx is (B, T) array of indices in the current context
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                # crop idx to the last block_size tokens
                idx_cond = idx[:, -self.config.block_size:]  # (B, <=block_size)
                logits, loss = self(idx_cond)
                # focus only on the last time step
                logits = logits[:, -1, :]  # becomes (B, C)
                if temperature == 0:  # greedy: the most likely character, whatever the seed
                    idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k:
                        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
                        logits[logits < v[:, [-1]]] = float('-inf')
                    probs = F.softmax(logits, dim=-1)  # (B, C)
                    idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                # append sampled index to the running sequence
                idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        finally:
            self.train(was_training)
        return idx


# ----------------------------------------------------------------------------------------------
# training, checkpoints and sampling

def rank_and_world():
    """ this process's rank and the number of processes: (0, 1) unless started by torchrun """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def configure_optimizer(model, cfg, device):
    """ AdamW with weight decay on the weight matrices only (not on biases and layer norms) """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    fused = device.type in ('cuda', 'cpu')  # one kernel for the whole update, where PyTorch has it
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def get_lr(step, cfg):
    """ linear warmup to learning_rate, then cosine decay to min_lr at the run's planned end, lr_decay_iters;
    a run extended past that end goes on at min_lr """
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.learning_rate - cfg.min_lr)


def plan_steps(cfg, device, step, step_s, elapsed, eval_s, char_s, val_tokens):
    """
    The time budget: the most steps (a multiple of 50) whose training, evaluations, whole-split loss and sample
    end within max_time, from the measured seconds of a step, of estimate_loss and of sampling a character.
    """
    token_s = eval_s / (2 * cfg.eval_iters * cfg.batch_size * cfg.block_size)  # a forward pass, per token
    char_s = char_s or token_s * cfg.block_size  # not measured when preview_chars is 0
    eval_s += char_s * cfg.preview_chars
    final_s = eval_s + token_s * val_tokens + char_s * cfg.num_samples * cfg.max_new_tokens
    left = 0.97 * cfg.max_time - elapsed - final_s  # 3% for starting up and for noise
    n = max(step, int(step + left / (step_s + eval_s / cfg.eval_interval)) // 50 * 50)
    rank, world = rank_and_world()
    if world > 1:  # every process runs the first one's plan
        n = torch.tensor([n], device=device)
        torch.distributed.broadcast(n, 0)
        n = n.item()
    end = elapsed + (n - step) * step_s + (n // cfg.eval_interval - step // cfg.eval_interval) * eval_s + final_s
    print(f"time budget {cfg.max_time} s: {n} steps at {step_s * 1000:.0f} ms/step, done at about {format_time(end)}",
          flush=True)
    return n, final_s


def save_checkpoint(path, model, optimizer, cfg, chars, run):
    """ everything needed to resume exactly or to sample later; written to a temporary file, then renamed """
    checkpoint = dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), model_class=type(model).__name__,
        model_args=asdict(model.config), config=vars(cfg), step=run.step, best_val_loss=run.best_val_loss,
        elapsed=run.elapsed, chars=''.join(chars), rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state_all() if cuda else [],
    )
    try:
        torch.save(checkpoint, path + '.tmp')
        os.replace(path + '.tmp', path)  # atomic: a crash mid-save leaves the previous checkpoint as it was
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        die(f"could not write {path} ({e}); the previous checkpoint is intact: free some disk space or set --out_dir")


def load_checkpoint(path, model_class):
    """ a checkpoint of this script, read as plain tensors and values (weights_only: it cannot run code) """
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train one first (python gpt.py), or set --out_dir")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        checkpoint['model_class'], checkpoint['model'], checkpoint['chars'], checkpoint['step'], checkpoint['config']
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all: whatever torch raises
        die(f"{path} is damaged or not a checkpoint of gpt.py ({type(e).__name__}): delete it, or use --init_from=scratch")
    if checkpoint['model_class'] != model_class.__name__:
        die(f"{path} holds a {checkpoint['model_class']}, not a {model_class.__name__}: use another --out_dir")
    return checkpoint


def keep_previous_run(out_dir):
    """ a new run never overwrites a trained model: the last run's files move to out_dir/previous/<date> """
    files = [name for name in ('ckpt.pt', 'best.pt', 'log.csv') if os.path.exists(os.path.join(out_dir, name))]
    if not {'ckpt.pt', 'best.pt'} & set(files):
        return
    when = time.strftime('%Y%m%d-%H%M%S', time.localtime(os.path.getmtime(os.path.join(out_dir, files[0]))))
    dest, k = os.path.join(out_dir, 'previous', when), 1
    while os.path.exists(dest):
        dest, k = os.path.join(out_dir, 'previous', f'{when}-{k}'), k + 1
    os.makedirs(dest)
    for name in files:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    print(f"the previous run's model is kept in {dest} (sample it with --out_dir={dest} --init_from=resume)")


@contextmanager
def stop_on_signals():
    """ Ctrl-C or SIGTERM (kill, schedulers, torchrun) stops training after this step to save; a second quits at
    once. Python takes signals in the main thread only, and a notebook gets its Ctrl-C handler back after """
    stop = []
    def on_signal(signum, frame):
        name = 'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving (again to quit at once)", flush=True)
        stop.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(model, optimizer, splits, tokenizer, cfg, device, ctx, run, stop, budget):
    """ the lecture's training loop, with a learning-rate schedule, a time budget, checkpoints, a log and a preview """
    rank, world = rank_and_world()
    single = model.module if world > 1 else model  # DistributedDataParallel wraps the model,
    raw_model = getattr(single, '_orig_mod', single)  # and torch.compile wraps it too
    ckpt_path, best_path, log_path = (os.path.join(cfg.out_dir, name) for name in ('ckpt.pt', 'best.pt', 'log.csv'))
    if rank == 0 and (run.step == 0 or not os.path.exists(log_path)):
        with open(log_path, 'w', newline='') as f:
            csv.writer(f).writerow(['step', 'train_loss', 'val_loss', 'lr', 'elapsed_s', 'whole_val_loss'])
    accum = cfg.gradient_accumulation_steps
    tokens_per_step = cfg.batch_size * cfg.block_size * accum * world
    start_step, t_start, saved_step, eval_s, char_s, deadline = run.step, time.time() - run.elapsed, run.step, 0.0, 0.0, None
    t_log, step_log, marks = time.time(), run.step, []
    while True:
        step = run.step
        # the time budget: time 4 x 10 steps of the warmup, then fix max_iters and the schedule to end in max_time
        if budget and step - start_step in (10, 20, 30, 40, 50):
            marks.append(time.time())
        if budget and step == start_step + 50:
            step_s = sum(sorted(b - a for a, b in zip(marks, marks[1:]))[1:3]) / 20  # median: a busy moment is left out
            cfg.max_iters, final_s = plan_steps(
                cfg, device, step, step_s, time.time() - t_start, eval_s, char_s, len(splits['val']))
            cfg.lr_decay_iters, cfg.planned, deadline = cfg.max_iters, True, t_start + 0.975 * cfg.max_time - final_s

        # every once in a while evaluate the loss on train and val sets, and save; always at the last step
        last = step == cfg.max_iters
        if (step % cfg.eval_interval == 0 and not stop or last) and (step > start_step or step == 0):
            t0 = time.time()
            losses = estimate_loss(single, splits, cfg, device, ctx)
            eval_s = time.time() - t0
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if cfg.preview_chars:
                print('  ' + preview(raw_model, tokenizer, cfg, device, ctx), flush=True)
                char_s = (time.time() - t0 - eval_s) / cfg.preview_chars
            whole = whole_split_loss(single, splits['val'], cfg, device, ctx) if last else None
            if last:  # exact where the estimate above has a standard error of ~0.01
                print(f"step {step}: val loss over the whole split {whole:.4f}", flush=True)
            t_log += time.time() - t0  # ms/step counts training steps only
            run.elapsed = time.time() - t_start
            if rank == 0:
                with open(log_path, 'a', newline='') as f:
                    csv.writer(f).writerow([step, f"{losses['train']:.4f}", f"{losses['val']:.4f}", f"{get_lr(step, cfg):.3e}",
                                            f"{run.elapsed:.1f}", '' if whole is None else f"{whole:.4f}"])
                if losses['val'] < run.best_val_loss and step > 0:
                    run.best_val_loss = losses['val']
                    save_checkpoint(best_path, raw_model, optimizer, cfg, tokenizer.chars, run)
                if step > start_step:
                    save_checkpoint(ckpt_path, raw_model, optimizer, cfg, tokenizer.chars, run)
                    saved_step = step
        if step >= cfg.max_iters or stop:
            break

        # sample a batch of data, evaluate the loss, take a step
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # every process draws the same batch of batch_size * accum * world sequences and trains on its share,
        # in accum micro-batches: one process, many, or accumulation all give the same step (without dropout)
        xb, yb = get_batch(splits['train'], cfg.block_size, cfg.batch_size * accum * world, device)
        optimizer.zero_grad(set_to_none=True)
        for micro_step, (x, y) in enumerate(zip(xb.chunk(world)[rank].chunk(accum), yb.chunk(world)[rank].chunk(accum))):
            if world > 1:  # average the gradients across processes after the last micro-batch only
                model.require_backward_grad_sync = micro_step == accum - 1
            with ctx:
                logits, loss = model(x, y)
            (loss / accum).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        run.step = step = step + 1

        lossf, late = loss.item(), float(deadline is not None and time.time() > deadline)
        if world > 1:  # the mean loss of all processes; a signal to any of them, or a deadline, stops them all here
            shared = torch.tensor([lossf / world, max(stop, default=0), late], device=device)
            torch.distributed.all_reduce(shared)
            lossf, late = shared[0].item(), shared[2].item()
            stop[:] = stop or ([int(shared[1].item())] if shared[1].item() else [])
        if late and step < cfg.max_iters:  # the plan is kept unless the machine slows down after it
            print(f"time budget: this machine has slowed down since the plan, so the run ends now, at step {step}")
            cfg.max_iters = step
        if not math.isfinite(lossf):
            kept = f"{ckpt_path} is from before it" if os.path.exists(ckpt_path) else "nothing was saved"
            die(f"the loss became {lossf} at step {step}; {kept}: lower --learning_rate (now {cfg.learning_rate})"
                + ("" if cfg.grad_clip else " or set --grad_clip=1.0"))
        if step % cfg.log_interval == 0:
            now = time.time()
            dt = (now - t_log) / (step - step_log)
            evals_left = cfg.max_iters // cfg.eval_interval - step // cfg.eval_interval
            left = dt * (cfg.max_iters - step) + (evals_left + 1) * (eval_s + char_s * cfg.preview_chars)
            print(f"  step {step}/{cfg.max_iters} | loss {lossf:.4f} | {dt * 1000:.0f} ms/step | "
                  f"{tokens_per_step / dt:,.0f} tok/s | elapsed {format_time(now - t_start)} | "
                  f"left {format_time(left)}", flush=True)
            t_log, step_log = time.time(), step
    run.elapsed = time.time() - t_start
    if rank == 0 and saved_step != run.step:
        save_checkpoint(ckpt_path, raw_model, optimizer, cfg, tokenizer.chars, run)
    print(f"saved {ckpt_path} at step {run.step} ({format_time(run.elapsed)})", flush=True)


def format_time(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def preview(model, tokenizer, cfg, device, ctx):
    """ a line sampled from a fixed seed, to watch the model learn; the training's random stream is not touched """
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1,1): token 0, as the lecture starts
    with ctx:
        idx = model.generate(idx, cfg.preview_chars, cfg.temperature, cfg.top_k, generator)  # (1,1+preview_chars)
    return tokenizer.decode(idx[0, 1:].tolist()).replace('\n', ' / ')


def sample(model, tokenizer, cfg, device, ctx):
    """ print num_samples samples, each character as soon as it is generated """
    context = tokenizer.encode(cfg.prompt) if cfg.prompt else [0]  # the lecture starts from token 0
    for _ in range(cfg.num_samples):
        idx = torch.tensor([context], dtype=torch.long, device=device)  # (1,T)
        print(cfg.prompt, end='', flush=True)
        for _ in range(cfg.max_new_tokens):
            with ctx:
                idx = model.generate(idx, 1, temperature=cfg.temperature, top_k=cfg.top_k)  # (1,T+1)
            print(tokenizer.decode(idx[0, -1:].tolist()), end='', flush=True)
        print('\n' + '-' * 40 if cfg.num_samples > 1 else '', flush=True)


# ----------------------------------------------------------------------------------------------
# settings from the command line, checked before any time is spent

def die(message):
    """ stop with a one-line message for the user, no traceback """
    raise SystemExit(f"error: {message}")


def read_constants(path=__file__):
    """ the constants above as {name: comment}, read from this file so --help can show the comments """
    source = open(path, encoding='utf-8').read()
    block = source.split('# hyperparameters\n', 1)[1].split('# ----', 1)[0]
    lines = re.findall(r'^([a-z_0-9]+) = .*?(?:  # (.*))?$', block, flags=re.M)
    return {name: comment for name, comment in lines if name != 'cuda'}


def get_config(argv, defaults=None):
    """ the constants, with the caller's defaults and then --name=value arguments on top; also the arguments alone """
    comments = read_constants()
    config = {name: globals()[name] for name in comments}
    config.update(defaults or {})
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            lines = [f"usage: python {os.path.basename(sys.argv[0])} [--name=value ...]   "
                     "(numbers and True/False as Python writes them; text as it is, without quotes)"]
            lines += [f"  {f'--{k}={v!r}':<28}  {comments.get(k, '')}" for k, v in config.items()]
            print('\n'.join(lines))
            raise SystemExit(0)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            die(f"cannot read '{arg}': write settings as --name=value, e.g. --max_iters=200 (see --help)")
        if name not in config:
            close = difflib.get_close_matches(name, config, n=3)
            die(f"unknown setting '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ": see --help"))
        default = config[name]
        if isinstance(default, str):
            value = text  # strings are taken as written, never evaluated
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if type(value) is not type(default):
                kind = type(default).__name__
                die(f"--{name} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} (like --{name}={default!r}), not '{text}'")
        config[name] = overrides[name] = value
    return SimpleNamespace(**config), overrides


def check_config(cfg):
    """ refuse settings that cannot work before any data is read or any time is spent """
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"{name} must be a finite number, not {value}")
    for name in ('block_size', 'n_embd', 'n_head', 'n_layer', 'batch_size', 'gradient_accumulation_steps',
                 'eval_interval', 'eval_iters', 'log_interval', 'num_samples'):
        if getattr(cfg, name) <= 0:
            die(f"{name} must be positive, not {getattr(cfg, name)}")
    for name in ('max_iters', 'max_time', 'max_new_tokens', 'learning_rate', 'min_lr', 'warmup_iters', 'weight_decay',
                 'grad_clip', 'temperature', 'top_k', 'preview_chars'):
        if getattr(cfg, name) < 0:
            die(f"{name} must not be negative, not {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        die(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}), e.g. --n_embd={cfg.n_embd // cfg.n_head * cfg.n_head or cfg.n_head}")
    for name in ('dropout', 'beta1', 'beta2'):
        if not 0 <= getattr(cfg, name) < 1:
            die(f"{name} must be at least 0 and below 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2 ** 63:
        die(f"seed must be at least 0 and below 2**63, not {cfg.seed}")
    if 0 < cfg.temperature < 1e-3:
        die(f"temperature {cfg.temperature} is too small to sample with: use --temperature=0 for greedy decoding")
    choices = dict(activation=('relu', 'gelu'), init_from=('scratch', 'resume', 'best'))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            die(f"{name} must be one of {', '.join(allowed)}, not '{getattr(cfg, name)}'")


def resume_config(cfg, overrides, checkpoint, path):
    """ a resumed run is the same run: the checkpoint's settings, then the command line's, in one line """
    saved, shape = checkpoint['config'], checkpoint['model_args']
    fixed = [k for k, v in overrides.items() if k in shape and v != shape[k] and k not in ('dropout', 'fused_attention')]
    if fixed:
        die(f"a trained model keeps its shape ({', '.join(f'{k}={shape[k]!r}' for k in fixed)}): drop "
            f"{' '.join(f'--{k}' for k in fixed)}, or train a new model with another --out_dir")
    if overrides.get('max_time', saved.get('max_time')) != saved.get('max_time'):
        die(f"max_time sets the length of a new run; {path} continues to step {saved['max_iters']}: "
            f"set --max_iters=N to train it longer")
    per_call = ('init_from', 'out_dir', 'device')  # where the checkpoint is and what runs it belong to this call
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in overrides.items() if k in saved and k not in per_call and saved[k] != v]
    print(f"resuming {path} at step {checkpoint['step']} with its settings" + (f"; changed: {', '.join(changed)}" if changed else ''))
    return SimpleNamespace(**{**vars(cfg), 'lr_decay_iters': saved['max_iters'], 'planned': True,
                              **{k: v for k, v in saved.items() if k not in per_call}, **overrides})


def pick_device(name):
    """ 'auto' picks CUDA, else Apple MPS, else CPU; a named device must exist on this machine """
    if name == 'auto':
        return torch.device('cuda' if cuda else 'mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError:
        die(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    available = dict(cpu=True, cuda=cuda and (dev.index or 0) < torch.cuda.device_count(),
                     mps=torch.backends.mps.is_available())
    if not available.get(dev.type, False):
        die(f"device '{name}' is not available on this machine; use --device=auto or --device=cpu")
    return dev


def main(argv=(), model_class=None, defaults=None):
    """ python gpt.py: train (or resume), then sample; bigram.py and lecture_steps.py call this with their own model """
    t_begin = time.time()  # a new run's clock, and its time budget, start here
    cfg, overrides = get_config(argv, defaults)
    model_class = model_class or GPTLanguageModel
    checkpoint = None
    if cfg.init_from in ('resume', 'best'):
        path = os.path.join(cfg.out_dir, 'ckpt.pt' if cfg.init_from == 'resume' else 'best.pt')
        checkpoint = load_checkpoint(path, model_class)
        cfg = resume_config(cfg, overrides, checkpoint, path)
    check_config(cfg)
    if 'max_iters' in overrides:  # a step count given on the command line turns the time budget off
        cfg.max_time = 0
    if not checkpoint:
        cfg.lr_decay_iters, cfg.planned = cfg.max_iters, False  # the budget's plan sets both
    budget = cfg.max_time > 0 and not cfg.planned
    device = pick_device(cfg.device)
    # torchrun starts one process per device and gives each a RANK; plain python gpt.py runs alone
    if 'RANK' in os.environ:
        try:
            torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        except (ValueError, RuntimeError) as e:
            die(f"RANK is set but torchrun did not start this process ({str(e).splitlines()[0][:80]}): "
                f"unset RANK, or start it with torchrun")
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        if torch.distributed.get_rank() > 0:
            sys.stdout = open(os.devnull, 'w')  # only the first process prints, saves and samples
    rank, world = rank_and_world()
    torch.manual_seed(cfg.seed)
    try:  # find out now, not after an hour of training, that checkpoints cannot be written
        os.makedirs(cfg.out_dir, exist_ok=True)
        test_file = os.path.join(cfg.out_dir, f'.write_test{os.getpid()}')
        open(test_file, 'w').close()
        os.remove(test_file)
    except OSError as e:
        die(f"cannot write to out_dir '{cfg.out_dir}' ({e.strerror}): set --out_dir to a writable folder")

    step = checkpoint['step'] if checkpoint else 0
    training = budget or step < cfg.max_iters
    if checkpoint and 0 < cfg.max_iters < step:
        print(f"the checkpoint is at step {step}, past --max_iters={cfg.max_iters}: sampling only")

    # data: read when there is training to do, or no checkpoint to take the vocabulary from
    if training or not checkpoint:
        if rank > 0:
            torch.distributed.barrier()  # the first process encodes the text, then the others read it
        chars, splits = load_splits(cfg, checkpoint)
        if rank == 0 and world > 1:
            torch.distributed.barrier()
    else:
        chars, splits = list(checkpoint['chars']), {}
    tokenizer = CharTokenizer(chars)
    try:
        tokenizer.encode(cfg.prompt)
    except ValueError as e:
        die(f"the prompt has {e}: change --prompt")

    # the model: its shape comes from the checkpoint when there is one
    shape = checkpoint['model_args'] if checkpoint else dict(vocab_size=len(chars), **{k: getattr(cfg, k) for k in (
        'block_size', 'n_embd', 'n_head', 'n_layer', 'activation', 'qkv_bias')})
    shape = {k: v for k, v in shape.items() if k in GPTConfig.__dataclass_fields__}  # as saved by older versions too
    config = GPTConfig(**{**shape, 'dropout': cfg.dropout, 'fused_attention': cfg.fused_attention})
    model = model_class(config).to(device)
    if checkpoint:
        try:
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            die(f"the checkpoint does not fit this model ({str(e).splitlines()[0][:120]}): use another --out_dir")
    if checkpoint and training:  # a resumed run continues its random stream; a sample alone follows --seed
        torch.set_rng_state(checkpoint['rng_cpu'])
        if cuda and checkpoint['rng_cuda']:
            torch.cuda.set_rng_state_all(checkpoint['rng_cuda'])

    # bf16 autocast where the GPU has it and TF32 matmuls: the speed of mixed precision, no loss scaling
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = device.type == 'cuda' and torch.cuda.is_bf16_supported()
    ctx = torch.autocast(device_type='cuda', dtype=torch.bfloat16) if use_bf16 else nullcontext()
    print(f"device: {device}{' (bf16 autocast)' if use_bf16 else ''}, {torch.get_num_threads()} CPU threads")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"vocabulary: {len(chars)} characters; model: {type(model).__name__}" + (
        f", {config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}" if hasattr(model, 'blocks') else '')
        + f", block_size {config.block_size}")

    if training:  # the optimizer only when training: building one is slow to start, and sampling needs none
        optimizer = configure_optimizer(model, cfg, device)
        if checkpoint:
            optimizer.load_state_dict(checkpoint['optimizer'])
        trained = torch.compile(model) if cfg.torch_compile else model
        if world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
        if rank == 0 and not checkpoint:
            keep_previous_run(cfg.out_dir)
        tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
        print(f"training: {f'as many steps as fit in {cfg.max_time} s' if budget else f'{cfg.max_iters - step} steps'}"
              f" to step {'?' if budget else cfg.max_iters}, {tokens:,} tokens per step"
              + (f" ({world} processes)" if world > 1 else ""), flush=True)
        run = SimpleNamespace(step=step, best_val_loss=checkpoint['best_val_loss'] if checkpoint else float('inf'),
                              elapsed=checkpoint.get('elapsed', 0.0) if checkpoint else time.time() - t_begin)
        with stop_on_signals() as stop:
            train(trained, optimizer, splits, tokenizer, cfg, device, ctx, run, stop, budget)
        if stop and stop[0] == signal.SIGTERM:  # asked to end: saved, so go without sampling
            raise SystemExit(128 + signal.SIGTERM)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:  # generate from the model
        sample(model, tokenizer, cfg, device, ctx)
    return model


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C, or one while sampling: quit quietly
        raise SystemExit(130)
