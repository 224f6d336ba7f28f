"""
A character-level GPT, trained from scratch on one text file and then sampled: the model of the
lecture "Let's build GPT: from scratch, in code, spelled out", in the lecture's order and with its
names, made fast on CPU and GPU, with checkpoints, exact resume and sampling from a prompt.

    python gpt.py                    # train on input.txt (tiny Shakespeare), then print a sample
    python gpt.py --max_iters=200    # any constant below can be set like this, or edited in place
    python gpt.py --help             # every constant, its default and what it means
    python gpt.py --init_from=resume --max_iters=0 --prompt="ROMEO:"   # sample from the saved model
    python gpt.py --init_from=resume --max_iters=0 --prompt="ROMEO: " --attention=True  # each head

On a CUDA GPU it runs the lecture's model (6 layers, 6 heads, n_embd 384, block 256, 5000 steps).
On a CPU or Apple MPS it runs a smaller model that trains and samples in about 3 minutes.

Read it down to the divider (the line of '='): that part is the lecture's script in the lecture's
order, the hyperparameters, the data, the model, the optimizer, the training loop and sampling, and
main(), which runs them. What a first read can skip (the command line, checkpoints, the time budget,
torchrun, signals, pictures) comes after the divider, grouped by concern and called by name.
"""
import math
import os
import signal
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

started = time.time()  # when this script began: max_time counts from here, loading torch included

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# hyperparameters
# Edit these lines to change the run, or set any of them on the command line (--max_iters=200): the
# two are the same, and a run resumed after an edit takes the edit as it takes the command line.
# A line with two values (`x if cuda else y`) holds one for a CUDA GPU, most of them the lecture's
# run (a comment says where not), and one for a laptop-size run on a CPU or Apple MPS.
# The lecture's own come first, in its order; the ones beyond it follow, grouped by what they set.
cuda = torch.cuda.is_available()
batch_size = 64 if cuda else 32  # how many independent sequences will we process in parallel?
block_size = 256 if cuda else 64  # what is the maximum context length for predictions?
max_iters = 5000 if cuda else 50000  # the last step (the lecture: 5000), unless max_time comes first
eval_interval = 500  # estimate train and val loss every this many steps
learning_rate = 1e-3 if cuda else 1e-2  # peak, after the warmup (the lecture: 3e-4, flat)
device = 'auto'  # 'auto' (CUDA, else Apple MPS, else CPU), or 'cpu', 'cuda', 'cuda:1', 'mps'
eval_iters = 200 if cuda else 40  # batches of each split averaged in one estimate (std. err. < 0.01)
n_embd = 384 if cuda else 96  # width of the embedding of each token
n_head = 6 if cuda else 3  # attention heads per block; n_embd must be divisible by n_head
n_layer = 6 if cuda else 2  # transformer blocks; in 3 CPU minutes, many steps of a small model win
dropout = 0.2 if cuda else 0.0  # 0 on CPU: 3 minutes cannot overfit, and attention stays fused
seed = 1337  # random seed of the run (the lecture's torch.manual_seed(1337))
# data
input_file = 'input.txt'  # the text to train on (UTF-8); its characters are the vocabulary
# the default text, fetched when input.txt is missing, and the checksum it must have
data_url = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/'
            'input.txt')
data_sha256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
# model
activation = 'gelu'  # feed-forward non-linearity: 'relu' (the lecture) or 'gelu' (GPT-2, better)
position_embedding = 'learned'  # 'learned' (the lecture's table) or 'sinusoidal' (fixed sin/cos)
qkv_bias = False  # bias on the query/key/value projections (the lecture: no, GPT-2: yes)
fused_attention = True  # all heads in one fused kernel; False runs the lecture's Head by Head
# training
max_time = 0 if cuda else 180  # seconds, start to sample (0 = no limit): the run ends at max_iters or here
log_interval = 100  # print progress every this many steps
min_lr_frac = 0.1 if cuda else 0.06  # the cosine ends at learning_rate times this (nanoGPT: a tenth)
warmup_iters = 100 if cuda else 50  # steps of linear warmup from 0
weight_decay = 0.1  # on the weight matrices only (not biases and norms), AdamW's and Muon's
beta1 = 0.9  # AdamW beta1
beta2 = 0.99 if cuda else 0.95  # AdamW beta2; below 0.999 since each step sees few tokens
grad_clip = 1.0  # clip the gradient norm at this value (0 = off)
optimizer = 'adamw' if cuda else 'muon'  # 'adamw' (the lecture's), or 'muon' for the blocks' matrices
muon_lr_scale = 1.2  # Muon's learning rate: learning_rate times this, on the same schedule
embedding_lr_scale = 1.0 if cuda else 3.0  # the embedding tables' rate: learning_rate times this
muon_momentum = 0.9  # Muon's (Nesterov) momentum; 0.95 is usual, 0.9 suits a short run
gradient_accumulation_steps = 1  # micro-batches per step: a larger batch than fits in memory
# sampling
prompt = ''  # text the sample starts from; '' starts from the first character, as the lecture
attention = False  # first draw each head's attention over the prompt into out_dir/attention.png
num_samples = 1  # how many samples to print
max_new_tokens = 500  # characters generated per sample
temperature = 1.0  # 1 samples the model's distribution, lower is more conservative, 0 is greedy
top_k = 0  # sample only from the k most likely characters (0 = all)
preview_chars = 80  # at each evaluation, print this many characters sampled (fixed seed; 0 = off)
# I/O
out_dir = 'out'  # checkpoints (ckpt.pt latest, best.pt best val), log.csv and the data cache
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'best' (from out_dir/best.pt)
plot = True  # after each evaluation, draw the losses into out_dir/loss.png (needs matplotlib)
# system
torch_compile = False  # compile the model with torch.compile: a slow start, then faster GPU steps
# ----------------------------------------------------------------------------------------------
# data: every character of the text is a token, and the text becomes one long row of token ids

class CharTokenizer:
    """ the lecture's tokenizer: every distinct character of the text is one token """

    def __init__(self, chars):
        # here are all the unique characters that occur in this text
        self.chars = ''.join(chars)
        # create a mapping from characters to integers
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = {i: ch for i, ch in enumerate(chars)}

    def encode(self, s):
        """ encoder: take a string, output a list of integers (a character never seen: an error) """
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters the model never saw: {''.join(unknown)!r}")
        return [self.stoi[c] for c in s]

    def decode(self, l):
        """ decoder: take a list of integers, output a string """
        return ''.join(self.itos[i] for i in l)


# cfg, handed to the functions from here on, holds the settings: the constants above, as main reads
# them with the command line (cfg.block_size is block_size, or --block_size=N when that is given)
def load_splits(cfg, checkpoint=None):
    """ the vocabulary, and the text as token ids split 90/10 into train and val """
    # The lecture reads the text and encodes it in three lines:
    #     text = open('input.txt', 'r', encoding='utf-8').read()
    #     chars = sorted(list(set(text)))
    #     data = torch.tensor(encode(text), dtype=torch.long)
    # prepare_data does the same with numpy, a few million characters at a time, into a file on
    # disk: a 100 MB text then takes about a second and little memory, and later runs start at once.
    if not os.path.exists(cfg.input_file) and cfg.input_file == 'input.txt':
        download(cfg.data_url, cfg.data_sha256, cfg.input_file)  # tiny Shakespeare, fetched once
    chars, data = prepare_data(cfg.input_file, cfg.out_dir)
    if checkpoint:  # a trained model goes on only with the characters it knows
        check_text_against(checkpoint, chars, cfg)
    # Train and test splits
    n = int(0.9 * len(data))  # first 90% will be train, rest val
    splits = dict(train=data[:n], val=data[n:])
    check_splits(splits, cfg)  # each split must hold at least one block and its targets
    return chars, splits


# data loading
def get_batch(data, block_size, batch_size, device, generator=None):
    """ generate a small batch of data of inputs x and targets y """
    # batch_size random places in the text; y is x shifted by one: the character that comes next
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])  # (B,T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64))
                     for i in ix])  # (B,T)
    if device.type == 'cuda':  # pinned memory lets the copy to the GPU overlap with compute
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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
                with ctx:  # ctx: the precision of the forward pass (fp32 on a CPU; autocast on a GPU)
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
        if world > 1:
            torch.distributed.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# the model: token and position embeddings, blocks of self-attention and feed-forward, a head

@dataclass
class GPTConfig:
    """ the shape of the model: all a checkpoint needs to rebuild it (defaults: the constants) """
    vocab_size: int
    block_size: int = block_size
    n_embd: int = n_embd
    n_head: int = n_head
    n_layer: int = n_layer
    dropout: float = dropout
    activation: str = activation
    position_embedding: str = position_embedding
    qkv_bias: bool = qkv_bias
    fused_attention: bool = fused_attention


# Which attention code runs: by default (fused_attention = True) MultiHeadAttention computes
# all its heads at once, with the same weights, in all_heads_at_once: one matmul and one fused
# kernel. Head's own forward, the lecture's code, runs with --fused_attention=False (and when the
# attention pictures are drawn); a test checks that both give the same output.

class Head(nn.Module):
    """ one head of self-attention """

    def __init__(self, config, head_size):
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.query = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        tril = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer('tril', tril, persistent=False)  # a constant, not a parameter
        self.dropout = nn.Dropout(config.dropout)
        self.keep_wei = False  # True: forward keeps its softmaxed wei in self.wei, for the pictures
        self.wei = None

    def forward(self, x):
        # input of size (batch, time-step, channels), output of size (batch, time-step, head size)
        B, T, C = x.shape
        # each token emits a key (what it contains) and a query (what it looks for)
        k = self.key(x)  # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities"), scaled by the head size (the video scales by C)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B,T,hs) @ (B,hs,T) -> (B,T,T)
        # a decoder block: a token may not talk to the future, so those scores become -inf
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))  # (B,T,T)
        # each row sums to 1: how much the token at t takes from each token up to t
        wei = F.softmax(wei, dim=-1)  # (B,T,T)
        if self.keep_wei:  # not in the lecture: the attention pictures read wei here
            self.wei = wei.detach()  # (B,T,T)
        wei = self.dropout(wei)
        # perform the weighted aggregation of the values
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B,T,T) @ (B,T,hs) -> (B,T,hs)
        return out


class MultiHeadAttention(nn.Module):
    """ multiple heads of self-attention in parallel """

    def __init__(self, config):
        super().__init__()
        head_size = config.n_embd // config.n_head  # the heads side by side are n_embd wide again
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        self.proj = nn.Linear(head_size * config.n_head, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.fused = config.fused_attention  # all_heads_at_once, below (the default)
        self.attn_dropout = config.dropout

    def forward(self, x):
        # fused unless training on a CPU with attention dropout: PyTorch has no fused CPU kernel for
        # that case, and its fallback is slower than the lecture's per-head code
        if self.fused and not (self.training and self.attn_dropout > 0 and x.device.type == 'cpu'):
            out = self.all_heads_at_once(x)  # (B,T,C)
        else:  # the lecture's way: each Head, and their outputs side by side
            out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B,T,C)
        # the projection back into the residual pathway
        out = self.dropout(self.proj(out))
        return out

    def all_heads_at_once(self, x):
        """ the same heads with the same weights: one matmul for all q, k, v, one fused kernel """
        B, T, C = x.shape
        nh = len(self.heads)
        # every head's query, key and value weights stacked into one matrix
        w = torch.cat([h.query.weight for h in self.heads] + [h.key.weight for h in self.heads]
                      + [h.value.weight for h in self.heads])  # (3C,C)
        b = None
        if self.heads[0].query.bias is not None:
            b = torch.cat([h.query.bias for h in self.heads] + [h.key.bias for h in self.heads]
                          + [h.value.bias for h in self.heads])  # (3C,)
        q, k, v = F.linear(x, w, b).split(C, dim=2)  # 3 x (B,T,C)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        # softmax(q @ k^T * hs**-0.5, causal mask) @ v, as in Head, without a (T,T) matrix on GPU
        p_drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)  # (B,nh,T,hs)
        return out.transpose(1, 2).reshape(B, T, C)  # heads side by side, as torch.cat: (B,T,C)


class FeedForward(nn.Module):
    """ a simple linear layer followed by a non-linearity """

    def __init__(self, config):
        super().__init__()
        # applied to each token on its own: having gathered from the others, it thinks about it
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            # GELU by default, GPT-2's smooth ReLU; the lecture's nn.ReLU() with --activation=relu
            nn.GELU() if config.activation == 'gelu' else nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """ Transformer block: communication followed by computation """

    def __init__(self, config):
        # n_embd: embedding dimension, n_head: the number of heads we'd like
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)

    def forward(self, x):
        # residual connections: each sub-layer adds to x; layer norm before each (pre-norm)
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


# a variant, not in the lecture: position_embedding = 'sinusoidal' puts this in place of the table
class SinusoidalPositions(nn.Module):
    """ the Transformer paper's position embedding: fixed sin and cos waves of falling frequency """

    def __init__(self, block_size, n_embd):
        super().__init__()
        pos = torch.arange(block_size, dtype=torch.float32)[:, None]  # (T,1)
        freq = 10000 ** (-torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (ceil(C/2),)
        table = torch.zeros(block_size, n_embd)
        table[:, 0::2] = torch.sin(pos * freq)  # PE[pos, 2i] = sin(pos / 10000^(2i/C))
        table[:, 1::2] = torch.cos(pos * freq[:n_embd // 2])  # PE[pos,2i+1] = cos(pos/10000^(2i/C))
        self.register_buffer('table', table, persistent=False)  # (T,C): computed, never saved or trained

    def forward(self, pos):
        return self.table[pos]  # looked up like nn.Embedding: (T,) -> (T,C)


class GPTLanguageModel(nn.Module):
    """ a decoder-only transformer that predicts the next character """

    def __init__(self, config):
        super().__init__()
        self.config = config
        # each token directly reads off its embedding from a lookup table, and so does its position
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding == 'sinusoidal':
            self.position_embedding_table = SinusoidalPositions(config.block_size, config.n_embd)
        else:
            self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)  # final layer norm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        # better init, not covered in the original GPT video, but important, will cover in followup video
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
        if T > self.config.block_size:  # the position table has block_size rows
            raise ValueError(f"sequence of length {T} is longer than block_size "
                             f"{self.config.block_size}")
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
                # get the predictions
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
                    # apply softmax to get probabilities
                    probs = F.softmax(logits, dim=-1)  # (B, C)
                    # sample from the distribution
                    idx_next = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
                # append sampled index to the running sequence
                idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        finally:
            self.train(was_training)
        return idx


# ----------------------------------------------------------------------------------------------
# the optimizer and its schedule: the lecture's AdamW (or Muon for the blocks' matrices), with a
# linear warmup and a cosine decay of the learning rate (the lecture keeps it flat)

def configure_optimizer(model, cfg, device):
    """ the lecture's torch.optim.AdamW, or with optimizer='muon', Muon for the blocks' weight
    matrices and AdamW for the rest (embeddings, lm_head, biases, norms) """
    matrices = muon_matrices(model) if cfg.optimizer == 'muon' else []
    params = [p for p in model.parameters() if p.requires_grad and all(p is not m for m in matrices)]
    # the embedding tables learn at their own rate: 3x on a CPU, where it trains further in 3 minutes
    # (the lecture: one rate for every weight, as embedding_lr_scale = 1.0, the GPU's, gives)
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and cfg.embedding_lr_scale != 1]
    params = [p for p in params if all(p is not t for t in tables)]
    # weight decay on the weight matrices only, not on biases and layer norms
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    if tables:
        groups.append(dict(params=tables, weight_decay=cfg.weight_decay, lr_scale=cfg.embedding_lr_scale))
    fused = device.type in ('cuda', 'cpu')  # one kernel for the whole update, where PyTorch has it
    betas = (cfg.beta1, cfg.beta2)
    # the lecture's AdamW(m.parameters(), lr=learning_rate) takes torch's betas (0.9, 0.999) and decay 0.01
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)
    if not matrices:
        return adamw
    # On a CPU the blocks' matrices take Muon instead (its code is below the divider): each step moves a
    # matrix along its gradient's momentum made orthogonal, every direction of it by about as much. In 3
    # CPU minutes that trains further than AdamW; --optimizer=adamw runs the lecture's AdamW for all.
    muon = Muon(matrices, lr=cfg.learning_rate, momentum=cfg.muon_momentum,
                weight_decay=cfg.weight_decay, lr_scale=cfg.muon_lr_scale)
    return MuonWithAdamW(muon, adamw)


def get_lr(step, cfg, end, moved=None):
    """ the learning rate of a step: a linear warmup to learning_rate, then a cosine decay to
    min_lr_frac of it at step end, the run's last, and flat after that (a run trained on). moved=(m,
    lr): the time budget moved the end at step m, where the rate was lr; from there the cosine goes
    from lr to the new end, so the rate never jumps """
    min_lr = cfg.min_lr_frac * cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    start, top = moved or (cfg.warmup_iters, cfg.learning_rate)
    progress = (step - start) / max(1, end - start)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # from 1 down to 0
    return min_lr + coeff * (top - min_lr)


def set_lr(optimizer, lr):
    """ the step's learning rate into every parameter group """
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)  # Muon's matrices, the CPU's tables: a multiple


# ----------------------------------------------------------------------------------------------
# training: the lecture's loop

def train(run, cfg):
    """ the lecture's training loop. run is the loop's state (LoopState, below the divider): the step,
    where the run ends, the model, the optimizer and the data; the loop updates it, the checkpoint saves it """
    model, optimizer, accum = run.model, run.optimizer, cfg.gradient_accumulation_steps
    scaler = run.scaler  # fp16's loss scaling (GradScaler); in bf16 and fp32 its calls pass through
    while True:
        step = run.step
        if run.budget:  # max_time: time the first steps, then plan how many fit (and plan again)
            time_budget(run, cfg)
        # the loop runs max_iters + 1 times: it evaluates and saves after the last step
        last_step = step == run.max_iters

        # every once in a while evaluate the loss on train and val sets
        if (step % cfg.eval_interval == 0 and not run.stop or last_step) and step != run.resumed_at:
            t0 = time.time()
            losses = estimate_loss(model, run.splits, cfg, run.device, run.ctx)
            run.eval_s = time.time() - t0
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                  flush=True)
            # the preview, checkpoints, a row of log.csv, at the end the loss over the whole split
            after_evaluation(run, cfg, losses, last_step, t0)
        if step >= run.max_iters or run.stop:
            break

        # sample a batch of data (every process draws the same one and trains on its share)
        xb, yb = get_batch(run.splits['train'], cfg.block_size, run.batch_rows, run.device)

        # evaluate the loss
        # the rate of this step (the lecture's is flat: --warmup_iters=0 --min_lr_frac=1.0 runs that)
        set_lr(optimizer, get_lr(step, cfg, run.lr_decay_iters, run.lr_moved))
        optimizer.zero_grad(set_to_none=True)  # before the micro-batches: their gradients add up
        for x, y in micro_batches(run, xb, yb, accum):
            with run.ctx:
                logits, loss = model(x, y)
            scaler.scale(loss / accum).backward()  # (loss / accum).backward(), scaled in fp16
        if cfg.grad_clip:  # not in the lecture: a rare huge gradient cannot throw the model off
            scaler.unscale_(optimizer)  # fp16: the true gradients, to clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # optimizer.step(); in fp16 skipped when a gradient overflowed
        scaler.update()  # fp16: the scale halves after an overflow, doubles after 2000 clean steps
        run.step += 1
        # the loss shared by all processes, a stop, the time budget's deadline, a NaN, progress
        after_step(run, cfg, loss)
    # the loop has ended; a run stopped between two evaluations saves the step it stands at
    run.elapsed = time.time() - run.t_start
    if run.rank == 0 and run.saved_step != run.step:
        save_checkpoint(run.ckpt_path, run, cfg)
    print(f"saved {run.ckpt_path} at step {run.step} ({format_time(run.elapsed)})", flush=True)


# ----------------------------------------------------------------------------------------------
# sampling: generate from the model, one character at a time

def sample(model, tokenizer, cfg, device, ctx):
    """ print num_samples samples, each character as soon as it is generated """
    context = tokenizer.encode(cfg.prompt) if cfg.prompt else [0]  # the lecture starts from token 0
    for _ in range(cfg.num_samples):
        idx = torch.tensor([context], dtype=torch.long, device=device)  # (1,T)
        print(cfg.prompt, end='', flush=True)
        for _ in range(cfg.max_new_tokens):
            with ctx:
                idx = model.generate(idx, 1, cfg.temperature, cfg.top_k)  # (1,T+1)
            print(tokenizer.decode(idx[0, -1:].tolist()), end='', flush=True)
        print('\n' + '-' * 40 if cfg.num_samples > 1 else '', flush=True)


# ----------------------------------------------------------------------------------------------
# the run, in the lecture's order: settings, device, seed, data, model, optimizer, train, sample

def main(argv=(), model_class=None, defaults=None, t_begin=None):
    """ python gpt.py: train (or resume), then sample; bigram.py and lecture_steps.py pass their
    own model and defaults """
    t_begin = t_begin or time.time()  # a new run's clock, and its time budget, start here
    print_in_the_first_process_only()  # under torchrun the others train in silence
    model_class = model_class or GPTLanguageModel
    # the settings: the constants above, the caller's defaults, a resumed run's, the command line
    cfg, checkpoint = settings(argv, defaults, model_class)
    device = start_processes(cfg)  # device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(cfg.seed)  # torch.manual_seed(1337)
    check_out_dir(cfg.out_dir)
    # run: the loop's state, every variable the training loop updates (LoopState, below the divider)
    run = loop_state(cfg, checkpoint, t_begin, defaults)
    # the text, its characters, encode and decode, and the train and val splits
    tokenizer, splits = load_data(cfg, checkpoint, run.training)
    # model = GPTLanguageModel(); m = model.to(device)
    model = build_model(model_class, len(tokenizer.chars), cfg, checkpoint, device)
    ctx, scaler = autocast(device)  # the precision every forward runs in, and fp16's loss scaler
    # print the number of parameters in the model
    describe(model, tokenizer, device)
    if run.training:
        # one run at a time in out_dir; Ctrl-C or SIGTERM stops it after a step, saved
        with one_run_at_a_time(cfg.out_dir, on=run.rank == 0), stop_on_signals(run.signals):
            # optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate); on a CPU, Muon for
            # the blocks' matrices (configure_optimizer); then the log, torch.compile, torchrun
            start_training(run, model, tokenizer, splits, cfg, checkpoint, device, ctx, scaler)
            train(run, cfg)
        if signal.SIGTERM in run.stop:  # asked to end: saved, so no sample
            raise SystemExit(128 + signal.SIGTERM)
    # generate from the model (under torchrun, the first process, once the others are done)
    if end_processes(run) == 0:
        if cfg.attention:  # each head's attention over the prompt, into out_dir/attention.png
            draw_prompt_attention(model, tokenizer, cfg, device)
        # print(decode(m.generate(context, max_new_tokens=500)[0].tolist()))
        sample(model, tokenizer, cfg, device, ctx)
    return model


# The script runs main() from its last lines (run_script, at the end of the file), once everything
# below the divider is defined.


# ==============================================================================================
# Below the divider: what a first read can skip. main() and train() call it by name; by concern:
#   setup that main calls       settings, start_processes, load_data, build_model, autocast, ...
#   the loop's state            LoopState, loop_state
#   loop helpers                micro_batches, after_step, after_evaluation, the final loss
#   the time budget             time_budget, warm_timings, plan, plan_steps
#   Muon                        muon_matrices, newton_schulz, Muon, MuonWithAdamW
#   data at scale               prepare_data: the text encoded once into a file, memory-mapped
#   checkpoints and the log     save_checkpoint, load_checkpoint, keep_previous_run, start_log
#   the one-run lock            one_run_at_a_time, check_out_dir
#   pictures                    out_dir/loss.png, and each head's attention in attention.png
#   the command line            get_config, check_config, resume_config, pick_device
#   processes                   torchrun: rank_and_world, errors as torchrun reports them
#   errors, signals, console    die, stop_on_signals, Console, and the script's entry point
import ast
import csv
import difflib
import errno
import gc
import hashlib
import inspect
import json
import re
import shutil
import socket
import sys
import textwrap
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

try:
    import fcntl  # a lock per out_dir: one training run at a time
except ImportError:  # Windows
    fcntl = None


# ----------------------------------------------------------------------------------------------
# setup that main calls: the settings, the device and processes, the data, the model, precision

def settings(argv, defaults, model_class):
    """ the constants, the caller's defaults, a resumed run's own settings, then the command line """
    cfg, overrides = get_config(argv, defaults)
    for name in overrides:
        if name in getattr(model_class, 'ignored_settings', ()):
            die(f"{model_class.__name__} has no {name}: drop --{name}")
    checkpoint = None
    if cfg.init_from in ('resume', 'best'):
        path = os.path.join(cfg.out_dir, 'ckpt.pt' if cfg.init_from == 'resume' else 'best.pt')
        checkpoint = load_checkpoint(path, model_class)
        # a constant edited since the checkpoint was saved counts as the same --name=value would
        edited = edited_since(checkpoint, cfg, defaults, overrides)
        cfg = resume_config(cfg, {**edited, **overrides}, checkpoint, path, edited)
    check_config(cfg)
    return cfg, checkpoint


def start_processes(cfg):
    """ the device; under torchrun (one process per device, each given a RANK) join the others """
    device = pick_device(cfg.device)
    if 'RANK' not in os.environ:  # plain python gpt.py runs alone
        return device
    try:
        torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    except (ValueError, RuntimeError) as e:
        die(f"RANK is set but torchrun did not start this process ({first_line(e, 120)}): "
            f"unset RANK, or start it with torchrun")
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    return device


def load_data(cfg, checkpoint, training):
    """ the tokenizer and the splits: the text is read when there is training to do, or no checkpoint to take
    the vocabulary from """
    if checkpoint and 0 < cfg.max_iters < checkpoint['step']:
        print(f"the checkpoint is at step {checkpoint['step']}, past --max_iters={cfg.max_iters}: "
              f"sampling only")
    elif checkpoint and not training and cfg.max_iters == checkpoint['step'] > 0:
        print(f"the checkpoint has finished its {cfg.max_iters} steps: sampling only "
              f"(--max_iters=N trains it on to step N)")
    if training or not checkpoint:
        rank, world = rank_and_world()
        if rank > 0:
            torch.distributed.barrier()  # the first process encodes the text, then the others read it
        chars, splits = load_splits(cfg, checkpoint)
        if rank == 0 and world > 1:
            torch.distributed.barrier()
    else:
        chars, splits = list(checkpoint['chars']), {}
    unknown = ''.join(sorted(set(cfg.prompt) - set(chars)))
    if unknown:
        die(f"the prompt has characters the model never saw: {shown(unknown)}: change --prompt")
    return CharTokenizer(chars), splits


def build_model(model_class, vocab_size, cfg, checkpoint, device):
    """ the model, its shape from the checkpoint when there is one, with the checkpoint's weights """
    names = ('block_size', 'n_embd', 'n_head', 'n_layer', 'activation', 'position_embedding', 'qkv_bias')
    if checkpoint:
        shape = dict(checkpoint['model_args'])
    else:
        shape = dict(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in names})
    shape.setdefault('position_embedding', 'learned')  # checkpoints from before there was a choice
    shape = {k: v for k, v in shape.items() if k in GPTConfig.__dataclass_fields__}  # older versions' too
    config = GPTConfig(**{**shape, 'dropout': cfg.dropout, 'fused_attention': cfg.fused_attention})
    model = model_class(config).to(device)
    if cfg.attention and not attention_heads(model):  # found out before any training
        die(f"{type(model).__name__} has no heads of self-attention to draw: drop --attention=True")
    if cfg.optimizer == 'muon' and not checkpoint and not muon_matrices(model):
        die(f"{type(model).__name__} has no blocks of weight matrices for Muon to train: "
            f"use --optimizer=adamw")
    if checkpoint:
        try:
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            die(f"the checkpoint does not fit this model ({first_line(e, 120)}): "
                f"use another --out_dir")
    return model


def precision(device):
    """ what every forward pass computes in on device: 'bf16', 'fp16' or 'fp32' """
    if device.type != 'cuda':
        return 'fp32'  # CPU and MPS: bf16 autocast measured slower than fp32 on CPU at these sizes
    # bf16 where the GPU has it in hardware: compute capability 8.0 (A100, RTX 30xx) and later. Not
    # torch.cuda.is_bf16_supported(): from PyTorch 2.3 on it counts emulation, True on a T4 (7.5),
    # whose bf16 matmuls are emulated, slow, and refused by torch.compile's Triton. (Nor its
    # including_emulation=False: that asks about the current device, this about device itself.)
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return 'bf16'
    # Older GPUs (T4, V100: 7.x) run fp16 on tensor cores at about 8x their fp32 speed. fp16's range
    # (up to 65504) holds this model's activations: every matmul takes a LayerNorm's output, the
    # embeddings and the residual stream stay fp32, and autocast runs softmax, LayerNorm and the
    # cross-entropy in fp32. Its short exponent would flush small gradients to zero: the GradScaler
    # scales the loss up before backward and the gradients back down before the step.
    return 'fp16'


# each precision as the device line names it
PRECISIONS = dict(bf16='bf16 autocast', fp16='fp16 autocast + GradScaler', fp32='fp32')


def autocast(device):
    """ ctx, the context every forward pass runs in, and the scaler of fp16's loss, both from
    precision(device); the scaler is GradScaler(enabled=False) otherwise, which passes everything
    through: scale(loss) is loss, step(optimizer) is optimizer.step() """
    if device.type == 'cuda':  # TF32 for the matmuls autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kind = precision(device)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(kind)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return ctx, torch.amp.GradScaler(device.type, enabled=kind == 'fp16')


def describe(model, tokenizer, device):
    """ the device line (device, precision, the CPU's threads), the parameters, the shape """
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == 'cpu' else ''
    print(f"device: {device_name(device)}, {PRECISIONS[precision(device)]}{threads}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"vocabulary: {len(tokenizer.chars)} characters; model: {model_shape(model, sep=', ')}")


def start_training(run, model, tokenizer, splits, cfg, checkpoint, device, ctx, scaler):
    """ the optimizer, a resumed run's random state, torch.compile and DDP, the log: what the loop needs """
    # a signal reaches each process at its own moment, maybe one before a step's all_reduce and another after:
    # so under torchrun the loop acts on the signals all processes agree on at that all_reduce (after_step),
    # and every process stops after the same step (one that stopped alone would leave the others waiting)
    if run.world == 1:
        run.stop = run.signals
    run.raw_model, run.tokenizer, run.splits, run.device, run.ctx = model, tokenizer, splits, device, ctx
    run.scaler = scaler
    run.text = text_stamp(cfg.input_file)
    if checkpoint and checkpoint.get('processes', 1) != run.world:
        print(processes_changed(checkpoint.get('processes', 1), run.world, cfg))
    if cfg.torch_compile:
        check_compile(device)
    run.optimizer = configure_optimizer(model, cfg, device)  # only here: slow to build, sampling needs none
    if checkpoint:  # a resumed run continues its optimizer and its random stream
        run.optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint.get('scaler'):  # fp16's scale: none in older checkpoints, {} in bf16 and fp32
            run.scaler.load_state_dict(checkpoint['scaler'])  # a no-op for a disabled scaler
        torch.set_rng_state(checkpoint['rng_cpu'])
        if cuda and checkpoint['rng_cuda']:
            torch.cuda.set_rng_state_all(checkpoint['rng_cuda'])
    run.model = torch.compile(model) if cfg.torch_compile else model
    if run.world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == 'cuda' else None, **no_buffer_sync())
    run.ckpt_path, run.best_path, run.log_path = (
        os.path.join(cfg.out_dir, name) for name in ('ckpt.pt', 'best.pt', 'log.csv'))
    if run.rank == 0:
        start_log(run, cfg, checkpoint)
    run.loss_curve = LossCurve(cfg, model, device, on=cfg.plot and run.rank == 0)
    run.batch_rows = cfg.batch_size * cfg.gradient_accumulation_steps * run.world
    run.tokens_per_step = run.batch_rows * cfg.block_size
    print(training_line(run, cfg), flush=True)
    print(optimizer_line(run, cfg), flush=True)
    warn_long_warmup(run, cfg)  # and again if the time budget plans a run that short
    run.t_start = time.time() - run.elapsed if checkpoint else run.t_begin  # a resumed run's clock goes on
    run.t_log, run.step_log = time.time() - run.eval_spent, run.step


def training_line(run, cfg):
    """ what the run trains: to which step, and for how long at most (max_iters or max_time, whichever ends it
    first), and on how many tokens a step """
    steps = f"{plural(run.max_iters - run.step, 'step')} to step {run.max_iters}"
    if run.budget:
        steps += f" (max_iters) or as many as fit in {cfg.max_time} s (max_time), whichever is fewer"
    elif not cfg.max_time and not run.planned:
        steps += " (max_iters; max_time 0: no time limit)"
    processes = f" ({run.world} processes)" if run.world > 1 else ""
    return f"training: {steps}, {run.tokens_per_step:,} tokens per step{processes}"


def optimizer_line(run, cfg):
    """ the optimizer that runs and the learning rate's schedule, in a line """
    adamw = f"AdamW (lr {cfg.learning_rate:g}, betas {cfg.beta1:g}, {cfg.beta2:g})"
    if isinstance(run.optimizer, MuonWithAdamW):
        n = len(run.optimizer.muon.param_groups[0]['params'])
        what = (f"Muon (lr {cfg.learning_rate * cfg.muon_lr_scale:g}, momentum {cfg.muon_momentum:g}) for the "
                f"blocks' {n} matrices, {adamw} for the rest")
    else:
        what = adamw
    if cfg.embedding_lr_scale != 1:
        what += f", the embedding tables at lr {cfg.learning_rate * cfg.embedding_lr_scale:g}"
    if cfg.min_lr_frac == 1:
        schedule = 'flat' if not cfg.warmup_iters else f"{cfg.warmup_iters} warmup steps, then flat"
    else:
        schedule = f"{cfg.warmup_iters} warmup steps, then a cosine decay to {cfg.min_lr_frac:g}x at the end"
    return f"optimizer: {what}, weight decay {cfg.weight_decay:g}; learning rate: {schedule}"


def warn_long_warmup(run, cfg):
    """ a warmup as long as the run never reaches learning_rate: said, with the fix """
    if cfg.warmup_iters >= run.max_iters > run.step and cfg.learning_rate > 0:
        top = get_lr(run.max_iters - 1, cfg, run.lr_decay_iters)
        print(f"note: warmup_iters={cfg.warmup_iters} is not shorter than the run ({plural(run.max_iters, 'step')}): the "
              f"rate rises to {top:.3g} at most, not learning_rate={cfg.learning_rate:g}; set warmup_iters "
              f"below {run.max_iters} to reach it", flush=True)


# ----------------------------------------------------------------------------------------------
# the loop's state: every variable the training loop updates, declared once

@dataclass
class LoopState:
    """ Loop state: every variable the training loop updates, each declared here with what it
    means (loop_state fills in a resumed run's from its checkpoint; start_training, the parts) """
    # where the run stands (saved in the checkpoint)
    step: int = 0  # optimizer steps taken
    start_step: int = 0  # the step this call began at: 0, or the checkpoint's
    resumed_at: int = None  # the checkpoint's step: evaluated and saved already
    saved_step: int = None  # the step of ckpt.pt (a new run saves even at step 0)
    best_val_loss: float = float('inf')  # best.pt's val loss
    elapsed: float = 0.0  # seconds trained, resumes included
    training: bool = True  # any steps left to take?
    constants: dict = None  # the source of each constant (and the script's defaults): an edit is seen on resume
    # where it ends: max_iters, or sooner, the last step that fits in max_time
    max_iters: int = 0  # the last step
    lr_decay_iters: int = 0  # where the learning rate's cosine ends
    lr_moved: tuple = None  # (step, lr): where the time budget last moved that end, and the rate there
    # the time budget (max_time): it times the first steps, plans the last one, and plans again
    budget: bool = False  # this call keeps a time budget: a new run's, or one resumed before its plan
    planned: bool = False  # the time budget has planned max_iters; a resumed run keeps its plan
    deadline: float = None  # past this time the machine has slowed since the plan: the run ends
    marks: list = field(default_factory=list)  # the training clock at each step up to the first plan
    t_timed: float = None  # the training clock at the last plan: the next one times the steps since
    step_timed: int = None  # and the step then
    eval_spent: float = 0.0  # seconds spent in evaluations: the training clock is the time without them
    evals: int = 0  # evaluations this call has made (the first is slow: it warms everything up)
    eval_s: float = 0.0  # seconds of the last estimate_loss
    save_s: float = 0.0  # seconds of the rest of the last evaluation: checkpoints, log.csv, loss.png
    batch_s: float = 0.0  # seconds of a warm forward pass over one batch (timed before step 1 and at the plan)
    char_s: float = 0.0  # seconds to sample one character, warm (timed with batch_s)
    # stopping
    signals: list = field(default_factory=list)  # what this process received: Ctrl-C, SIGTERM
    stop: list = field(default_factory=list)  # what the loop acts on: the signals, agreed by all
    # clocks
    t_begin: float = None  # when the script began: a new run's time budget counts from here
    t_start: float = None  # when the run began (a resumed run's: moved back by the time it trained)
    t_log: float = None  # the training clock at the last progress line: ms/step since
    step_log: int = None  # and its step
    # processes: one, or one per device under torchrun
    rank: int = 0  # this process's number (0 alone): the first one saves and prints
    world: int = 1  # the number of processes (1 alone)
    # the parts the loop works with, set by start_training
    model: object = None  # what the loop calls: the model, compiled and wrapped for torchrun if asked
    raw_model: object = None  # the model itself: what is saved and sampled (nanoGPT's raw_model)
    optimizer: object = None  # configure_optimizer's
    tokenizer: object = None  # main's: the characters, encode and decode
    splits: dict = None  # main's: the train and val token ids
    device: object = None  # main's: where it computes
    ctx: object = None  # main's: the precision every forward runs in
    scaler: object = None  # main's: fp16's loss scaling (GradScaler); in bf16 and fp32 a no-op
    text: dict = None  # the text file's size and time of change: an edit is noticed on resume
    batch_rows: int = None  # rows of a step's batch: batch_size x accumulation x processes
    tokens_per_step: int = None  # batch_rows x block_size
    ckpt_path: str = None  # out_dir/ckpt.pt, the latest model
    best_path: str = None  # out_dir/best.pt, the model of the best val loss
    log_path: str = None  # out_dir/log.csv, a row per evaluation
    loss_curve: object = None  # draws out_dir/loss.png after each evaluation


def loop_state(cfg, checkpoint, t_begin, defaults=None):
    """ a new run's loop state, or a resumed run's, which goes on from its checkpoint """
    saved = checkpoint['config'] if checkpoint else {}
    step = checkpoint['step'] if checkpoint else 0
    planned = saved.get('planned', True) if checkpoint else False  # a budget plans once, at the start
    rank, world = rank_and_world()
    moved = saved.get('lr_moved')
    return LoopState(
        step=step, start_step=step, resumed_at=step if checkpoint else None,
        saved_step=step if checkpoint else None,
        best_val_loss=checkpoint['best_val_loss'] if checkpoint else float('inf'),
        elapsed=checkpoint.get('elapsed', 0.0) if checkpoint else 0.0,
        training=step < cfg.max_iters, constants=constant_sources(defaults),
        max_iters=cfg.max_iters,
        lr_decay_iters=saved.get('lr_decay_iters', saved.get('max_iters', cfg.max_iters)),
        lr_moved=tuple(moved) if moved else None,
        budget=cfg.max_time > 0 and not planned, planned=planned,
        t_begin=t_begin, rank=rank, world=world)


# ----------------------------------------------------------------------------------------------
# loop helpers: a step's micro-batches, what follows a step and an evaluation, the final loss

def micro_batches(run, xb, yb, accum):
    """ this process's share of the batch in accum micro-batches: one process, many, or accumulation all give
    the same step (without dropout); under torchrun the gradients are averaged after the last one only """
    shares = zip(xb.chunk(run.world)[run.rank].chunk(accum), yb.chunk(run.world)[run.rank].chunk(accum))
    for micro_step, (x, y) in enumerate(shares):
        if run.world > 1:
            run.model.require_backward_grad_sync = micro_step == accum - 1
        yield x, y


def after_step(run, cfg, loss):
    """ after a step: the loss and a stop shared by all processes, the deadline, a NaN check, progress """
    lossf, late = loss.item(), float(run.deadline is not None and time.time() > run.deadline)
    if run.world > 1:  # the mean loss of all processes; a signal to one, or a deadline, stops them all
        signals = [signal.SIGTERM in run.signals, signal.SIGINT in run.signals]
        shared = torch.tensor([lossf / run.world, *signals, late], device=run.device)
        torch.distributed.all_reduce(shared)  # a sum: each signal as the number of processes that had it
        lossf, late = shared[0].item(), shared[3].item()
        run.stop[:] = [sig for sig, n in zip((signal.SIGTERM, signal.SIGINT), shared[1:3].tolist()) if n]
    if late and run.step < run.max_iters:  # the plan is kept unless the machine slows down after it
        print(f"time budget: this machine has slowed down since the plan, so the run ends now, "
              f"at step {run.step}")
        run.max_iters = run.step
    # fp16: a step whose gradients overflowed is skipped by the scaler and the scale halved; its
    # loss, from the forward pass before any scaling, is finite. Below 1 they overflow even unscaled
    scale = run.scaler.get_scale()  # 1.0 without fp16
    if not math.isfinite(lossf) or scale < 1:
        what = (f"the loss became {lossf}" if not math.isfinite(lossf)
                else f"the gradients overflow fp16 at any loss scale (down to {scale:g})")
        kept = f"{run.ckpt_path} is from before it" if os.path.exists(run.ckpt_path) else "nothing was saved"
        clip = "" if cfg.grad_clip else " or set --grad_clip=1.0"
        die(f"{what} at step {run.step}; {kept}: "
            f"lower --learning_rate (now {cfg.learning_rate}){clip}")
    if run.step % cfg.log_interval == 0:
        print_progress(run, cfg, lossf)


def print_progress(run, cfg, lossf):
    """ the step, the loss, the speed and the time left, every log_interval steps """
    now = time.time()
    clock = now - run.eval_spent  # the training clock: ms/step counts training steps only
    dt = (clock - run.t_log) / (run.step - run.step_log)
    evals_left = run.max_iters // cfg.eval_interval - run.step // cfg.eval_interval
    left = dt * (run.max_iters - run.step) + (evals_left + 1) * (run.eval_s + run.char_s * cfg.preview_chars)
    print(f"  step {run.step}/{run.max_iters} | loss {lossf:.4f} | {dt * 1000:.0f} ms/step | "
          f"{run.tokens_per_step / dt:,.0f} tok/s | elapsed {format_time(now - run.t_start)} | "
          f"left {format_time(left)}", flush=True)
    run.t_log, run.step_log = time.time() - run.eval_spent, run.step


def plural(n, word):
    """ '1 step', '2 steps' """
    return f"{n} {word}{'s' * (n != 1)}"


def format_time(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def after_evaluation(run, cfg, losses, last_step, t0):
    """ after an evaluation: the preview, at the end the whole-split loss, a log.csv row, checkpoints """
    if cfg.preview_chars:
        print('  ' + preview(run.raw_model, run.tokenizer, cfg, run.device, run.ctx), flush=True)
    t_saves = time.time()  # what follows the preview, the final loss left out, is timed for the budget
    run.elapsed = time.time() - run.t_start
    if run.rank == 0:  # saved first: the final loss below may take a while, and a stop skips it
        if losses['val'] < run.best_val_loss and run.step > 0:
            run.best_val_loss = losses['val']
            save_checkpoint(run.best_path, run, cfg)
        if run.step > run.start_step:
            save_checkpoint(run.ckpt_path, run, cfg)
            run.saved_step = run.step
    t_final = time.time()
    whole = final_loss(run, cfg) if last_step else None
    t_final = time.time() - t_final
    if run.rank == 0:
        lr = get_lr(run.step, cfg, run.lr_decay_iters, run.lr_moved)
        append_log(run.log_path, [run.step, f"{losses['train']:.4f}", f"{losses['val']:.4f}", f"{lr:.3e}",
                                  f"{run.elapsed:.1f}", '' if whole is None else f"{whole:.4f}"])
        run.loss_curve.draw()  # out_dir/loss.png anew from log.csv
    run.save_s = time.time() - t_saves - t_final
    run.eval_spent += time.time() - t0  # the training clock leaves evaluations out
    run.evals += 1


def preview(model, tokenizer, cfg, device, ctx):
    """ a line sampled from a fixed seed, to watch the model learn; the training's randomness is untouched """
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1,1): token 0, as the lecture starts
    with ctx:
        idx = model.generate(idx, cfg.preview_chars, cfg.temperature, cfg.top_k, generator)  # (1,1+chars)
    return tokenizer.decode(idx[0, 1:].tolist()).replace('\n', ' / ')


def final_loss(run, cfg):
    """ after the last evaluation, the loss over the whole val split, exact where the estimate has a standard
    error of ~0.01; a huge split is read at evenly spread windows, and the line says so """
    whole = whole_split_loss(run.model, run.splits['val'], cfg, run.device, run.ctx, run.signals)
    starts, n = final_windows(run.splits['val'], cfg.block_size)
    where = f"{len(starts):,} windows spread over the split's {n:,}" if len(starts) < n else 'the whole split'
    if whole is None:
        print(f"step {run.step}: the val loss over {where} is skipped: stopped", flush=True)
    else:
        print(f"step {run.step}: val loss over {where} {whole:.4f}", flush=True)
    return whole


def final_windows(data, block_size):
    """ where the final loss reads the val split: every block_size window of a split up to max_tokens
    long (all of tiny Shakespeare's 111,540 characters), else max_tokens' worth spread evenly over it """
    used, n = window_count(len(data), block_size)
    return np.linspace(0, n - 1, used).round().astype(np.int64) * block_size, n  # window starts, of n


def window_count(length, block_size, max_tokens=1 << 17):
    """ how many windows the final loss reads, of the n non-overlapping ones in a split this long """
    n = (length - 1) // block_size
    return min(n, max(1, max_tokens // block_size)), n


@torch.no_grad()
def whole_split_loss(model, data, cfg, device, ctx, stop=()):
    """ the mean loss over the windows of final_windows: exact over a split up to 131,072 characters;
    None when a stop (Ctrl-C, SIGTERM) comes while it runs """
    asked = len(stop)  # a stop that came before is not one to skip this for
    rank, world = rank_and_world()
    T, B = cfg.block_size, 4 * cfg.batch_size  # forward only: 4 times the batch fits
    starts, _ = final_windows(data, T)
    total = torch.zeros(2, device=device)  # the sum of window losses, and whether a process was stopped
    model.eval()
    for i in range(rank * B, len(starts), world * B):  # under torchrun each process takes its share
        if len(stop) > asked:
            total[1] = 1
            break
        w = torch.from_numpy(data[starts[i:i + B, None] + np.arange(T + 1)].astype(np.int64))  # (B,T+1)
        with ctx:
            logits, loss = model(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device))  # (B,T)
        total[0] += loss.item() * len(w)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return None if total[1] else total[0].item() / len(starts)


# ----------------------------------------------------------------------------------------------
# the time budget: the run ends at max_iters or when max_time is spent, whichever comes first. It
# times the first steps, plans the last step from warm timings, then plans again before each
# evaluation; a plan that moves the end moves the learning rate's decay with it, without a jump

def time_budget(run, cfg):
    """ before the first step, end the run at once if even the shortest one cannot be kept; time the steps
    on the training clock (evaluations left out); plan once the first steps are warm: at step 50, or after
    4 steps when a tenth of max_time has gone by (a short budget cannot wait); plan again before each
    evaluation from the steps timed since """
    now = time.time()
    clock, k = now - run.eval_spent, run.step - run.start_step
    if not run.planned:
        run.marks.append(clock)
        if k == 0:
            run.batch_s, run.char_s = warm_timings(run, cfg)
            plan(run, cfg, step_s=None)  # only whether max_time can be kept at all
        elif k >= 4 and (run.step >= 50 or now - run.t_start > cfg.max_time / 10):
            durations = sorted(b - a for a, b in zip(run.marks[2:], run.marks[3:]))  # the first 2 are cold
            run.batch_s, run.char_s = warm_timings(run, cfg)
            plan(run, cfg, durations[len(durations) // 2])  # the median: a busy moment is left out
            run.t_timed, run.step_timed = time.time() - run.eval_spent, run.step
    elif run.step % cfg.eval_interval == 0 and run.step_timed < run.step < run.max_iters:
        plan(run, cfg, (clock - run.t_timed) / (run.step - run.step_timed))
        run.t_timed, run.step_timed = clock, run.step  # the next plan times the steps from here


@torch.no_grad()
def warm_timings(run, cfg):
    """ the seconds of a forward pass over one evaluation batch, and of one sampled character, each the
    quickest of 5 timed after 2 calls that warm it up: a run's first calls are many times slower (the first
    evaluation 2-3x, the first characters 50x), and a moment of a busy machine is left out """
    gen = torch.Generator().manual_seed(cfg.seed)  # batches of their own: the training's stream is untouched
    run.model.eval()
    batch_s = []
    for _ in range(7):
        t0 = time.time()
        X, Y = get_batch(run.splits['val'], cfg.block_size, cfg.batch_size, run.device, gen)
        with run.ctx:
            run.model(X, Y)[1].item()  # .item() waits for the GPU
        batch_s.append(time.time() - t0)
    run.model.train()
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    idx, char_s = torch.zeros((1, 1), dtype=torch.long, device=run.device), []
    for _ in range(7):  # a character a call, as sample() makes them
        t0 = time.time()
        with run.ctx:
            idx = run.raw_model.generate(idx, 1, cfg.temperature, cfg.top_k, generator)
        run.tokenizer.decode(idx[0, -1:].tolist())
        char_s.append(time.time() - t0)
    return min(batch_s[2:]), min(char_s[2:])


def evaluation_s(run, cfg):
    """ the seconds one evaluation takes: estimate_loss (as measured, once a warm one has been; before, from
    the warm forward pass), the preview, and the checkpoints, log and picture after it """
    estimate = run.eval_s if run.evals > 1 else 2 * cfg.eval_iters * run.batch_s / run.world
    return estimate + cfg.preview_chars * run.char_s + run.save_s


def plan(run, cfg, step_s):
    """ the run's last step from the seconds a step takes; the learning rate's decay moved to end there, and
    the deadline past which the machine has slowed down; said in a line. When even the shortest run (stop
    now, evaluate, the whole-split loss, the sample) cannot end within max_time, that is said instead, and
    the run ends now. step_s None: only that check """
    first = not run.planned
    val_tokens = window_count(len(run.splits['val']), cfg.block_size)[0] * cfg.block_size
    eval_s = evaluation_s(run, cfg)
    token_s = run.batch_s / (cfg.batch_size * cfg.block_size) / run.world  # a forward pass, per token
    final_s = eval_s + token_s * val_tokens + run.char_s * cfg.num_samples * cfg.max_new_tokens
    elapsed = time.time() - run.t_start
    if first and the_first_processes(elapsed + final_s > cfg.max_time, run):
        print(f"time budget {cfg.max_time} s cannot be kept: even stopping now, at step {run.step} and "
              f"{elapsed:.1f} s in, to evaluate ({eval_s:.1f} s), take the loss over the whole val split and "
              f"sample {cfg.num_samples * cfg.max_new_tokens} characters ends at about {elapsed + final_s:.0f} s; "
              f"it ends now. Set --max_time={math.ceil((elapsed + final_s) * 1.2)} or more, a larger "
              f"--eval_interval, or fewer --max_new_tokens", flush=True)
        run.max_iters = run.lr_decay_iters = run.step
        run.planned = True
        return
    if step_s is None:
        return
    n = the_first_processes(plan_steps(cfg, run.step, cfg.max_iters, step_s, elapsed, eval_s, final_s), run)
    evals = evaluations(run.step, n, cfg.eval_interval)
    end = elapsed + (n - run.step) * step_s + (evals - 1) * eval_s + final_s
    if first or n != run.max_iters:
        now = f"{n} steps" + (' (max_iters)' if n == cfg.max_iters else '')
        print(f"time budget {cfg.max_time} s: {now if first else f'now {now} (was {run.max_iters})'} at "
              f"{step_s * 1000:.0f} ms/step and {plural(evals, 'evaluation')} at {eval_s:.1f} s, done at "
              f"about {format_time(end)}", flush=True)
    move_schedule(run, cfg, n)
    said = cfg.warmup_iters >= run.max_iters  # at the start
    run.max_iters, run.planned = n, True
    run.deadline = None if n == run.step else run.t_start + 0.985 * cfg.max_time - final_s
    if first and not said:
        warn_long_warmup(run, cfg)


def the_first_processes(value, run):
    """ under torchrun, every process takes the first one's decision (value, a number); alone, value """
    if run.world == 1:
        return value
    shared = torch.tensor([float(value)], dtype=torch.float64, device=run.device)
    torch.distributed.broadcast(shared, 0)
    return type(value)(shared.item())


def move_schedule(run, cfg, end):
    """ the decay ends at step end from now on: after the warmup, the cosine goes on from the rate this step
    has, so that the rate never jumps (get_lr's moved) """
    if end != run.lr_decay_iters and run.step > cfg.warmup_iters:
        run.lr_moved = (run.step, get_lr(run.step, cfg, run.lr_decay_iters, run.lr_moved))
    run.lr_decay_iters = end


def evaluations(step, end, interval):
    """ the evaluations from step to end: at each multiple of interval from step on, and at end """
    return -(-end // interval) - -(-step // interval) + 1  # ceil(end / interval) - ceil(step / interval) + 1


def plan_steps(cfg, step, max_iters, step_s, elapsed, eval_s, final_s):
    """
    The time budget's arithmetic: the most steps, up to max_iters, whose training and evaluations, then the
    last evaluation, the whole-split loss and the sample (final_s), end within 97% of max_time (3% is kept
    for noise). A multiple of 50 when over 100 steps are left; step itself when not one more fits.
    """
    def end(n):
        return elapsed + (n - step) * step_s + (evaluations(step, n, cfg.eval_interval) - 1) * eval_s + final_s
    target = 0.97 * cfg.max_time
    n = min(max_iters, step + max(0, int((target - end(step)) / (step_s + eval_s / cfg.eval_interval))))
    while n > step and end(n) > target:  # the evaluations are counted one by one
        n -= 1
    while n < max_iters and end(n + 1) <= target:
        n += 1
    if n - step > 100 and n < max_iters:
        n -= n % 50
    return n


# ----------------------------------------------------------------------------------------------
# Muon: an optimizer for the blocks' weight matrices (optimizer = 'muon', the CPU run's)

def muon_matrices(model):
    """ the weight matrices Muon trains: the blocks' 2-D weights (attention and feed-forward) """
    return [p for n, p in model.named_parameters()
            if p.requires_grad and n.startswith('blocks.') and p.dim() == 2]


def newton_schulz(G, steps=5, eps=1e-7):
    """
    Orthogonalize G = U S V^T to about U V^T (its singular values moved into ~[0.7, 1.2]) by 5 steps of a
    quintic Newton-Schulz iteration. torch.optim.Muon does this in bfloat16, which a CPU without native bf16
    runs ~15x slower than float32, so this is the same iteration in float32. G may be a batch (N,A,B).
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:  # work on the wide side: X @ X^T is then the smaller matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        A = X @ X.mT  # (N,A,A)
        B = b * A + c * A @ A  # (N,A,A)
        X = a * X + B @ X  # (N,A,B)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """ Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D weight matrices: SGD with Nesterov momentum,
    each matrix's update orthogonalized, so that every direction of it moves by about the same amount """

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, lr_scale=1.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_scale=lr_scale))

    @torch.no_grad()
    def step(self):
        by_shape = {}  # same-shaped matrices go through Newton-Schulz together, in one call
        for group in self.param_groups:
            for p in (p for p in group['params'] if p.grad is not None):
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group['momentum'])  # buf = momentum * buf + (1 - momentum) * grad
                update = p.grad.lerp(buf, group['momentum'])  # Nesterov: a look one step ahead
                by_shape.setdefault(p.shape, []).append((group, p, update))
        for (A, B), items in by_shape.items():
            orthogonal = newton_schulz(torch.stack([update for _, _, update in items]))  # (N,A,B)
            for (group, p, _), O in zip(items, orthogonal):
                # as torch.optim.Muon(adjust_lr_fn='match_rms_adamw'): the update's RMS is about AdamW's,
                # so one learning rate and one schedule serve both
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(O, alpha=-group['lr'] * 0.2 * math.sqrt(max(A, B)))


class MuonWithAdamW:
    """ Muon and AdamW stepped as one optimizer: one list of param_groups for the schedule, one state_dict """

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # read anew each time: load_state_dict replaces each optimizer's groups
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self):
        self.muon.step()
        self.adamw.step()

    def state_dict(self):
        return dict(muon=self.muon.state_dict(), adamw=self.adamw.state_dict())

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict['muon'])
        self.adamw.load_state_dict(state_dict['adamw'])


# ----------------------------------------------------------------------------------------------
# data at scale: the text encoded once into a file on disk, then memory-mapped

def read_text_chunks(path, chunk_chars=1 << 22):
    """ the file's text, a few million characters at a time, so memory stays small for huge files """
    with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not a character
        while chunk := f.read(chunk_chars):
            yield chunk


def code_points(text):
    return np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)


def vocabulary(path):
    """ chars = sorted(set(text)): the code points that occur in the file, in sorted order """
    counts = np.zeros(0x110000, dtype=np.int64)
    for chunk in read_text_chunks(path):
        counts += np.bincount(code_points(chunk), minlength=0x110000)
    return np.flatnonzero(counts)


def encode_file(path, vocab, bin_path):
    """ data = encode(text): each character's code point -> its token id, written to bin_path """
    dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
    lookup = np.zeros(0x110000, dtype=dtype)
    lookup[vocab] = np.arange(len(vocab))
    with written_atomically(bin_path) as tmp, open(tmp, 'wb') as f:  # two runs may prepare one folder at once
        for chunk in read_text_chunks(path):
            f.write(lookup[code_points(chunk)].tobytes())
    return np.dtype(dtype).name


def prepare_data(path, cache_dir):
    """
    The text's vocabulary and the whole text as token ids (uint16, or uint32 past 65,536 characters),
    encoded into a file in cache_dir once, then memory-mapped: a text larger than memory still
    trains. The cache is rebuilt when the text file changes.
    """
    if not os.path.isfile(path):
        die(f"cannot read the input file '{path}': put a UTF-8 text file there or set --input_file")
    key = dict(file=os.path.abspath(path), **text_stamp(path))
    meta_path, bin_path = os.path.join(cache_dir, 'data.json'), os.path.join(cache_dir, 'data.bin')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        if meta['key'] == key:
            return list(meta['chars']), np.memmap(bin_path, dtype=meta['dtype'], mode='r')
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a stale or damaged one: build it
    try:  # an interrupted or failed preparation leaves no half-written file behind
        vocab = vocabulary(path)
        if len(vocab) == 0:
            die(f"the input file '{path}' is empty: give it some text to learn from")
        dtype = encode_file(path, vocab, bin_path)
        meta = dict(key=key, chars=''.join(chr(c) for c in vocab), dtype=dtype)
        with written_atomically(meta_path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f)
    except UnicodeDecodeError as e:
        die(not_utf8(path, e))
    except OSError as e:
        die(f"cannot encode '{path}' into {cache_dir} ({e.strerror}): free some disk space or set --out_dir")
    return list(meta['chars']), np.memmap(bin_path, dtype=meta['dtype'], mode='r')


def not_utf8(path, e):
    """ what to say of a text that is not UTF-8: UTF-16 (as some editors save) is named, with the fix """
    with open(path, 'rb') as f:
        head = f.read(1024)
    if head[:2] in (b'\xff\xfe', b'\xfe\xff') or head.count(0) > len(head) // 4:
        return (f"the input file '{path}' is UTF-16 text, not UTF-8: save it as UTF-8 "
                f"(e.g. iconv -f UTF-16 -t UTF-8 '{path}' > input-utf8.txt, then --input_file=input-utf8.txt)")
    return (f"the input file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} cannot be read): "
            f"save it as UTF-8")


def text_stamp(path):
    """ the text file's size and time of last change: a new encoding, or a note when a text changed """
    st = os.stat(path)
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns)


def download(url, sha256, path):
    """ fetch the default text once, check its checksum, write it atomically """
    import requests
    print(f"{path} not found: downloading tiny Shakespeare from {url}")
    try:
        r = requests.get(url, timeout=30)
        r.raise_for_status()
    except requests.RequestException as e:
        die(f"{path} is missing and the download failed ({type(e).__name__}): "
            f"put a UTF-8 text file at {path} or set --input_file")
    if hashlib.sha256(r.content).hexdigest() != sha256:
        die(f"the file downloaded from {url} has the wrong checksum: put the text at {path} yourself")
    with written_atomically(path) as tmp, open(tmp, 'wb') as f:
        f.write(r.content)


def check_text_against(checkpoint, chars, cfg):
    """ a resumed model goes on with the characters it learned; a text edited since is said """
    if ''.join(chars) != checkpoint['chars']:
        learned = checkpoint['config']['input_file']
        same_file = os.path.abspath(cfg.input_file) == os.path.abspath(learned)
        what = (f"{cfg.input_file} has changed since the model learned it" if same_file
                else f"{cfg.input_file} is not the text the model learned ({learned})")
        new = ''.join(sorted(set(chars) - set(checkpoint['chars'])))
        gone = ''.join(sorted(set(checkpoint['chars']) - set(chars)))
        die(f"{what}, and its vocabulary differs (new: {shown(new[:20])}, gone: {shown(gone[:20])}): "
            f"resume on the text it learned, or train a new model with another --out_dir")
    stamp = text_stamp(cfg.input_file)
    if checkpoint.get('text', stamp) != stamp:
        print(f"note: {cfg.input_file} has changed since step {checkpoint['step']} was saved "
              f"(same characters): training goes on with the text as it is now")


def check_splits(splits, cfg):
    """ each split must be longer than a block: a block of inputs and its targets, one further """
    for split, d in splits.items():
        if len(d) < cfg.block_size + 1:
            die(f"{cfg.input_file} is too short for block_size={cfg.block_size}: its {split} split has "
                f"{len(d)} characters and needs {cfg.block_size + 1}; "
                f"use a longer text or a smaller --block_size")


# ----------------------------------------------------------------------------------------------
# checkpoints and the log: everything needed to resume exactly or sample later, a row per evaluation

def save_checkpoint(path, run, cfg):
    """ everything needed to resume exactly or to sample later; written to a temporary file, then renamed """
    checkpoint = dict(
        model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),  # fp16's loss scale, its growth tracker; {} in bf16 and fp32
        model_class=type(run.raw_model).__name__, model_args=asdict(run.raw_model.config),
        config={**vars(cfg), 'max_iters': run.max_iters, 'lr_decay_iters': run.lr_decay_iters,
                'lr_moved': run.lr_moved, 'planned': run.planned,  # the settings, with the loop's plan
                'input_file': os.path.abspath(cfg.input_file)},  # found again from any folder
        constants=run.constants,  # the file's lines as they were: an edit made before a resume is seen
        text=run.text, processes=run.world, command=command_of(type(run.raw_model)),
        step=run.step, best_val_loss=run.best_val_loss, elapsed=run.elapsed, chars=run.tokenizer.chars,
        rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state_all() if cuda else [],
    )
    try:
        with written_atomically(path) as tmp:  # a crash mid-save leaves the previous checkpoint as it was
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as e:  # torch says a full disk as "unexpected pos": say it plainly
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 64 << 20
        full = full or getattr(e, 'errno', 0) == errno.ENOSPC
        why = 'no space left on the disk' if full else first_line(e)
        die(f"could not write {path} ({why}); the previous checkpoint is intact: "
            f"free some disk space or set --out_dir, then resume with --init_from=resume")


def load_checkpoint(path, model_class):
    """ a checkpoint of this script, read as plain tensors and values (weights_only: it cannot run code) """
    if not os.path.exists(path):
        die(no_checkpoint(path, model_class))
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        for key in ('model_class', 'model', 'chars', 'step', 'config'):
            checkpoint[key]
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all: whatever torch raises
        die(f"{path} is damaged or not a checkpoint of gpt.py ({type(e).__name__}): "
            f"delete it, or use --init_from=scratch")
    if checkpoint['model_class'] != model_class.__name__:
        other = checkpoint.get('command')  # how the run that saved it was started
        if other and other != command_of(model_class):
            die(f"{path} holds a {checkpoint['model_class']}, not a {model_class.__name__}: "
                f"resume or sample it with {other} --out_dir={os.path.dirname(path) or '.'}")
        die(f"{path} holds a {checkpoint['model_class']}, not a {model_class.__name__}: "
            f"use another --out_dir")
    return checkpoint


def no_checkpoint(path, model_class):
    """ what to say when there is no checkpoint to resume or sample from, and what to do instead """
    folder, name = os.path.split(path)
    if name == 'best.pt' and os.path.exists(os.path.join(folder, 'ckpt.pt')):
        return f"no checkpoint at {path} (a run saves one when its val loss improves): use --init_from=resume"
    busy = lock_holder(folder)
    if busy:
        return (f"no checkpoint at {path} yet: a run is training in {folder} ({busy}) and saves at its "
                f"first evaluation: wait for it, or set --out_dir")
    kept = os.path.join(folder, 'previous')
    earlier = ''
    if os.path.isdir(kept) and os.listdir(kept):
        latest = os.path.join(kept, sorted(os.listdir(kept))[-1])
        earlier = f"; earlier runs are kept in {kept}, e.g. --out_dir={latest}"
    return f"no checkpoint at {path}: train one first ({command_of(model_class)}), or set --out_dir{earlier}"


def command_of(model_class):
    """ the command that trains model_class: python gpt.py, python bigram.py, ... (saved with it) """
    script = os.path.basename(sys.modules[model_class.__module__].__file__)
    return getattr(model_class, 'command', f"python {script}")


def keep_previous_run(out_dir):
    """ a new run never overwrites a trained model: the last run's files move to out_dir/previous/<date> """
    names = ('ckpt.pt', 'best.pt', 'log.csv', 'loss.png', 'attention.png')
    files = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if not {'ckpt.pt', 'best.pt'} & set(files):
        return None
    when = time.strftime('%Y%m%d-%H%M%S', time.localtime(os.path.getmtime(os.path.join(out_dir, files[0]))))
    dest, k = os.path.join(out_dir, 'previous', when), 1
    while os.path.exists(dest):
        dest, k = os.path.join(out_dir, 'previous', f'{when}-{k}'), k + 1
    os.makedirs(dest)
    for name in files:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    print(f"the previous run's model is kept in {dest} (sample it with --out_dir={dest} --init_from=resume)")
    return dest


def start_log(run, cfg, checkpoint):
    """
    log.csv, with a row per evaluation. A new run moves the previous run aside (keep_previous_run) and starts
    an empty log. A run trained on from best.pt is a new branch of its run: that run is moved aside too, and
    the branch's log starts with its rows up to best.pt's step. A resumed run keeps the rows up to its
    checkpoint, so no step is logged twice, even after a save that failed.
    """
    kept = keep_previous_run(cfg.out_dir) if not checkpoint or cfg.init_from == 'best' else None
    old = os.path.join(kept, 'log.csv') if kept else run.log_path
    rows = []
    if checkpoint and os.path.exists(old):
        with open(old, newline='') as f:
            rows = [row for row in csv.reader(f)][1:]
        rows = [row for row in rows if row and int(row[0]) <= run.step]
    header = ['step', 'train_loss', 'val_loss', 'lr', 'elapsed_s', 'whole_val_loss']
    try:
        with written_atomically(run.log_path) as tmp, open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows([header] + rows)
    except OSError as e:
        die(f"cannot write {run.log_path} ({e.strerror}): free some disk space or set --out_dir")


def append_log(path, row):
    """ one row of log.csv; a full disk is one line of error, with the checkpoints already saved """
    try:
        with open(path, 'a', newline='') as f:
            csv.writer(f).writerow(row)
    except OSError as e:
        die(f"cannot write {path} ({e.strerror}): free some disk space, then resume with --init_from=resume")


@contextmanager
def written_atomically(path):
    """ a temporary path beside path (this process's own); once written, it replaces path in one rename:
    a reader never sees half a file, and a crash or a full disk leaves the previous file as it was """
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# the one-run lock: one training run per out_dir, and an out_dir known to be writable before it starts

@contextmanager
def one_run_at_a_time(out_dir, on=True):
    """ a second training run in a busy out_dir is refused in one line that names the first; the lock is the
    operating system's (flock on out_dir/run.lock), so a run that crashes or is killed leaves none behind """
    if not on or fcntl is None:  # Windows has no flock: no lock there
        yield
        return
    f = open(os.path.join(out_dir, 'run.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip() or 'another process'
        f.close()
        die(f"{out_dir} is in use by another training run ({who}): wait for it to end, stop it, "
            f"or set --out_dir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()  # and the lock with it


def lock_holder(out_dir):
    """ the training run that holds out_dir's lock now, as its lock file names it; None if none """
    path = os.path.join(out_dir, 'run.lock')
    if fcntl is None or not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken only while no run holds it
        except OSError:
            return f.read().strip() or 'another process'
    return None


def check_out_dir(out_dir):
    """ find out now, not after an hour of training, that checkpoints cannot be written """
    try:
        os.makedirs(out_dir, exist_ok=True)
        test_file = os.path.join(out_dir, f'.write_test{os.getpid()}')
        open(test_file, 'w').close()
        os.remove(test_file)
    except OSError as e:
        die(f"cannot write to out_dir '{out_dir}' ({e.strerror}): set --out_dir to a writable folder")


# ----------------------------------------------------------------------------------------------
# pictures: the loss curve and each head's attention, drawn with matplotlib where it is installed
# (it is optional: without it a run trains and samples as before, and says so once)

def new_figure(width, height, layout=None):
    """ a matplotlib figure (inches) drawn by Agg into a file: imported on first use, never a window, and
    pyplot's global backend (a notebook's) left as it is """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path):
    """ the figure as a PNG, written to a temporary file, then renamed: a reader never sees half a picture """
    with written_atomically(path) as tmp:
        fig.savefig(tmp, format='png')


# fonts with the CJK characters that matplotlib's font (DejaVu Sans) lacks: Linux, macOS, Windows
FALLBACK_FONTS = ('Noto Sans CJK JP', 'Noto Sans CJK SC', 'Noto Sans CJK TC', 'Noto Sans CJK KR',
                  'Source Han Sans', 'WenQuanYi Zen Hei', 'WenQuanYi Micro Hei',
                  'Droid Sans Fallback', 'IPAGothic', 'IPAexGothic', 'Hiragino Sans', 'PingFang SC',
                  'Apple SD Gothic Neo', 'Yu Gothic', 'MS Gothic', 'Microsoft YaHei',
                  'Malgun Gothic', 'Arial Unicode MS')


def font_families(families, installed):
    """ the fonts text is drawn in: families (matplotlib's setting) first, then the installed ones
    of FALLBACK_FONTS, where matplotlib finds a character that the fonts before them lack """
    return [*families, *(f for f in FALLBACK_FONTS if f in installed and f not in families)]


@contextmanager
def drawing():
    """ while a picture is drawn: a character that matplotlib's font lacks (a CJK one) drawn in an
    installed font that has it, and one that no font has drawn as a box, without a warning """
    import matplotlib
    from matplotlib import font_manager
    installed = {font.name for font in font_manager.fontManager.ttflist}
    families = font_families(matplotlib.rcParams['font.family'], installed)
    with matplotlib.rc_context({'font.family': families}), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def literal(text):
    """ text that matplotlib shows as it is: a $ is a dollar sign, never the start of $math$ """
    return text.replace('$', r'\$')


VISIBLE = {'\n': '\u21b5', '\t': '\u21e5'}  # a newline and a tab as the signs for return and tab


def char_label(ch):
    """ a character as a tick label: a space (as an open box), a newline and a tab made visible """
    return literal({' ': '\u2423', **VISIBLE}.get(ch, ch))


def quoted(text, width=60):
    """ text in quotes as it is, a newline and a tab made visible, a line every width characters """
    shown = "'" + ''.join(VISIBLE.get(c, c) for c in text) + "'"
    return '\n'.join(shown[i:i + width] for i in range(0, len(shown), width))


def attention_heads(model):
    """ every Head of the model, grouped by the module that holds them: {group: [(name, head)]} """
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, Head):
            groups.setdefault(name.rpartition('.')[0] or name, []).append((name, module))
    return groups


def model_shape(model, sep=': '):
    """ 'GPTLanguageModel: 6 layers, 6 heads, n_embd 384, block_size 256', from the model's parts:
    its Blocks (layers) and the heads in each; a model without blocks, its heads ('1 head') """
    groups, c = attention_heads(model), model.config
    layers = sum(isinstance(m, Block) for m in model.modules())
    heads = max(map(len, groups.values()), default=0) if layers else sum(map(len, groups.values()))
    shape = [plural(layers, 'layer')] * (layers > 0)
    shape += [plural(heads, 'head'), f"n_embd {c.n_embd}"] * (heads > 0)
    return f"{type(model).__name__}{sep}{', '.join([*shape, f'block_size {c.block_size}'])}"


def device_name(device):
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == 'cuda' else str(device)


def read_log(path):
    """ log.csv as [(step, train_loss, val_loss, whole_val_loss or None)], a resumed run's whole history """
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    return [(int(row['step']), float(row['train_loss']), float(row['val_loss']),
             float(row['whole_val_loss']) if row.get('whole_val_loss') else None) for row in rows]


@drawing()
def draw_loss_curve(log_path, path, title):
    """ train and val loss (the estimates) against the step, and the whole-split val loss as marked points """
    from matplotlib.ticker import MaxNLocator
    rows = read_log(log_path)
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    steps = [r[0] for r in rows]
    ax.plot(steps, [r[1] for r in rows], '.-', label='train loss (estimate)')
    ax.plot(steps, [r[2] for r in rows], '.-', label='val loss (estimate)')
    whole = [(r[0], r[3]) for r in rows if r[3] is not None]
    if whole:
        ax.plot(*zip(*whole), 'D', color='black', label='val loss over the whole split')
    ax.set(xlabel='step', ylabel='loss', title=literal(title))
    # ticks at whole steps only, at the round numbers of matplotlib's own choice (0, 1000, ..., 5000)
    ax.xaxis.set_major_locator(MaxNLocator('auto', steps=[1, 2, 5, 10], integer=True, min_n_ticks=1))
    ax.ticklabel_format(axis='y', useOffset=False)  # each loss in full: 4.1375, never 1e-4+4.137
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.09, right=0.97, top=0.88, bottom=0.11)  # fixed: twice as fast as a layout
    widen_left_margin(fig, ax)
    save_figure(fig, path)


def widen_left_margin(fig, ax, pad=4):
    """ the left margin made as wide as the y-axis's tick labels and label need (close losses have
    wide labels, 4.1375): measured, rather than laid out by matplotlib, twice as slow to draw """
    left = ax.yaxis.get_tightbbox(fig.canvas.get_renderer()).x0  # pixels
    if left < pad:
        fig.subplots_adjust(left=fig.subplotpars.left + (pad - left) / fig.bbox.width)


class LossCurve:
    """ out_dir/loss.png, drawn anew from log.csv after each evaluation; a missing matplotlib, or any
    error while drawing, is said in one line, once, and the run goes on without the picture """

    def __init__(self, cfg, model, device, on=True):
        self.log_path, self.path = os.path.join(cfg.out_dir, 'log.csv'), os.path.join(cfg.out_dir, 'loss.png')
        self.title = f"{model_shape(model)}\non {device_name(device)}"
        self.on = on

    def draw(self):
        if not self.on:
            return
        try:
            draw_loss_curve(self.log_path, self.path, self.title)
        except Exception as e:  # a picture never stops a run
            self.on = False
            why = ('cannot import matplotlib: pip install matplotlib' if isinstance(e, ImportError)
                   else f"{type(e).__name__}: {first_line(e)}")
            print(f"{self.path} is not drawn ({why}); the run goes on without it", flush=True)


@contextmanager
def keeping_attention(model):
    """ for a while, every Head runs its own forward, the lecture's code, and keeps its softmaxed wei:
    the fused kernel of MultiHeadAttention computes no wei, so it is turned off """
    fused = {m: m.fused for m in model.modules() if isinstance(m, MultiHeadAttention)}
    heads = [m for m in model.modules() if isinstance(m, Head)]
    for m in fused:
        m.fused = False
    for h in heads:
        h.keep_wei = True
    try:
        yield
    finally:
        for m, was_fused in fused.items():
            m.fused = was_fused
        for h in heads:
            h.keep_wei, h.wei = False, None


@torch.no_grad()
def attention_maps(model, idx):
    """ each head's softmaxed wei for one sequence idx (1,T), as its Head computes it in the model's forward:
    {group: [(name, (T,T))]}, row t the query at position t, column s how much it attends to the key at s """
    groups = attention_heads(model)
    was_training = model.training
    model.eval()  # no dropout
    try:
        with keeping_attention(model):
            model(idx)
            for name, head in (nh for heads in groups.values() for nh in heads):
                if head.wei is None:
                    die(f"{name} computed no attention weights in {type(model).__name__}'s forward: "
                        f"cannot draw them")
            maps = {g: [(name, head.wei[0].float().cpu()) for name, head in heads]
                    for g, heads in groups.items()}
    finally:
        model.train(was_training)
    return maps


@drawing()
def draw_attention(maps, chars, path, title):
    """ one heatmap per head, a row of them per layer: row t, how much the character at t attends to each """
    T, rows, cols = len(chars), len(maps), max(map(len, maps.values()))
    size = min(max(2.5, 0.16 * T + 1), 8)  # inches per head: room for a label per character
    height = size * rows + 0.4 + 0.2 * (title.count('\n') + 1)  # 0.2 inches a line of the title
    fig = new_figure(size * cols + 1, height, layout='constrained')
    labels = [char_label(c) for c in chars]
    ticks = range(0, T, math.ceil(T / 48))  # at most 48 labels on an axis
    for r, heads in enumerate(maps.values()):
        for c, (name, wei) in enumerate(heads):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            image = ax.imshow(wei.numpy(), cmap='Blues', vmin=0, vmax=1)  # 0 is white: the masked future
            ax.set_title(name, fontsize=9)
            ax.set_xticks(ticks)
            ax.set_xticklabels([labels[i] for i in ticks], fontsize=7)
            ax.set_yticks(ticks)
            ax.set_yticklabels([labels[i] for i in ticks], fontsize=7)
            ax.set(xlabel='key (attended to)' if r == rows - 1 else '',
                   ylabel='query (attending)' if c == 0 else '')
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label='attention weight')
    widen_to_fit(fig, fig.suptitle(literal(title)))
    save_figure(fig, path)


def widen_to_fit(fig, text, pad=0.15):
    """ the figure widened, if need be, to hold text (its title) with pad inches on each side """
    width = text.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi + 2 * pad
    if width > fig.get_figwidth():
        fig.set_figwidth(width)


def draw_prompt_attention(model, tokenizer, cfg, device):
    """ --attention=True: each head's attention over the prompt's characters, into out_dir/attention.png """
    block_size = model.config.block_size
    text = cfg.prompt[-block_size:]  # the context the model sees when it samples the next character
    if len(text) < len(cfg.prompt):
        print(f"attention: the prompt is longer than block_size {block_size}; "
              f"drawing its last {block_size} characters")
    idx = torch.tensor([tokenizer.encode(text)], dtype=torch.long, device=device)  # (1,T)
    path = os.path.join(cfg.out_dir, 'attention.png')
    title = f"{model_shape(model)}\nattention over {quoted(text)}"
    draw_attention(attention_maps(model, idx), text, path, title)
    print(f"attention of each head over the prompt: {path}", flush=True)


def check_pictures(cfg):
    """ --attention=True needs a prompt to draw and matplotlib to draw it with """
    if cfg.attention and not cfg.prompt:
        die("--attention=True draws each head's attention over the prompt: "
            "give one, e.g. --prompt=\"ROMEO: \"")
    if cfg.attention:
        try:
            new_figure(1, 1)
        except ImportError:
            die("--attention=True draws with matplotlib, which cannot be imported: pip install matplotlib")


# ----------------------------------------------------------------------------------------------
# the command line: --name=value settings, checked before any time is spent

def read_constant_lines(path=__file__):
    """ the constants at the top as {name: (value as written, comment)}, read from this file: --help shows
    the comments, and a resume sees which values were edited """
    source = open(path, encoding='utf-8').read()
    block = source.split('# hyperparameters\n', 1)[1].split('# ----', 1)[0]
    lines = re.findall(r'^([a-z_0-9]+) = (.*?)(?:  # (.*))?$', block, flags=re.M)
    return {name: (text, comment) for name, text, comment in lines if name != 'cuda'}


def read_constants(path=__file__):
    """ the constants above as {name: comment} """
    return {name: comment for name, (_, comment) in read_constant_lines(path).items()}


def get_config(argv, defaults=None):
    """ the constants, the caller's defaults, then --name=value arguments on top; also the arguments alone """
    comments = read_constants()
    config = {name: globals()[name] for name in comments}
    config.update(defaults or {})
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print_help(config, comments)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            die(f"cannot read '{arg}': write settings as --name=value, e.g. --max_iters=200 (see --help)")
        if name not in config:
            close = difflib.get_close_matches(name, config, n=3)
            die(f"unknown setting '{name}'"
                + (f"; did you mean {', '.join(close)}?" if close else ": see --help"))
        config[name] = overrides[name] = parse_value(name, text, config[name])
    return SimpleNamespace(**config), overrides


def print_help(config, comments):
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--name=value ...]   "
             "(numbers and True/False as Python writes them; text as it is, without quotes)"]
    lines += [f"  {f'--{k}={v!r}':<28}  {comments.get(k, '')}" for k, v in config.items()]
    print('\n'.join(lines))
    raise SystemExit(0)


def parse_value(name, text, default):
    """ text is taken as written; numbers and True/False as Python literals of the constant's type """
    if isinstance(default, str):
        return text  # never evaluated
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        kind = type(default).__name__
        die(f"--{name} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} (like --{name}={default!r}), "
            f"not '{text}'")
    return value


def check_config(cfg):
    """ refuse settings that cannot work before any data is read or any time is spent """
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"{name} must be a finite number, not {value}")
    for name in ('block_size', 'n_embd', 'n_head', 'n_layer', 'batch_size', 'gradient_accumulation_steps',
                 'eval_interval', 'eval_iters', 'log_interval', 'num_samples'):
        if getattr(cfg, name) <= 0:
            die(f"{name} must be positive, not {getattr(cfg, name)}")
    for name in ('max_iters', 'max_time', 'max_new_tokens', 'learning_rate', 'min_lr_frac', 'warmup_iters',
                 'weight_decay', 'grad_clip', 'temperature', 'top_k', 'preview_chars', 'muon_lr_scale'):
        if getattr(cfg, name) < 0:
            die(f"{name} must not be negative, not {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        die(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}): {head_choices(cfg.n_embd, cfg.n_head)}")
    if cfg.min_lr_frac > 1:
        die(f"min_lr_frac ({cfg.min_lr_frac}) must be at most 1: the decay ends at learning_rate times it, and "
            f"may not rise above learning_rate; 0.1 decays to a tenth, 1.0 keeps the rate flat")
    for name in ('dropout', 'beta1', 'beta2', 'muon_momentum'):
        if not 0 <= getattr(cfg, name) < 1:
            die(f"{name} must be at least 0 and below 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2 ** 63:
        die(f"seed must be at least 0 and below 2**63, not {cfg.seed}")
    if 0 < cfg.temperature < 1e-3:
        die(f"temperature {cfg.temperature} is too small to sample with: "
            f"use --temperature=0 for greedy decoding")
    choices = dict(activation=('relu', 'gelu'), position_embedding=('learned', 'sinusoidal'),
                   optimizer=('adamw', 'muon'), init_from=('scratch', 'resume', 'best'))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            die(f"{name} must be one of {', '.join(allowed)}, not '{getattr(cfg, name)}'")
    check_pictures(cfg)


PER_CALL = ('init_from', 'out_dir', 'device', 'attention')  # a call's own settings: where, on what, what for


def head_choices(n_embd, n_head):
    """ what to set when n_head does not divide n_embd: the nearest head counts that do, or the width
    rounded up to a multiple of n_head """
    below = next(h for h in range(n_head, 0, -1) if n_embd % h == 0)
    above = next((h for h in range(n_head, min(n_embd, 4 * n_head) + 1) if n_embd % h == 0), None)
    heads = f"n_head={below}" + (f" or {above}" if above and above != below else '')
    return f"set {heads}, or n_embd={-(-n_embd // n_head) * n_head}"


def resume_config(cfg, overrides, checkpoint, path, edited=()):
    """ a resumed run is the same run: the checkpoint's settings, then the command line's and the file's
    edits since (edited), in one line """
    saved = {'optimizer': 'adamw', **checkpoint['config']}  # a checkpoint from before Muon: AdamW's state
    saved.setdefault('embedding_lr_scale', 1.0)  # a checkpoint from before it: its optimizer has no such group
    if 'min_lr_frac' not in saved and 'min_lr' in saved:  # a checkpoint from before min_lr_frac
        saved['min_lr_frac'] = saved['min_lr'] / saved['learning_rate'] if saved['learning_rate'] else 1.0
    shape = checkpoint['model_args']

    def drop(names):  # how to take a setting back: --name, or the line edited at the top of the file
        return ' '.join(f"{k} = {saved.get(k, shape.get(k))!r} at the top" if k in edited else f"--{k}"
                        for k in names)
    fixed = [k for k, v in overrides.items()
             if k in shape and v != shape[k] and k not in ('dropout', 'fused_attention')]
    if fixed:
        die(f"a trained model keeps its shape ({', '.join(f'{k}={shape[k]!r}' for k in fixed)}): "
            f"{'put back' if set(fixed) <= set(edited) else 'drop'} {drop(fixed)}, or train a new model with "
            f"another --out_dir")
    if overrides.get('optimizer', saved['optimizer']) != saved['optimizer']:  # its state fits no other
        die(f"a run keeps its optimizer ({path} was trained with optimizer={saved['optimizer']!r}): "
            f"{'put back' if 'optimizer' in edited else 'drop'} {drop(['optimizer'])}, or train a new model "
            f"with another --out_dir")
    if overrides.get('max_time', saved.get('max_time')) != saved.get('max_time'):
        die(f"max_time sets the length of a new run; {path} continues to step {saved['max_iters']}: "
            f"{'put back' if 'max_time' in edited else 'drop'} {drop(['max_time'])}, and set --max_iters=N to "
            f"train it longer")
    loop = ('lr_decay_iters', 'lr_moved', 'planned')  # the loop's state, not settings: see loop_state
    changed = [f"{k} {saved[k]!r} -> {v!r}" + (' (edited in the file)' if k in edited else '')
               for k, v in overrides.items() if k in saved and k not in PER_CALL and saved[k] != v]
    print(f"resuming {path} at step {checkpoint['step']} with its settings"
          + (f"; changed: {', '.join(changed)}" if changed else ''))
    kept = {k: v for k, v in saved.items() if k not in PER_CALL + loop}
    return SimpleNamespace(**{**vars(cfg), **kept, **overrides})


def constant_sources(defaults=None):
    """ each setting's source: the text of its line at the top of this file, or, for a setting the script
    gives (bigram.py's defaults), its value; saved with a checkpoint, to see later which lines were edited """
    sources = {name: text for name, (text, _) in read_constant_lines().items()}
    return {**sources, **{k: repr(v) for k, v in (defaults or {}).items()}}


def edited_since(checkpoint, cfg, defaults, overrides):
    """ the settings whose line (or the script's default) was edited since the checkpoint was saved, with
    their values now: a resume takes them as it takes --name=value (the command line's own win) """
    then, now = checkpoint.get('constants') or {}, constant_sources(defaults)
    return {k: getattr(cfg, k) for k in now
            if k in then and then[k] != now[k] and k not in overrides and k not in PER_CALL}


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


# ----------------------------------------------------------------------------------------------
# processes: torchrun starts one per device; the first one prints, saves and samples

def rank_and_world():
    """ this process's rank and the number of processes: (0, 1) unless started by torchrun """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def print_in_the_first_process_only():
    """ under torchrun only the first process prints, saves and samples: the others write to nowhere """
    if os.environ.get('RANK', '0') != '0':
        sys.stdout = open(os.devnull, 'w')


def processes_changed(before, now, cfg):
    """ a run resumed with another number of processes trains on another number of tokens per step """
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    accum = cfg.gradient_accumulation_steps * before / now
    keep = f": set --gradient_accumulation_steps={accum:.0f} to keep them" if accum == int(accum) else ''
    return (f"the checkpoint was trained by {before} processes, this run has {now}: {tokens * before:,} -> "
            f"{tokens * now:,} tokens per step{keep}")


def no_buffer_sync():
    """ DistributedDataParallel's argument not to send the buffers (tril, the same everywhere) at each
    forward: forward_sync_buffers=False from PyTorch 2.13 on, where broadcast_buffers=False warns """
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    if 'forward_sync_buffers' in parameters:
        return dict(forward_sync_buffers=False)
    return dict(broadcast_buffers=False)


def check_compile(device):
    """ torch.compile needs a C++ compiler (and Triton on a GPU): find out now, not at the first step """
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2, device=device))
    except Exception as e:
        die(f"torch.compile does not work here ({type(e).__name__}: {first_line(e)}): "
            f"install a C++ compiler, or set --torch_compile=False")


def end_processes(run):
    """ under torchrun, leave the process group once training is done; this process's rank """
    rank, world = rank_and_world()
    if world > 1:
        run.model = None  # DistributedDataParallel freed before its process group: left to the exit,
        gc.collect()  # it aborts a process now and then ("terminate called without an active exception")
        torch.distributed.destroy_process_group()
    return rank


def fail_under_torchrun(e):
    """
    Under torchrun, an error reads as one line at the end of the output: the root cause in the report torchrun
    prints when a process fails. die()'s message goes to the error file torchrun gives each process, not to
    stderr where every process would print it. A process other than the first waits 2 s first: if the first
    failed too (the same settings, or this one's collective lost it), torchrun stops this one in the meantime
    and reports the first; otherwise this one's error is reported, as it would be alone.
    """
    if 'TORCHELASTIC_RUN_ID' not in os.environ or isinstance(e, SystemExit) and not isinstance(e.code, str):
        return  # not under torchrun, or an exit that is not an error message (SIGTERM's 143, --help)
    if os.environ.get('RANK', '0') != '0':
        time.sleep(2)
    if isinstance(e, SystemExit) and os.environ.get('TORCHELASTIC_ERROR_FILE'):
        try:
            with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
                message = dict(message=e.code, extraInfo=dict(timestamp=str(int(time.time()))))
                json.dump(dict(message=message), f)
        except OSError:
            return  # printed on stderr after all
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------------------------
# errors, signals and the console: one-line errors, a stop that saves, output that never breaks a run

def die(message):
    """ stop with a one-line message for the user, no traceback: every failure a user can cause """
    raise SystemExit(f"error: {message}")


def first_line(e, width=100):
    """ the first line of an exception's message, shortened at a word to width: for a one-line error """
    return textwrap.shorten((str(e).strip().splitlines() or [''])[0], width, placeholder='...')


def shown(text):
    """ text in quotes as a user typed it: a backslash stays one, a newline or a tab shows as \\n, \\t """
    return "'" + ''.join(c if c.isprintable() else c.encode('unicode_escape').decode() for c in text) + "'"


@contextmanager
def stop_on_signals(stop):
    """
    Ctrl-C or SIGTERM (kill, schedulers, torchrun) stops training after this step to save, each
    signal appended to stop. SIGTERM comes in twos and threes (a scheduler signals every process of a
    job, and torchrun passes each one on): any number are one stop, and a process stopped by it
    ignores more up to its exit (a scheduler that wants it gone sooner sends SIGKILL; a caller of
    main() that goes on after its SystemExit(143) has SIGTERM ignored). A second Ctrl-C, from a
    person, quits at once. Python takes signals in the main thread only; a notebook gets its Ctrl-C
    handler back.
    """
    def on_signal(signum, frame):
        if signum == signal.SIGTERM and signum in stop:  # the same stop, asked again
            return
        stop.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)
            print("\nCtrl-C: stopping after this step and saving (Ctrl-C again to quit at once)",
                  flush=True)
        else:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving", flush=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        # a run stopped by SIGTERM is on its way out (main() exits 143): SIGTERM is ignored up to
        # the exit, Python's shutdown included (where it would be SIGTERM's default again)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGTERM and sig in stop else handler)


class Console:
    """ python gpt.py's output: a character the console cannot show prints as '?', and a reader that goes away
    (python gpt.py | head) stops the run as SIGTERM does, saved and without a traceback """

    def __init__(self, stream):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='replace')
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self):
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # the rest goes nowhere, quietly
        os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_script(main_function, **kwargs):
    """ python gpt.py, bigram.py and lecture_steps.py all start here: main_function(argv) with the
    clock from the script's start, output that never breaks the run (Console), a quiet exit on a
    second Ctrl-C, and an error as torchrun reports it """
    sys.stdout = Console(sys.stdout)
    try:
        main_function(sys.argv[1:], t_begin=started, **kwargs)
    except KeyboardInterrupt:  # a second Ctrl-C, or one while sampling: quit quietly
        raise SystemExit(130)
    except BaseException as e:
        fail_under_torchrun(e)
        raise


if __name__ == '__main__':
    run_script(main)
