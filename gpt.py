"""
A character-level GPT, trained from scratch on one text file and then sampled: the model of the
lecture "Let's build GPT: from scratch, in code, spelled out", in the lecture's order and with its
names, made fast on CPU and GPU, with checkpoints, exact resume and sampling from a prompt.

    python gpt.py                    # train on input.txt (tiny Shakespeare), then print a sample
    python gpt.py --max_iters=200    # any constant below can be set like this, or edited in place
    python gpt.py --help             # every constant, its default and what it means
    python gpt.py --init_from=resume --max_iters=0 --prompt="ROMEO:"   # sample from the saved model

On a CUDA GPU it runs the lecture's model (6 layers, 6 heads, n_embd 384, block 256, 5000 steps).
On a CPU or Apple MPS it runs a smaller model that trains and samples in about 3 minutes.

Read it down to the divider (the line of '='): the lecture's script in the lecture's order, each part
naming its chapter of the video. What a first read can skip (the command line, checkpoints, the time
budget, torchrun, signals, pictures) comes after it, grouped by concern and called by name.
"""
import math
import os
import signal
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

started = time.time()  # when this script began: max_time counts from here, loading torch included

try:  # Ctrl-C while torch loads (a few seconds) quits quietly, as it does at any other moment
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.nn import functional as F
except KeyboardInterrupt:
    raise SystemExit(130)

# hyperparameters (video: "port our code to a script"; "scaling up the model! creating a few variables.
# adding dropout")
# Edit a line, or set it on the command line (--max_iters=200): the two do the same, on a resume too.
# `x if cuda else y` holds the lecture's run on a CUDA GPU (a comment says where not), then a laptop-size
# run on a CPU or Apple MPS. The lecture's own come first, in its order; then the others, by what they set.
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
dropout = 0.2 if cuda else 0.0  # 0 on a CPU: 3 minutes cannot overfit, and steps run faster without it
seed = 1337  # random seed of the run (the lecture's torch.manual_seed(1337))
# data
input_file = 'input.txt'  # the text to train on (UTF-8); its characters are the vocabulary
# the default text, fetched when input.txt is missing, and the checksum it must have
data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
data_sha256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
# model
activation = 'gelu'  # feed-forward non-linearity: 'relu' (the lecture) or 'gelu' (GPT-2, better)
position_embedding = 'learned'  # 'learned' (the lecture's table) or 'sinusoidal' (fixed sin/cos)
qkv_bias = False  # bias on the query/key/value projections (the lecture: no, GPT-2: yes)
fused_attention = True  # all heads in one fused kernel; False runs the lecture's Head by Head
# training
max_time = 0 if cuda else 180  # seconds, start to the sample's end (0 = none): max_iters or this ends the run
log_interval = 100  # print progress every this many steps
min_lr_frac = 0.1 if cuda else 0.06  # the cosine ends at learning_rate times this (the lecture: flat, 1.0)
warmup_iters = 100 if cuda else 50  # steps of linear warmup to learning_rate (the lecture: none)
weight_decay = 0.1  # on the weight matrices only, AdamW's and Muon's (the lecture: 0.01 on all)
beta1 = 0.9  # AdamW beta1
beta2 = 0.99 if cuda else 0.95  # AdamW beta2 (the lecture: 0.999); lower, as each step sees few tokens
grad_clip = 1.0  # clip the gradient norm at this value (0 = off, as the lecture)
optim = 'adamw' if cuda else 'muon'  # 'adamw' (the lecture's, every weight), or 'muon' for the blocks' matrices
muon_lr_scale = 1.2  # Muon's learning rate: learning_rate times this, on the same schedule
embedding_lr_scale = 1.0 if cuda else 3.0  # the embedding tables' rate: learning_rate times this
muon_momentum = 0.9  # Muon's (Nesterov) momentum; 0.95 is usual, 0.9 suits a short run
gradient_accumulation_steps = 1  # micro-batches per step: a larger batch than fits in memory
# sampling
prompt = ''  # text the sample starts from; '' starts from token 0 (a newline here), as the lecture
plot_attention = False  # before sampling, draw each head's attention over the prompt: out_dir/attention.png
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
precision = 'auto'  # 'auto' (bf16 where the GPU has it, or the CPU and a wide model), 'fp32', 'bf16', 'fp16'
# ----------------------------------------------------------------------------------------------
# data: every character of the text is a token, and the text becomes one long row of token ids
# (video: "reading and exploring the data"; "tokenization, train/val split")

class CharTokenizer:
    """ the lecture's tokenizer: every distinct character of the text is one token """

    def __init__(self, chars):
        self.chars = ''.join(chars)  # the unique characters, found in the text by prepare_data
        # create a mapping from characters to integers
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = {i: ch for i, ch in enumerate(chars)}

    def encode(self, s):
        """ encoder: take a string, output a list of integers (a character never seen: an error) """
        # it encodes the prompt (its characters checked by load_data); the text is encoded by prepare_data
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
    # here are all the unique characters that occur in this text, and the text encoded (prepare_data)
    chars, data = prepare_data(cfg.input_file, cfg.out_dir)
    if checkpoint:  # a trained model goes on only with the characters it knows
        check_text_against(checkpoint, chars, cfg)
    # Train and test splits
    n = int(0.9 * len(data))  # first 90% will be train, rest val
    splits = dict(train=data[:n], val=data[n:])
    check_splits(splits, cfg)  # each split must hold at least one block and its targets
    return chars, splits


# data loading (video: "data loader: batches of chunks of data")
def get_batch(data, block_size, batch_size, device, generator=None):
    """ generate a small batch of data of inputs x and targets y (generator: an evaluation's own) """
    # batch_size random places in data (the token ids prepare_data maps from disk); y is x shifted by one
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])  # (B,T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])  # (B,T)
    if device.type == 'cuda':  # pinned memory lets the copy to the GPU overlap with compute
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()  # (video: "port our code to a script")
def estimate_loss(model, run, cfg, batches=None):
    """ the mean loss over eval_iters batches of each split, the same ones at every evaluation (or over the
    batches given: the final loss); run is the loop's state (LoopState, below the divider) """
    out = {}
    model.eval()
    # eval_batches (below the divider): eval_iters batches of each split, from a generator seeded anew
    for split, split_batches in (batches or eval_batches(run, cfg)).items():
        losses = []
        for k, (X, Y) in enumerate(split_batches):
            if k % run.world == run.rank:  # under torchrun each process evaluates its share of the batches
                with run.ctx:  # ctx: the precision of the forward pass (fp32, or autocast: below the divider)
                    logits, loss = model(X, Y)
                losses.append((loss.item(), len(X)))
        out[split] = mean_loss(losses, run)  # the mean over every process's batches, by their rows
    model.train()
    return out


# ----------------------------------------------------------------------------------------------
# the model: token and position embeddings, blocks of self-attention and feed-forward, a head

@dataclass
class GPTConfig:
    """ the shape of the model: all a checkpoint needs to rebuild it. main passes every field (build_model);
    the defaults, the constants, serve a model built by hand, as the tests build them """
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


# Which attention code runs: by default (fused_attention = True) MultiHeadAttention computes all its heads
# at once, with the same weights, in all_heads_at_once. Head's own forward, the lecture's code, runs with
# --fused_attention=False (and for the pictures, or with dropout on a CPU); a test checks both agree.

# (video: "THE CRUX OF THE VIDEO: version 4: self-attention")
class Head(nn.Module):
    """ one head of self-attention """

    def __init__(self, config, head_size):
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.query = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.n_embd, head_size, bias=config.qkv_bias)
        tril = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer('tril', tril, persistent=False)  # a constant; the fused path masks by is_causal
        self.dropout = nn.Dropout(config.dropout)  # dropout is 0 on a CPU: it passes wei through
        self.keep_wei = False  # True: forward keeps its softmaxed wei in self.wei, for the pictures
        self.wei = None

    def forward(self, x):
        # runs with --fused_attention=False, for the pictures, or to train on a CPU with dropout; else all_heads_at_once
        # input of size (batch, time-step, channels), output of size (batch, time-step, head size)
        B, T, C = x.shape
        # each token emits a key (what it contains) and a query (what it looks for)
        k = self.key(x)  # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities"), scaled by the head size (the video scales by C;
        # video: "note 6: "scaled" self-attention. why divide by sqrt(head_size)")
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


# (video: "multi-headed self-attention")
class MultiHeadAttention(nn.Module):
    """ multiple heads of self-attention in parallel """

    def __init__(self, config):
        super().__init__()
        head_size = config.n_embd // config.n_head  # the heads side by side are n_embd wide again
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        self.proj = nn.Linear(head_size * config.n_head, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)  # (0 on a CPU: passes through)
        self.fused = config.fused_attention  # all_heads_at_once, below (the default)
        self.attn_dropout = config.dropout

    def forward(self, x):
        # fused, unless training on a CPU with dropout: there PyTorch's fallback is slower than the lecture's
        if self.fused and not (self.training and self.attn_dropout > 0 and x.device.type == 'cpu'):
            out = self.all_heads_at_once(x)  # (B,T,C)
        else:  # the lecture's way: each Head, and their outputs side by side
            out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B,T,C)
        # the projection back into the residual pathway
        out = self.dropout(self.proj(out))
        return out

    def all_heads_at_once(self, x):
        """ the same heads with the same weights: one matmul for all q, k, v, one fused kernel (video:
        "super quick walkthrough of nanoGPT, batched multi-headed self-attention") """
        B, T, C = x.shape
        nh = len(self.heads)
        # every head's query, key and value weights stacked into one matrix
        w = torch.cat([h.query.weight for h in self.heads] + [h.key.weight for h in self.heads]
                      + [h.value.weight for h in self.heads])  # (3C,C)
        b = None if self.heads[0].query.bias is None else torch.cat(
            [h.query.bias for h in self.heads] + [h.key.bias for h in self.heads] + [h.value.bias for h in self.heads])
        q, k, v = F.linear(x, w, b).split(C, dim=2)  # 3 x (B,T,C)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)  # (B,nh,T,hs)
        # softmax(q @ k^T * hs**-0.5, causal mask) @ v, as in Head, without a (T,T) matrix on GPU
        p_drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)  # (B,nh,T,hs)
        return out.transpose(1, 2).reshape(B, T, C)  # heads side by side, as torch.cat: (B,T,C)


# (video: "feedforward layers of transformer block")
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
            nn.Dropout(config.dropout),  # (0 on a CPU: passes through)
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """ Transformer block: communication followed by computation """

    def __init__(self, config):
        # config.n_embd: embedding dimension, config.n_head: the number of heads we'd like
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config)
        # (video: "layernorm and its relationship to our previous batchnorm")
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)

    def forward(self, x):
        # (video: "residual connections") each sub-layer adds to x; layer norm before each (pre-norm)
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class SinusoidalPositions(nn.Module):
    """ not in the lecture, position_embedding = 'sinusoidal': the Transformer paper's fixed sin and cos """

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
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # idx and targets are both (B,T) tensor of integers
        tok_emb = self.token_embedding_table(idx)  # (B,T,C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
        x = tok_emb + pos_emb  # (B,T,C)
        x = self.blocks(x)  # (B,T,C)
        x = self.ln_f(x)  # (B,T,C)
        logits = self.lm_head(x)  # (B,T,vocab_size)

        # (video: "simplest baseline: bigram language model, loss, generation")
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
        return logits, loss

    @torch.no_grad()  # the lecture samples with autograd on and, after training, with dropout on
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
        # the sample and the preview call it for one character at a time (generate_one_by_one, below)
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
# (video: "training the bigram model" makes the optimizer and the loop)

def configure_optimizer(model, cfg, device):
    """ the lecture's torch.optim.AdamW, or with optim='muon', Muon for the blocks' weight
    matrices and AdamW for the rest (embeddings, lm_head, biases, norms) """
    matrices = muon_matrices(model) if cfg.optim == 'muon' else []
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
    # CPU minutes that trains further than AdamW; --optim=adamw runs the lecture's AdamW for all.
    # (its orthogonalization runs in bf16 where the forward does, as torch.optim.Muon's; else in fp32)
    bf16 = pick_precision(device, cfg, model)[0] == 'bf16'
    muon = Muon(matrices, lr=cfg.learning_rate, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                lr_scale=cfg.muon_lr_scale, dtype=torch.bfloat16 if bf16 else torch.float32)
    return MuonWithAdamW(muon, adamw)  # the two stepped as one optimizer


def get_lr(step, cfg, progress, warm_progress=0.0):
    """ the learning rate of a step: a linear warmup over warmup_iters steps to learning_rate, then a
    cosine decay to min_lr_frac of it over the rest of the run's progress. progress goes from 0 to 1:
    step / max_iters, or the share of max_time spent if larger (below the divider: after_step); it
    never goes back, so the rate never rises. warm_progress: its value where the warmup ended """
    min_lr = cfg.min_lr_frac * cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay = (progress - warm_progress) / max(1e-9, 1.0 - warm_progress)  # from 0 to 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay)))  # from 1 down to 0
    return min_lr + coeff * (cfg.learning_rate - min_lr)


def set_lr(optimizer, lr):
    """ the step's learning rate into every parameter group """
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)  # Muon's matrices, the CPU's tables: a multiple


# ----------------------------------------------------------------------------------------------
# training: the lecture's loop (video: "training the bigram model"; estimate_loss: "port our code to
# a script")

def train(run, cfg):
    """ the lecture's training loop; run, the loop's state (LoopState, below the divider), is what it
    updates (the step, the model, the optimizer, the data) and what the checkpoint saves """
    model, optimizer, accum = run.model, run.optimizer, cfg.gradient_accumulation_steps
    scaler = run.scaler  # fp16's loss scaling (GradScaler); in bf16 and fp32 its calls pass through
    while True:
        step = run.step
        # the loop runs once more after the last step, to evaluate and save. The last step is max_iters,
        # or the one at which max_time is spent: after_step then ends the run there (run.max_iters)
        last_step = step == run.max_iters

        # every once in a while evaluate the loss on train and val sets, and after the last step; not
        # after a stop (run.stop: Ctrl-C or SIGTERM came; it saves at once), nor at the step a resumed run
        # begins at (run.resumed_at: evaluated before it was saved, or saved by a stop)
        due = step % cfg.eval_interval == 0 and not run.stop
        if (due or last_step) and step != run.resumed_at:
            losses = estimate_loss(model, run, cfg)
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            # the preview, checkpoints, a row of log.csv, at the end the loss over the whole split
            after_evaluation(run, cfg, losses, last_step)
        if step == run.max_iters or run.stop:
            break

        # sample a batch of data: run.batch_rows is batch_size, times the micro-batches and processes below
        xb, yb = get_batch(run.splits['train'], cfg.block_size, run.batch_rows, run.device)
        # the rate of this step (the lecture's is flat: --warmup_iters=0 --min_lr_frac=1.0 runs that)
        set_lr(optimizer, get_lr(step, cfg, run.progress, run.warm_progress))

        # evaluate the loss
        optimizer.zero_grad(set_to_none=True)  # before the micro-batches: their gradients add up
        # micro_batches: this process's share of the batch (alone, with one micro-batch: the whole batch)
        for x, y in micro_batches(run, xb, yb, accum):
            with run.ctx:
                logits, loss = model(x, y)
            scaler.scale(loss / accum).backward()  # (loss / accum).backward(), scaled in fp16
        if cfg.grad_clip:  # not in the lecture: a rare huge gradient cannot throw the model off
            scaler.unscale_(optimizer)  # fp16: the true gradients, to clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # optimizer.step(): AdamW's, or Muon's and AdamW's; fp16 skips an overflow
        scaler.update()  # fp16: the scale halves after an overflow, doubles after 2000 clean steps
        run.step += 1
        # the loss shared by all processes, a stop, a NaN, the run's progress and its end, a progress line
        after_step(run, cfg, loss)
    # the loop has ended; a run stopped between two evaluations saves the step it stands at
    run.elapsed = time.time() - run.t_start  # seconds trained
    if run.rank == 0 and run.saved_step != run.step:  # ckpt.pt is not of this step yet
        save_checkpoint(run.ckpt_path, run, cfg)
    print(f"saved {run.ckpt_path} at step {run.step} ({format_time(run.elapsed)})", flush=True)  # 2m57s


# ----------------------------------------------------------------------------------------------
# sampling, a character at a time (video: "simplest baseline: bigram language model, loss, generation")

def sample(model, tokenizer, cfg, device, ctx):
    """ print num_samples samples, each character as soon as it is generated """
    context = tokenizer.encode(cfg.prompt) if cfg.prompt else [0]  # the lecture starts from token 0
    for _ in range(cfg.num_samples):
        idx = torch.tensor([context], dtype=torch.long, device=device)  # (1,T)
        print(cfg.prompt, end='', flush=True)
        # generate(idx, max_new_tokens=500), a character a call, each printed as it comes
        for token in generate_one_by_one(model, idx, cfg.max_new_tokens, cfg, ctx):
            print(tokenizer.decode([token]), end='', flush=True)
        print('\n' + '-' * 40 if cfg.num_samples > 1 else '', flush=True)


# ----------------------------------------------------------------------------------------------
# the run, in the lecture's order: settings, device, seed, data, model, optimizer, train, sample
# (video: "port our code to a script")

def main(argv=(), model_class=None, defaults=None, t_begin=None):
    """ python gpt.py: train (or resume), then sample; bigram.py and lecture_steps.py pass their own
    model and defaults """
    # max_time counts from t_begin: the script's start (run_script passes it, loading torch included), else now
    t_begin = t_begin or time.time()
    print_in_the_first_process_only()  # under torchrun (one process per device) the others train in silence
    model_class = model_class or GPTLanguageModel
    # the settings: the constants above, the caller's defaults, a resumed run's own, the command line
    cfg, checkpoint = settings(argv, defaults, model_class)
    # the lecture: device = 'cuda' if torch.cuda.is_available() else 'cpu'; here CUDA, else Apple MPS, else
    # the CPU (or --device), and under torchrun this process's GPU, having joined the others
    device = start_processes(cfg)
    torch.manual_seed(cfg.seed)  # torch.manual_seed(1337)
    # run: the loop's state, every variable the training loop updates (LoopState, below the divider)
    run = loop_state(cfg, checkpoint, device, t_begin, defaults)
    # the text, its characters, encode and decode, and the train and val splits (sampling a checkpoint
    # takes its characters and reads no text)
    tokenizer, splits = load_data(cfg, checkpoint, run)
    # model = GPTLanguageModel(); m = model.to(device)
    model = build_model(model_class, len(tokenizer.chars), cfg, checkpoint, device)
    run.ctx, run.scaler = autocast(device, cfg, model)  # the precision of every forward, fp16's scaler
    # print the number of parameters in the model
    describe(model, tokenizer, device, cfg)
    if run.training:  # steps to take (False: a checkpoint, only sampled)
        # one run at a time in out_dir; Ctrl-C or SIGTERM stops it after a step, saved
        with one_run_at_a_time(cfg.out_dir, run), stop_on_signals(run, cfg):
            # optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate); on a CPU, Muon for
            # the blocks' matrices (configure_optimizer); then the log, torch.compile, torchrun
            start_training(run, model, tokenizer, splits, cfg, checkpoint)
            train(run, cfg)
        if signal.SIGTERM in run.stop:  # asked to end: saved, so no sample
            raise SystemExit(128 + signal.SIGTERM)
    # generate from the model: end_processes leaves torchrun's group and returns the rank (0 alone), and
    # the first process samples
    if end_processes(run) == 0:
        if cfg.plot_attention:  # each head's attention over the prompt, into out_dir/attention.png
            draw_prompt_attention(model, tokenizer, cfg, device)
        # print(decode(m.generate(context, max_new_tokens=500)[0].tolist())), a character at a time
        sample(model, tokenizer, cfg, device, run.ctx)
    return model


# The script runs main() from its last lines (run_script), once everything below the divider is defined.


# ==============================================================================================
# Below the divider: what a first read can skip. main() and train() call it by name; by concern:
#   setup that main calls       settings, start_processes, load_data, build_model, autocast, describe
#   the loop's state            LoopState, loop_state
#   the loop's helpers          after_step (progress: the time budget), after_evaluation, the final loss
#   Muon                        muon_matrices, newton_schulz, Muon, MuonWithAdamW
#   data at scale               prepare_data: the text encoded once into a file, memory-mapped
#   checkpoints and the log     save_checkpoint, load_checkpoint, start_log; the one-run lock
#   pictures                    out_dir/loss.png, and each head's attention in attention.png
#   the settings                RULES, get_config, check_config, resume_config
#   processes and errors        torchrun, die, signals, the script's entry point
import ast
import csv
import difflib
import errno
import gc
import hashlib
import inspect
import json
import logging
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
except ImportError:  # Windows: no lock
    fcntl = None


# ----------------------------------------------------------------------------------------------
# setup that main calls: the settings, the device and processes, the data, the model, precision

def settings(argv, defaults, model_class):
    """ the constants, the caller's defaults, a resumed run's own settings, then the command line """
    cfg, overrides = get_config(argv, defaults)
    for name in overrides:
        if name in getattr(model_class, 'ignored_settings', ()):
            die(f"{model_class.__name__} has no {name}: drop --{name}")
    if cfg.init_from not in ('resume', 'best'):
        check_config(cfg, overrides)
        return cfg, None
    path = os.path.join(cfg.out_dir, 'ckpt.pt' if cfg.init_from == 'resume' else 'best.pt')
    checkpoint = load_checkpoint(path, model_class)
    return resume_config(cfg, overrides, checkpoint, path, defaults), checkpoint


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


def load_data(cfg, checkpoint, run):
    """ the tokenizer and the splits """
    # the text is read to train, or where no checkpoint holds the vocabulary: sampling a checkpoint writes nothing
    if checkpoint and not run.training and cfg.max_iters:
        step = checkpoint['step']
        print(f"the checkpoint is at step {step}, past --max_iters={cfg.max_iters}: sampling only" if cfg.max_iters < step
              else f"the checkpoint has finished its {step} steps: sampling only (--max_iters=N, or a larger "
                   f"--max_time, trains it on)")
    if checkpoint and not run.training:
        chars, splits = list(checkpoint['chars']), {}
    else:
        check_out_dir(cfg.out_dir)  # the data's cache and the checkpoints go there
        if run.rank > 0:
            torch.distributed.barrier()  # the first process encodes the text, then the others read it
        chars, splits = load_splits(cfg, checkpoint)
        if run.rank == 0 and run.world > 1:
            torch.distributed.barrier()
    unknown = ''.join(sorted(set(cfg.prompt) - set(chars)))
    if unknown:
        die(f"the prompt has characters the model never saw: {shown(unknown)}: {change('prompt', cfg.prompt != prompt)}")
    return CharTokenizer(chars), splits


SHAPE = ('block_size', 'n_embd', 'n_head', 'n_layer', 'activation', 'position_embedding', 'qkv_bias')


def build_model(model_class, vocab_size, cfg, checkpoint, device):
    """ the model: its shape from the checkpoint when there is one, with the checkpoint's weights """
    shape = checkpoint['model_args'] if checkpoint else dict(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in SHAPE})
    model = model_class(GPTConfig(**{**shape, 'dropout': cfg.dropout, 'fused_attention': cfg.fused_attention})).to(device)
    if cfg.plot_attention and not attention_heads(model):  # found out before any training
        die(f"{type(model).__name__} has no heads of self-attention to draw: drop --plot_attention=True")
    if cfg.optim == 'muon' and not checkpoint and not muon_matrices(model):
        die(f"{type(model).__name__} has no blocks of weight matrices for Muon to train: use --optim=adamw")
    if checkpoint:
        try:
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            die(f"the checkpoint does not fit this model ({first_line(e, 120)}): use another --out_dir")
    return model


BF16_MIN_WIDTH = 192  # n_embd from which bf16 beats fp32 on a CPU that has it (tests/bench_precision.py)
CPUINFO = '/proc/cpuinfo'  # where Linux lists what the CPU has: avx512_bf16 and amx_bf16 are bf16 in hardware
PRECISIONS = dict(bf16='bf16 autocast', fp16='fp16 autocast + GradScaler', fp32='fp32')


def pick_precision(device, cfg, model):
    """ what every forward pass computes in on device: 'bf16', 'fp16' or 'fp32', and why """
    if cfg.precision != 'auto':
        if cfg.precision != 'fp32' and device.type == 'mps':
            die(f"precision '{cfg.precision}' is not run on Apple MPS here: use --precision=fp32 (or auto)")
        if cfg.precision == 'bf16' and device.type == 'cuda' and torch.cuda.get_device_capability(device) < (8, 0):
            die(f"{torch.cuda.get_device_name(device)} has no bf16 in hardware: use --precision=fp16 (or auto)")
        return cfg.precision, f"precision={cfg.precision!r}"
    if device.type == 'cuda':
        # bf16 where the GPU has it in hardware: compute capability 8.0 (A100, RTX 30xx) and later (not
        # torch.cuda.is_bf16_supported(), True on a T4 from PyTorch 2.3 on: emulated). Older GPUs (T4, V100)
        # run fp16 on tensor cores at ~8x their fp32 speed: autocast keeps softmax, LayerNorm and the loss in
        # fp32, and the GradScaler keeps the small gradients from flushing to zero
        new = torch.cuda.get_device_capability(device) >= (8, 0)
        return ('bf16', 'the GPU has bf16') if new else ('fp16', 'the GPU has no bf16')
    if device.type != 'cpu':
        return 'fp32', 'Apple MPS'
    try:
        with open(CPUINFO) as f:
            flags = set(next((line for line in f if line.startswith('flags')), '').split())
    except OSError:  # not Linux
        flags = set()
    if not {'avx512_bf16', 'amx_bf16'} & flags:
        return 'fp32', 'the CPU has no bf16'
    if model.config.n_embd < BF16_MIN_WIDTH:  # bf16 pays once the matmuls dominate a step
        return 'fp32', f'n_embd < {BF16_MIN_WIDTH}: bf16 is slower'
    return 'bf16', 'the CPU has bf16'


def autocast(device, cfg, model):
    """ ctx, the context every forward pass runs in, and fp16's loss scaler (a GradScaler that passes everything
    through otherwise: scale(loss) is loss, step(optimizer) is optimizer.step()) """
    if device.type == 'cuda':  # TF32 for the matmuls autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    kind, _ = pick_precision(device, cfg, model)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(kind)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return ctx, torch.amp.GradScaler(device.type, enabled=kind == 'fp16')


def describe(model, tokenizer, device, cfg):
    """ the device line (device, precision and why, the CPU's threads), the parameters, the shape """
    kind, why = pick_precision(device, cfg, model)
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == 'cuda' else str(device)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == 'cpu' else ''
    print(f"device: {name}, {PRECISIONS[kind]} ({why}){threads}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"vocabulary: {plural(len(tokenizer.chars), 'character')}; model: {model_shape(model, sep=', ')}")


def start_training(run, model, tokenizer, splits, cfg, checkpoint):
    """ the optimizer, a resumed run's random state, torch.compile and DDP, the log: what the loop needs """
    # under torchrun a signal reaches each process at its own moment: the loop acts on the signals that all
    # processes have shared at a step's end (after_step), so that all stop after the same step
    run.stop = run.signals if run.world == 1 else []
    run.raw_model, run.tokenizer, run.splits = model, tokenizer, splits
    run.plot = cfg.plot and run.rank == 0
    if checkpoint and checkpoint['processes'] != run.world:
        tokens, accum = cfg.batch_size * cfg.block_size, cfg.gradient_accumulation_steps * checkpoint['processes']
        print(f"the checkpoint was trained by {checkpoint['processes']} processes, this run has {run.world}: "
              f"{tokens * accum:,} -> {tokens * cfg.gradient_accumulation_steps * run.world:,} tokens per step"
              + (f": set --gradient_accumulation_steps={accum // run.world} to keep them" if accum % run.world == 0 else ''))
    if cfg.torch_compile:
        check_compile(run.device)
    run.optimizer = configure_optimizer(model, cfg, run.device)  # only here: sampling needs none
    if checkpoint:  # a resumed run continues its optimizer, fp16's loss scale and its random stream
        run.optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['scaler']:  # {} in bf16 and fp32
            run.scaler.load_state_dict(checkpoint['scaler'])
        torch.set_rng_state(checkpoint['rng_cpu'])
        if cuda and checkpoint['rng_cuda']:
            torch.cuda.set_rng_state_all(checkpoint['rng_cuda'])
    run.model = torch.compile(model) if cfg.torch_compile else model
    if run.world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == 'cuda' else None, **no_buffer_sync())
    if run.rank == 0:
        start_log(run, cfg, checkpoint)
    run.batch_rows = cfg.batch_size * cfg.gradient_accumulation_steps * run.world
    print_start(run, cfg)
    now = time.time()  # a resumed run's clock goes on from the seconds it trained
    run.t_start, run.t_step, run.t_log, run.step_log = now - run.elapsed, now, now, run.step


def print_start(run, cfg):
    """ what the run trains: to which step or for how long, on how many tokens a step, with which optimizer """
    # and a warmup too long to reach learning_rate, with the fix
    length = f"{plural(run.max_iters - run.step, 'step')} to step {run.max_iters} (max_iters"
    spent = f", {run.elapsed:.0f} s of it spent" if run.elapsed else ''
    length += (f") or as many as fit in {cfg.max_time:g} s (max_time{spent}), whichever is fewer" if cfg.max_time
               else "; max_time 0: no time limit)")
    processes = f" ({run.world} processes)" if run.world > 1 else ""
    print(f"training: {length}, {run.batch_rows * cfg.block_size:,} tokens per step{processes}")
    what = f"AdamW (lr {cfg.learning_rate:g}, betas {cfg.beta1:g}, {cfg.beta2:g})"
    if isinstance(run.optimizer, MuonWithAdamW):
        what = (f"Muon (lr {cfg.learning_rate * cfg.muon_lr_scale:g}, momentum {cfg.muon_momentum:g}) for the blocks' "
                f"{len(run.optimizer.muon.param_groups[0]['params'])} matrices, {what} for the rest")
    if cfg.embedding_lr_scale != 1:
        what += f", the embedding tables at lr {cfg.learning_rate * cfg.embedding_lr_scale:g}"
    warmup = f"{cfg.warmup_iters} warmup steps, then " if cfg.warmup_iters else ''
    decay = 'flat' if cfg.min_lr_frac == 1 else f"a cosine decay to {cfg.min_lr_frac:g}x at the end"
    print(f"optimizer: {what}, weight decay {cfg.weight_decay:g}; learning rate: {warmup}{decay}", flush=True)
    if cfg.warmup_iters >= run.max_iters > run.step and cfg.learning_rate > 0:
        print(f"note: warmup_iters={cfg.warmup_iters} is not shorter than the run ({plural(run.max_iters, 'step')}): "
              f"the rate rises to {cfg.learning_rate * run.max_iters / (cfg.warmup_iters + 1):.3g} at most, not "
              f"learning_rate={cfg.learning_rate:g}; set warmup_iters below {run.max_iters} to reach it", flush=True)


# ----------------------------------------------------------------------------------------------
# the loop's state: every variable the training loop updates, declared once

@dataclass
class LoopState:
    """ Loop state: every variable the training loop updates, each declared here with what it means
    (loop_state fills in a resumed run's from its checkpoint; start_training, the parts) """
    # where the run stands; the checkpoint saves these (SAVED)
    step: int = 0  # optimizer steps taken
    max_iters: int = 0  # the last step: max_iters, or the step at which max_time was spent
    progress: float = 0.0  # from 0 to 1: the larger of step / max_iters and the share of max_time spent
    warm_progress: float = 0.0  # progress where the warmup ended: the cosine decays from there
    best_val_loss: float = float('inf')  # best.pt's val loss
    elapsed: float = 0.0  # seconds trained, evaluations and resumes included
    setup_s: float = 0.0  # seconds from the script's start to the first step: loading torch, data, model
    end_s: float = 0.0  # seconds the end needs (the last evaluation, the whole-split loss, the sample)
    step_s: float = 0.0  # seconds a step takes now: an average over the last ~20 steps
    end_step_s: float = 0.0  # step_s when end_s was measured: the end slows down as the steps do
    # this call
    training: bool = True  # any steps to take?
    resumed_at: int = None  # the checkpoint's step: evaluated and saved already
    saved_step: int = None  # the step of ckpt.pt
    constants: dict = None  # the source of each constant: an edit made before a resume is seen
    signals: list = field(default_factory=list)  # what this process received: Ctrl-C, SIGTERM
    stop: list = field(default_factory=list)  # what the loop acts on: the signals, agreed by all
    plot: bool = False  # draw out_dir/loss.png after each evaluation (until it fails once)
    # clocks
    t_begin: float = None  # when the script began: max_time counts from here
    t_start: float = None  # when the training began (a resumed run's: moved back by elapsed)
    t_step: float = None  # when the last step ended: an evaluation is timed from there
    t_log: float = None  # when the last progress line was printed, and its step: ms/step since
    step_log: int = None
    # processes: one, or one per device under torchrun
    rank: int = 0  # this process's number (0 alone): the first one saves and prints
    world: int = 1  # the number of processes (1 alone)
    # the parts the loop works with
    device: object = None  # where it computes
    ctx: object = None  # the precision every forward runs in (autocast or nullcontext)
    scaler: object = None  # fp16's loss scaling (GradScaler); in bf16 and fp32 a no-op
    model: object = None  # what the loop calls: the model, compiled and wrapped for torchrun if asked
    raw_model: object = None  # the model itself: what is saved and sampled (nanoGPT's raw_model)
    optimizer: object = None  # configure_optimizer's
    tokenizer: object = None  # the characters, encode and decode
    splits: dict = None  # the train and val token ids
    batch_rows: int = None  # rows of a step's batch: batch_size x accumulation x processes
    ckpt_path: str = None  # out_dir/ckpt.pt, the latest model (out_dir/best.pt: the best val loss)


SAVED = ('step', 'max_iters', 'progress', 'warm_progress', 'best_val_loss', 'elapsed', 'setup_s', 'end_s', 'step_s',
         'end_step_s')


def loop_state(cfg, checkpoint, device, t_begin, defaults=None):
    """ a new run's loop state, or a resumed run's, which goes on from its checkpoint """
    rank, world = rank_and_world()
    run = LoopState(training=trains(cfg, checkpoint), constants=constant_sources(defaults), t_begin=t_begin,
                    rank=rank, world=world, device=device, ckpt_path=os.path.join(cfg.out_dir, 'ckpt.pt'))
    if checkpoint:
        for name in SAVED:
            setattr(run, name, checkpoint[name])
        run.resumed_at = run.saved_step = run.step
    run.max_iters = cfg.max_iters
    return run


def trains(cfg, checkpoint):
    """ whether this call trains: a new run with steps to take, or a resumed one short of max_iters """
    # that has not finished, or that is given more steps or seconds to train on with
    if not checkpoint:
        return cfg.max_iters > 0
    more = cfg.max_iters != checkpoint['config']['max_iters'] or cfg.max_time != checkpoint['config']['max_time']
    return checkpoint['step'] < cfg.max_iters and (checkpoint['step'] < checkpoint['max_iters'] or more)


# ----------------------------------------------------------------------------------------------
# the loop's helpers: a step's micro-batches, what follows a step (the run's progress: the time budget)
# and an evaluation (the preview, checkpoints, the log), the final loss, generation

def micro_batches(run, xb, yb, accum):
    """ this process's share of the batch in accum micro-batches (one: the whole batch) """
    # one process, many, or accumulation all give the same step; under torchrun gradients are averaged at the last
    shares = zip(xb.chunk(run.world)[run.rank].chunk(accum), yb.chunk(run.world)[run.rank].chunk(accum))
    for micro_step, (x, y) in enumerate(shares):
        if run.world > 1:
            run.model.require_backward_grad_sync = micro_step == accum - 1
        yield x, y


def after_step(run, cfg, loss):
    """ after a step: the loss and the stops, shared by all processes; a NaN; the run's progress, and its end """
    now = time.time()
    dt = now - run.t_step  # this step's seconds, evaluations left out
    run.step_s = 0.95 * run.step_s + 0.05 * dt if run.step_s else dt
    if not run.end_step_s and run.step >= (run.resumed_at or 0) + 20:  # the first steps are slow: warming up
        run.end_step_s = run.step_s
    lossf, spent = loss.item(), time_spent(run, cfg, now, next_s=dt)
    if run.world > 1:  # the mean loss, a signal to any process, and the first process's clock
        sigterm, sigint = signal.SIGTERM in run.signals, signal.SIGINT in run.signals
        lossf, sigterm, sigint, spent = summed(run, lossf / run.world, sigterm, sigint, spent if run.rank == 0 else 0)
        run.stop[:] = [sig for sig, n in ((signal.SIGTERM, sigterm), (signal.SIGINT, sigint)) if n]
    # fp16: a step whose gradients overflowed is skipped and the scale halved; below 1 they overflow unscaled
    scale = run.scaler.get_scale()  # 1.0 without fp16
    if not math.isfinite(lossf) or scale < 1:
        what = (f"the loss became {lossf}" if not math.isfinite(lossf)
                else f"the gradients overflow fp16 at any loss scale (down to {scale:g})")
        kept = f"{run.ckpt_path} is from before it" if os.path.exists(run.ckpt_path) else "nothing was saved"
        die(f"{what} at step {run.step}; {kept}: lower --learning_rate (now {cfg.learning_rate})"
            + ("" if cfg.grad_clip else " or set --grad_clip=1.0"))
    # The time budget is one rule: progress is the larger of step / max_iters and the share of max_time spent
    # (time_spent), it never goes back, and the step at which it reaches 1 is the last
    fraction = max(run.step / run.max_iters, spent)
    run.progress = max(run.progress, min(1.0, fraction))
    if run.step <= cfg.warmup_iters:
        run.warm_progress = run.progress
    if fraction >= 1:
        run.max_iters = run.step  # the last step: max_iters, or max_time is spent
    if run.step % cfg.log_interval == 0:
        print_progress(run, cfg, lossf, now, spent)
    run.t_step = time.time()


def print_progress(run, cfg, lossf, now, spent):
    """ the step (of max_iters, or of about as many as max_time holds), the loss, the speed, the time left """
    dt = (now - run.t_log) / (run.step - run.step_log)  # the last steps', evaluations left out
    by_time = spent > run.step / run.max_iters
    left = (1 - spent) * (cfg.max_time - run.setup_s - run.end_s) if by_time else (run.max_iters - run.step) * dt
    print(f"  step {run.step}/{f'~{run.step / spent:.0f}' if by_time else run.max_iters} | loss {lossf:.4f} | "
          f"{dt * 1000:.0f} ms/step | {run.batch_rows * cfg.block_size / dt:,.0f} tok/s | "
          f"elapsed {format_time(now - run.t_start)} | left {format_time(max(0, left) + run.end_s)}", flush=True)
    run.t_log, run.step_log = time.time(), run.step


def time_spent(run, cfg, now, next_s=0.0):
    """ the share of max_time spent: the seconds trained, and next_s (a step as long as the last), over the
    seconds available to train """
    if not cfg.max_time:
        return 0.0
    # available: max_time less the start (run.setup_s) and what the end needs, as measured, and longer where
    # the steps have slowed down since (a busy machine slows the end alike)
    slower = max(1.0, run.step_s / run.end_step_s) if run.end_step_s else 1.0
    available = 0.99 * cfg.max_time - run.setup_s - run.end_s * slower  # 1% kept for what varies
    return (now - run.t_start + next_s) / available if available > 0 else math.inf


def after_evaluation(run, cfg, losses, last_step):
    """ after an evaluation: the preview, checkpoints, at the last step the whole-split loss, a log.csv row, the
    picture; each timed, for what the end of a time budget needs (run.end_s). A budget too short ends here """
    estimate_s, t0 = time.time() - run.t_step, time.time()
    if cfg.preview_chars:
        print('  ' + preview(run, cfg), flush=True)
    char_s = (time.time() - t0) / max(1, cfg.preview_chars)
    run.elapsed = time.time() - run.t_start
    if run.rank == 0:  # saved first: the final loss below may take a while, and a stop skips it
        if losses['val'] < run.best_val_loss and run.step > 0:
            run.best_val_loss = losses['val']
            save_checkpoint(os.path.join(cfg.out_dir, 'best.pt'), run, cfg)
        if run.step > (run.resumed_at or 0):
            save_checkpoint(run.ckpt_path, run, cfg)
            run.saved_step = run.step
    if run.resumed_at is None and run.step == 0:  # the share of max_time is counted from the first step on
        run.setup_s, run.t_start = time.time() - run.t_begin, time.time()
        end_s = end_seconds(run, cfg, estimate_s, char_s)
        if summed(run, run.rank == 0 and 0 < cfg.max_time <= run.setup_s + end_s)[0]:
            print(f"time budget {cfg.max_time:g} s cannot be kept: the start took {run.setup_s:.1f} s and the end "
                  f"needs {end_s:.1f} s (an evaluation, the loss over the whole val split, the sample), so not "
                  f"one step fits; it ends now. Set --max_time={math.ceil((run.setup_s + end_s) * 1.5)} or "
                  f"more, or fewer --eval_iters or --max_new_tokens", flush=True)
            run.max_iters, last_step = run.step, True
    whole = final_loss(run, cfg) if last_step else None
    if run.rank == 0:
        lr = get_lr(run.step, cfg, run.progress, run.warm_progress)
        append_log(cfg.out_dir, [run.step, f"{losses['train']:.4f}", f"{losses['val']:.4f}", f"{lr:.3e}",
                                 f"{run.elapsed:.1f}", '' if whole is None else f"{whole:.4f}"])
        draw_loss_png(run, cfg)
    run.end_s, run.end_step_s = end_seconds(run, cfg, estimate_s, char_s), run.step_s
    run.t_log += time.time() - run.t_step  # ms/step and step_s leave evaluations out
    run.t_step = time.time()


def end_seconds(run, cfg, estimate_s, char_s):
    """ what the end of a run needs, from the evaluation just made: another like it, the loss over the whole val
    split at the estimate's speed, the sample at the preview's, and the exit """
    token_s = estimate_s / (2 * cfg.eval_iters * cfg.batch_size * cfg.block_size)
    tokens = min(len(run.splits['val']), 1 << 17)  # as many as final_windows reads
    sample_s = (char_s or token_s * cfg.block_size) * cfg.num_samples * cfg.max_new_tokens
    return time.time() - run.t_step + token_s * tokens + sample_s + EXIT_S


EXIT_S = 0.5  # seconds from the sample's last character to the end of the process (Python's own exit)


def eval_batches(run, cfg):
    """ estimate_loss's batches: eval_iters of each split, from a generator seeded anew at each evaluation """
    def batches(data, generator):
        for _ in range(cfg.eval_iters):
            yield get_batch(data, cfg.block_size, cfg.batch_size, run.device, generator)
    return {split: batches(data, torch.Generator().manual_seed(cfg.seed)) for split, data in run.splits.items()}


def mean_loss(losses, run):
    """ the mean of the (loss, rows) pairs of every process, each loss weighted by its batch's rows """
    total, rows = summed(run, sum(loss * n for loss, n in losses), sum(n for _, n in losses))
    return total / max(rows, 1)


def summed(run, *values):
    """ each value summed over all processes under torchrun (a signal's count, a share of a loss); alone, as is """
    if run.world == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=run.device)
    torch.distributed.all_reduce(shared)
    return shared.tolist()


def final_windows(length, block_size, max_tokens=1 << 17):
    """ where the final loss reads a val split this long, and how many windows there are """
    # every block_size window of a split up to max_tokens (all of tiny Shakespeare's 111,540 characters),
    # else max_tokens' worth spread evenly over it
    n = (length - 1) // block_size
    used = min(n, max(1, max_tokens // block_size))
    return np.linspace(0, n - 1, used).round().astype(np.int64) * block_size, n


def final_loss(run, cfg):
    """ after the last evaluation, the loss over the whole val split; skipped (None) when a stop comes """
    # by estimate_loss's loop: exact, where the estimate has a standard error of ~0.01
    asked = len(run.signals)  # a stop that came before is not one to skip this for
    data, T, B = run.splits['val'], cfg.block_size, cfg.batch_size  # batches as the estimate's: as fast a token
    starts, n = final_windows(len(data), T)

    def windows():
        for i in range(0, len(starts), B):
            if len(run.signals) > asked:
                return
            w = torch.from_numpy(data[starts[i:i + B, None] + np.arange(T + 1)].astype(np.int64))  # (B,T+1)
            yield w[:, :-1].contiguous().to(run.device), w[:, 1:].contiguous().to(run.device)
    whole = estimate_loss(run.model, run, cfg, {'val': windows()})['val']
    stopped = summed(run, len(run.signals) > asked)[0]
    where = f"{len(starts):,} windows spread over the split's {n:,}" if len(starts) < n else 'the whole split'
    print(f"step {run.step}: " + (f"the val loss over {where} is skipped: stopped" if stopped
                                  else f"val loss over {where} {whole:.4f}"), flush=True)
    return None if stopped else whole


def generate_one_by_one(model, idx, n, cfg, ctx, generator=None):
    """ model.generate one character at a time, n times: yields each new token id as it is made (the sample
    prints it at once; the preview joins them) """
    for _ in range(n):
        with ctx:
            idx = model.generate(idx, 1, cfg.temperature, cfg.top_k, generator)  # (1,T+1)
        yield idx[0, -1].item()


def preview(run, cfg):
    """ a line sampled from a fixed seed, to watch the model learn; the training's randomness is untouched """
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    idx = torch.zeros((1, 1), dtype=torch.long, device=run.device)  # (1,1): token 0, as the lecture starts
    tokens = generate_one_by_one(run.raw_model, idx, cfg.preview_chars, cfg, run.ctx, generator)
    return run.tokenizer.decode(list(tokens)).replace('\n', ' / ')


def plural(n, word):
    """ '1 step', '2 steps' """
    return f"{n} {word}{'s' * (n != 1)}"


def format_time(seconds):
    """ 125.3 -> '2m05s' """
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# Muon: an optimizer for the blocks' weight matrices (optim = 'muon', the CPU run's)

def muon_matrices(model):
    """ the weight matrices Muon trains: the blocks' 2-D weights (attention and feed-forward) """
    return [p for n, p in model.named_parameters() if p.requires_grad and n.startswith('blocks.') and p.dim() == 2]


def newton_schulz(G, steps=5, eps=1e-7, dtype=torch.float32):
    """ G = U S V^T (or a batch of them, (N,A,B)) made about U V^T, its singular values moved into ~[0.7, 1.2] """
    # 5 steps of a quintic Newton-Schulz iteration, torch.optim.Muon's, which runs in bfloat16. Here in dtype:
    # bfloat16 where the run computes in it, else float32 (a CPU without bf16 in hardware runs bf16 ~15x slower)
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
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

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, lr_scale=1.0, dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_scale=lr_scale))
        self.dtype = dtype  # Newton-Schulz's

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
            orthogonal = newton_schulz(torch.stack([update for _, _, update in items]), dtype=self.dtype)  # (N,A,B)
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
    """ the file's characters as code points, a few million at a time: memory stays small for huge files """
    with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not a character
        while chunk := f.read(chunk_chars):
            yield np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)


def prepare_data(path, cache_dir):
    """ chars = sorted(set(text)) and data = encode(text) as token ids (uint16, or uint32 past 65,536
    characters), encoded into cache_dir once, then memory-mapped: a text larger than memory still trains """
    if not os.path.isfile(path):
        die(f"cannot read the input file '{path}': put a UTF-8 text file there or set --input_file")
    key = dict(file=os.path.abspath(path), **text_stamp(path))  # a text that changes is encoded anew
    meta_path, bin_path = os.path.join(cache_dir, 'data.json'), os.path.join(cache_dir, 'data.bin')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        if meta['key'] == key:
            return list(meta['chars']), np.memmap(bin_path, dtype=meta['dtype'], mode='r')
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a stale or damaged one: build it
    try:  # an interrupted or failed preparation leaves no half-written file behind
        vocab = np.flatnonzero(sum(np.bincount(c, minlength=0x110000) for c in read_text_chunks(path)))
        if len(vocab) == 0:
            die(f"the input file '{path}' is empty: give it some text to learn from")
        lookup = np.zeros(0x110000, dtype=np.uint16 if len(vocab) <= 1 << 16 else np.uint32)
        lookup[vocab] = np.arange(len(vocab))  # each character's code point -> its token id
        with written_atomically(bin_path) as tmp, open(tmp, 'wb') as f:  # two runs may prepare one folder at once
            for chunk in read_text_chunks(path):
                f.write(lookup[chunk].tobytes())
        meta = dict(key=key, chars=''.join(map(chr, vocab)), dtype=lookup.dtype.name)
        with written_atomically(meta_path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f)
    except UnicodeDecodeError as e:
        with open(path, 'rb') as f:  # UTF-16, as some editors save, is named, with the fix
            head = f.read(1024)
        if head[:2] in (b'\xff\xfe', b'\xfe\xff') or head.count(0) > len(head) // 4:
            die(f"the input file '{path}' is UTF-16 text, not UTF-8: save it as UTF-8 (e.g. iconv -f UTF-16 "
                f"-t UTF-8 '{path}' > input-utf8.txt, then --input_file=input-utf8.txt)")
        die(f"the input file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} cannot be read): save it as UTF-8")
    except OSError as e:
        die(f"cannot encode '{path}' into {cache_dir} ({e.strerror}): free some disk space or set --out_dir")
    return list(meta['chars']), np.memmap(bin_path, dtype=meta['dtype'], mode='r')


def text_stamp(path):
    """ the text file's size and time of last change """
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
    learned, then = checkpoint['chars'], checkpoint['config']['input_file']
    if ''.join(chars) != learned:
        what = (f"{cfg.input_file} has changed since the model learned it" if os.path.abspath(cfg.input_file) == then
                else f"{cfg.input_file} is not the text the model learned ({then})")
        diff = [(label, sorted(a - b)) for label, a, b in (('new', set(chars), set(learned)),
                                                            ('gone', set(learned), set(chars)))]
        diff = '; '.join(f"{label}: {shown(''.join(cs[:40]))}" + (f" and {len(cs) - 40} more" if len(cs) > 40 else '')
                         for label, cs in diff if cs)
        die(f"{what}, and its vocabulary differs ({diff}): resume on the text it learned, or train a new model "
            f"with another --out_dir")
    if checkpoint['text'] != text_stamp(cfg.input_file):
        print(f"note: {cfg.input_file} has changed since step {checkpoint['step']} was saved "
              f"(same characters): training goes on with the text as it is now")


def check_splits(splits, cfg):
    """ each split must be longer than a block: a block of inputs and its targets, one further """
    for split, d in splits.items():
        if len(d) < cfg.block_size + 1:
            die(f"{cfg.input_file} is too short for block_size={cfg.block_size}: its {split} split has "
                f"{len(d)} characters and needs {cfg.block_size + 1}; use a longer text or a smaller --block_size")


# ----------------------------------------------------------------------------------------------
# checkpoints and the log, everything needed to resume exactly or sample later, a row per evaluation;
# and the one-run lock: one training run per out_dir, which must be writable before it starts

CHECKPOINT_FORMAT = 1  # raised when what a checkpoint holds changes: one of another format is refused


def save_checkpoint(path, run, cfg):
    """ everything needed to resume exactly or to sample later; written to a temporary file, then renamed """
    checkpoint = dict(
        format=CHECKPOINT_FORMAT, **{name: getattr(run, name) for name in SAVED},  # where the loop stands
        model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),  # fp16's loss scale, its growth tracker; {} in bf16 and fp32
        model_class=type(run.raw_model).__name__, model_args=asdict(run.raw_model.config),
        config={**vars(cfg), 'input_file': os.path.abspath(cfg.input_file)},  # found again from any folder
        constants=run.constants,  # the file's lines as they were: an edit made before a resume is seen
        text=text_stamp(cfg.input_file), processes=run.world, command=command_of(type(run.raw_model)),
        chars=run.tokenizer.chars, rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state_all() if cuda else [])
    try:
        with written_atomically(path) as tmp:  # a crash mid-save leaves the previous checkpoint as it was
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as e:  # torch says a full disk as "unexpected pos": say it plainly
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 64 << 20
        why = 'no space left on the disk' if full or getattr(e, 'errno', 0) == errno.ENOSPC else first_line(e)
        die(f"could not write {path} ({why}); the previous checkpoint is intact: "
            f"free some disk space or set --out_dir, then resume with --init_from=resume")


def load_checkpoint(path, model_class):
    """ a checkpoint of this script, read as plain tensors and values (weights_only: it cannot run code) """
    if not os.path.exists(path):
        die(no_checkpoint(path, model_class))
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        fmt = checkpoint.get('format')
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all: whatever torch raises
        die(f"{path} is damaged or not a checkpoint of gpt.py ({type(e).__name__}): delete it, or use --init_from=scratch")
    if fmt != CHECKPOINT_FORMAT:
        die(f"{path} is a checkpoint of format {fmt}, and this gpt.py reads format {CHECKPOINT_FORMAT}: train a "
            f"new model with another --out_dir, or use the gpt.py that saved it")
    if checkpoint['model_class'] != model_class.__name__:
        other = checkpoint['command']  # how the run that saved it was started
        use = f"{other} --out_dir={os.path.dirname(path) or '.'}" if other != command_of(model_class) else 'another --out_dir'
        die(f"{path} holds a {checkpoint['model_class']}, not a {model_class.__name__}: resume or sample it with {use}")
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
    earlier = os.path.isdir(kept) and sorted(os.listdir(kept))
    earlier = f"; earlier runs are kept in {kept}, e.g. --out_dir={os.path.join(kept, earlier[-1])}" if earlier else ''
    return f"no checkpoint at {path}: train one first ({command_of(model_class)}), or set --out_dir{earlier}"


def command_of(model_class):
    """ the command that trains model_class: python gpt.py, python bigram.py, ... (saved with it) """
    return getattr(model_class, 'command', f"python {os.path.basename(sys.modules[model_class.__module__].__file__)}")


def start_log(run, cfg, checkpoint):
    """ log.csv, a row per evaluation, started anew or kept up to a resumed run's step """
    # A new run, or a branch trained on from best.pt, first moves the previous run's files to
    # out_dir/previous/<date>: a trained model is never overwritten
    path, names = os.path.join(cfg.out_dir, 'log.csv'), ('ckpt.pt', 'best.pt', 'log.csv', 'loss.png', 'attention.png')
    old, files = path, [n for n in names if os.path.exists(os.path.join(cfg.out_dir, n))]
    if (not checkpoint or cfg.init_from == 'best') and {'ckpt.pt', 'best.pt'} & set(files):
        mtime = os.path.getmtime(os.path.join(cfg.out_dir, files[0]))
        when, k = time.strftime('%Y%m%d-%H%M%S', time.localtime(mtime)), 0
        while os.path.exists(kept := os.path.join(cfg.out_dir, 'previous', when + (f'-{k}' if k else ''))):
            k += 1
        os.makedirs(kept)
        for name in files:
            os.replace(os.path.join(cfg.out_dir, name), os.path.join(kept, name))
        print(f"the previous run's model is kept in {kept} (sample it with --out_dir={kept} --init_from=resume)")
        old = os.path.join(kept, 'log.csv')
    # a resumed run (or a branch) keeps the rows up to its step: no step is logged twice, even after a failed save
    rows = []
    if checkpoint and os.path.exists(old):
        with open(old, newline='') as f:
            rows = [row for row in list(csv.reader(f))[1:] if row and int(row[0]) <= run.step]
    try:
        with written_atomically(path) as tmp, open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows([['step', 'train_loss', 'val_loss', 'lr', 'elapsed_s', 'whole_val_loss']] + rows)
    except OSError as e:
        die(f"cannot write {path} ({e.strerror}): free some disk space or set --out_dir")


def append_log(out_dir, row):
    """ one row of log.csv; a full disk is one line of error, with the checkpoints already saved """
    path = os.path.join(out_dir, 'log.csv')
    try:
        with open(path, 'a', newline='') as f:
            csv.writer(f).writerow(row)
    except OSError as e:
        die(f"cannot write {path} ({e.strerror}): free some disk space, then resume with --init_from=resume")


@contextmanager
def written_atomically(path):
    """ a temporary path beside path (this process's own) that replaces path in one rename once written """
    # a reader never sees half a file, and a crash or a full disk leaves the previous file as it was
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def one_run_at_a_time(out_dir, run):
    """ a second training run in a busy out_dir is refused in one line that names the first """
    # the lock is the operating system's (flock on out_dir/run.lock): a run that crashes or is killed leaves none
    if run.rank > 0 or fcntl is None:  # the first process holds it for all
        yield
        return
    with open(os.path.join(out_dir, 'run.lock'), 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            die(f"{out_dir} is in use by another training run ({f.read().strip() or 'another process'}): "
                f"wait for it to end, stop it, or set --out_dir")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield  # the lock goes with the file, closed


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


def check_out_dir(out_dir):
    """ find out now, not after an hour of training, that checkpoints cannot be written """
    if os.path.isfile(out_dir):
        die(f"out_dir '{out_dir}' is a file, not a folder: set --out_dir to a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f'.write_test{os.getpid()}'), 'w') as f:
            os.remove(f.name)
    except OSError as e:
        die(f"cannot write to out_dir '{out_dir}' ({e.strerror}): set --out_dir to a writable folder")


# ----------------------------------------------------------------------------------------------
# pictures: the loss curve and each head's attention, drawn with matplotlib where it is installed
# (it is optional: without it a run trains and samples as before, and says so once)

# fonts with the CJK characters that matplotlib's own (DejaVu Sans) lacks, on Linux, macOS and Windows:
# matplotlib draws each character in the first font of its font.family list that has it
CJK_FONTS = ['Noto Sans CJK JP', 'Noto Sans CJK SC', 'WenQuanYi Zen Hei', 'Droid Sans Fallback', 'IPAGothic',
             'Hiragino Sans', 'PingFang SC', 'Apple SD Gothic Neo', 'Yu Gothic', 'Microsoft YaHei', 'Malgun Gothic']


@contextmanager
def drawing(width, height):
    """ a matplotlib figure (inches) drawn by Agg, imported on first use: never a window, pyplot left as it is """
    # text in matplotlib's font with CJK_FONTS behind it, and a character no font has drawn as a box, quietly
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    family = [*matplotlib.rcParams['font.family'], *CJK_FONTS]
    font_log = logging.getLogger('matplotlib.font_manager')  # "font family not found" for each one missing
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        with matplotlib.rc_context({'font.family': family}), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            fig = Figure(figsize=(width, height), dpi=100, layout='constrained')
            FigureCanvasAgg(fig)
            yield fig
    finally:
        font_log.setLevel(level)


def save_figure(fig, path):
    """ the figure as a PNG, written to a temporary file, then renamed: a reader never sees half a picture """
    with written_atomically(path) as tmp:
        fig.savefig(tmp, format='png')


def label(text, space=False):
    """ text as matplotlib shows it as it is: a $ a dollar sign, not $math$; a newline, a tab (and with space,
    a space) as the signs for them """
    signs = {'\n': '\u21b5', '\t': '\u21e5', **({' ': '\u2423'} if space else {})}
    return ''.join(signs.get(c, c) for c in text).replace('$', r'\$')


def attention_heads(model):
    """ every Head of the model, grouped by the module that holds them: {group: [(name, head)]} """
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, Head):
            groups.setdefault(name.rpartition('.')[0] or name, []).append((name, module))
    return groups


def model_shape(model, sep=': '):
    """ 'GPTLanguageModel: 6 layers, 6 heads, n_embd 384, block_size 256', from the model's parts """
    # its Blocks (layers) and the heads in each; a model without blocks, its heads ('1 head')
    groups, c = attention_heads(model), model.config
    layers = sum(isinstance(m, Block) for m in model.modules())
    heads = max(map(len, groups.values()), default=0) if layers else sum(map(len, groups.values()))
    shape = [plural(layers, 'layer')] * (layers > 0) + [plural(heads, 'head'), f"n_embd {c.n_embd}"] * (heads > 0)
    return f"{type(model).__name__}{sep}{', '.join([*shape, f'block_size {c.block_size}'])}"


def read_log(path):
    """ log.csv as [(step, train_loss, val_loss, whole_val_loss or None)], a resumed run's whole history """
    with open(path, newline='') as f:
        return [(int(r['step']), float(r['train_loss']), float(r['val_loss']),
                 float(r['whole_val_loss']) if r.get('whole_val_loss') else None) for r in csv.DictReader(f)]


def draw_loss_curve(log_path, path, title):
    """ train and val loss (the estimates) against the step, and the whole-split val loss as marked points """
    from matplotlib.ticker import MaxNLocator
    rows = read_log(log_path)
    with drawing(7, 4.5) as fig:
        ax = fig.add_subplot()
        steps = [r[0] for r in rows]
        ax.plot(steps, [r[1] for r in rows], '.-', label='train loss (estimate)')
        ax.plot(steps, [r[2] for r in rows], '.-', label='val loss (estimate)')
        whole = [(r[0], r[3]) for r in rows if r[3] is not None]
        if whole:
            ax.plot(*zip(*whole), 'D', color='black', label='val loss over the whole split')
        ax.set(xlabel='step', ylabel='loss', title=title)
        # ticks at whole steps only, at the round numbers of matplotlib's own choice (0, 1000, ..., 5000)
        ax.xaxis.set_major_locator(MaxNLocator('auto', steps=[1, 2, 5, 10], integer=True, min_n_ticks=1))
        ax.ticklabel_format(axis='y', useOffset=False)  # each loss in full: 4.1375, never 1e-4+4.137
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, path)


def draw_loss_png(run, cfg):
    """ out_dir/loss.png, drawn anew from log.csv after each evaluation """
    # a missing matplotlib, or any error while drawing, is said once, and the run goes on without the picture
    path = os.path.join(cfg.out_dir, 'loss.png')
    try:
        if run.plot:
            draw_loss_curve(os.path.join(cfg.out_dir, 'log.csv'), path, f"{model_shape(run.raw_model)}\non {run.device}")
    except Exception as e:  # a picture never stops a run
        run.plot = False
        why = 'cannot import matplotlib: pip install matplotlib' if isinstance(e, ImportError) else \
            f"{type(e).__name__}: {first_line(e)}"
        print(f"{path} is not drawn ({why}); the run goes on without it", flush=True)


@torch.no_grad()
def attention_maps(model, idx):
    """ each head's softmaxed wei for one sequence idx (1,T), without dropout: {group: [(name, (T,T))]}, row t
    the query at position t, column s how much it attends to s """
    # as each Head computes it in the model's forward, the lecture's code: the fused kernel computes no wei, so
    # it is turned off for this forward, and each Head keeps its wei
    groups = attention_heads(model)
    modules = [m for m in model.modules() if isinstance(m, (MultiHeadAttention, Head))]
    saved = [(m, m.fused if isinstance(m, MultiHeadAttention) else m.keep_wei) for m in modules]
    was_training = model.training
    model.eval()
    try:
        for m in modules:
            setattr(m, 'fused' if isinstance(m, MultiHeadAttention) else 'keep_wei', isinstance(m, Head))
        model(idx)
        return {g: [(name, head.wei[0].float().cpu()) for name, head in heads] for g, heads in groups.items()}
    finally:
        model.train(was_training)
        for m, value in saved:
            setattr(m, 'fused' if isinstance(m, MultiHeadAttention) else 'keep_wei', value)
            if isinstance(m, Head):
                m.wei = None


def draw_attention(maps, chars, path, title):
    """ one heatmap per head, a row of them per layer: row t, how much the character at t attends to each """
    T, rows, cols = len(chars), len(maps), max(map(len, maps.values()))
    size = min(max(2.5, 0.16 * T + 1), 8)  # inches per head: room for a label per character
    width = max(size * cols + 1, 0.1 * max(map(len, title.splitlines())))  # the title fits: ~0.1 inch a character
    with drawing(width, size * rows + 0.4 + 0.2 * (title.count('\n') + 1)) as fig:
        labels = [label(c, space=True) for c in chars]
        ticks = range(0, T, math.ceil(T / 48))  # at most 48 labels on an axis
        for r, heads in enumerate(maps.values()):
            for c, (name, wei) in enumerate(heads):
                ax = fig.add_subplot(rows, cols, r * cols + c + 1)
                image = ax.imshow(wei.numpy(), cmap='Blues', vmin=0, vmax=1)  # 0 is white: the masked future
                ax.set_title(name, fontsize=9)
                ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7)
                ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
                ax.set(xlabel='key (attended to)' if r == rows - 1 else '', ylabel='query (attending)' if c == 0 else '')
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label='attention weight')
        fig.suptitle(title)
        save_figure(fig, path)


def draw_prompt_attention(model, tokenizer, cfg, device):
    """ --plot_attention=True: each head's attention over the prompt's characters, into out_dir/attention.png """
    block_size = model.config.block_size
    text = cfg.prompt[-block_size:]  # the context the model sees when it samples the next character
    if len(text) < len(cfg.prompt):
        print(f"attention: the prompt is longer than block_size {block_size}; drawing its last {block_size} characters")
    idx = torch.tensor([tokenizer.encode(text)], dtype=torch.long, device=device)  # (1,T)
    path = os.path.join(cfg.out_dir, 'attention.png')
    quoted = label(f"'{text}'")
    title = f"{model_shape(model)}\nattention over " + '\n'.join(quoted[i:i + 60] for i in range(0, len(quoted), 60))
    draw_attention(attention_maps(model, idx), text, path, title)
    print(f"attention of each head over the prompt: {path}", flush=True)


# ----------------------------------------------------------------------------------------------
# the settings: the constants at the top, --name=value on the command line, a resumed run's own

# what each setting must be, checked alike whether it was edited at the top or given as --name=value
RULES = {
    **dict.fromkeys(('batch_size', 'block_size', 'eval_interval', 'eval_iters', 'n_embd', 'n_head', 'n_layer',
                     'log_interval', 'gradient_accumulation_steps', 'num_samples'), 'a positive int'),
    **dict.fromkeys(('max_iters', 'warmup_iters', 'max_new_tokens', 'top_k', 'preview_chars', 'seed'), 'an int >= 0'),
    **dict.fromkeys(('learning_rate', 'max_time', 'weight_decay', 'grad_clip', 'temperature', 'muon_lr_scale',
                     'embedding_lr_scale'), 'a number >= 0'),
    **dict.fromkeys(('dropout', 'beta1', 'beta2', 'muon_momentum'), 'a number at least 0 and below 1'),
    'min_lr_frac': 'a number from 0 to 1',
    **dict.fromkeys(('qkv_bias', 'fused_attention', 'plot_attention', 'plot', 'torch_compile'), 'True or False'),
    **dict.fromkeys(('device', 'input_file', 'data_url', 'data_sha256', 'prompt', 'out_dir'), 'text'),
    'activation': ('relu', 'gelu'), 'position_embedding': ('learned', 'sinusoidal'), 'optim': ('adamw', 'muon'),
    'init_from': ('scratch', 'resume', 'best'), 'precision': ('auto', 'fp32', 'bf16', 'fp16'),
}


RENAMED = dict(optimizer='optim', attention='plot_attention')  # old names, taken on the command line


def read_constants(path=__file__):
    """ the constants at the top as {name: (value as written, comment)}, read from this file: --help shows
    the comments, and a resume sees which values were edited """
    block = open(path, encoding='utf-8').read().split('\n# hyperparameters', 1)[1].split('\n# ----', 1)[0]
    lines = re.findall(r'^([a-z_0-9]+) = (.*?)(?:  # (.*))?$', block, flags=re.M)
    return {name: (text, comment) for name, text, comment in lines if name != 'cuda'}


def get_config(argv, defaults=None):
    """ the constants, the caller's defaults, then --name=value arguments on top; also the arguments alone """
    if isinstance(argv, str):
        die(f"main takes a list of settings, e.g. main(['--max_iters=200']), not the string {argv!r}")
    constants = read_constants()
    config = {name: globals()[name] for name in constants}
    config.update(defaults or {})
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(f"usage: python {os.path.basename(sys.argv[0])} [--name=value ...]   (numbers and True/False as "
                  "Python writes them; text as it is, without quotes)")
            print('\n'.join(f"  {f'--{k}={v!r}':<28}  {constants[k][1]}" for k, v in config.items()))
            raise SystemExit(0)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            die(f"cannot read '{arg}': write settings as --name=value, e.g. --max_iters=200 (see --help)")
        if name in RENAMED:
            print(f"note: --{name} is now --{RENAMED[name]}: taken as --{RENAMED[name]}={text}")
            name = RENAMED[name]
        if name not in config:
            close = difflib.get_close_matches(name, config, n=3)
            die(f"unknown setting '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ": see --help"))
        try:  # numbers and True/False as Python literals; text as it is, never evaluated
            value = text if RULES[name] == 'text' or isinstance(RULES[name], tuple) else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config[name] = overrides[name] = float(value) if type(value) is int and 'number' in RULES[name] else value
    return SimpleNamespace(**config), overrides


def change(name, given):
    """ how to change a setting: --name=... where it was given on the command line, else its line at the top """
    return f"change --{name}" if given else f"change the line {name} = ... at the top of the file, or set --{name}"


def check_config(cfg, overrides):
    """ refuse settings that cannot work before any data is read or any time is spent """
    for name, rule in RULES.items():
        value = getattr(cfg, name)
        if isinstance(rule, tuple):
            ok, rule = value in rule, f"one of {', '.join(rule)}"
        elif rule in ('text', 'True or False'):
            ok = type(value) is (str if rule == 'text' else bool)
        elif 'int' in rule:
            ok = type(value) is int and (1 if 'positive' in rule else 0) <= value < 2 ** 63
        else:
            ok = type(value) in (int, float) and 0 <= value < math.inf and (
                'below 1' not in rule or value < 1) and ('to 1' not in rule or value <= 1)
        if not ok:
            die(f"{name} must be {rule}, not {value!r}: {change(name, name in overrides)}")
    if cfg.n_embd % cfg.n_head:
        below = next(h for h in range(cfg.n_head, 0, -1) if cfg.n_embd % h == 0)
        above = next((h for h in range(cfg.n_head, min(cfg.n_embd, 4 * cfg.n_head) + 1) if cfg.n_embd % h == 0), None)
        heads = f"n_head={below}" + (f" or {above}" if above and above != below else '')
        die(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}): set {heads}, or "
            f"n_embd={-(-cfg.n_embd // cfg.n_head) * cfg.n_head}")
    if 0 < cfg.temperature < 1e-3:
        die(f"temperature {cfg.temperature} is too small to sample with: use --temperature=0 for greedy decoding")
    if cfg.plot_attention and not cfg.prompt:
        die("--plot_attention=True draws each head's attention over the prompt: give one, e.g. --prompt=\"ROMEO: \"")
    if cfg.plot_attention:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            die("--plot_attention=True draws with matplotlib, which cannot be imported: pip install matplotlib")


PER_CALL = ('init_from', 'out_dir', 'device', 'plot_attention')  # a call's own settings: where, on what, what for


def constant_sources(defaults=None):
    """ each setting's source: its line's text at the top of this file, or a script's default (bigram.py's) """
    # saved with a checkpoint, to see later which lines were edited
    return {**{name: text for name, (text, _) in read_constants().items()},
            **{k: repr(v) for k, v in (defaults or {}).items()}}


def resume_config(cfg, overrides, checkpoint, path, defaults):
    """ a resumed run is the same run: the checkpoint's settings, then the file's edits since and the command
    line's, said in one line """
    # a line changed since the checkpoint was saved counts as the same --name=value would
    saved, shape, then = checkpoint['config'], checkpoint['model_args'], checkpoint['constants']
    edited = {k: getattr(cfg, k) for k, v in constant_sources(defaults).items()
              if then.get(k, v) != v and k not in overrides and k not in PER_CALL}
    changes = {**edited, **overrides}
    new = SimpleNamespace(**{**vars(cfg), **{k: v for k, v in saved.items() if k not in PER_CALL}, **changes})
    check_config(new, overrides)
    training = trains(new, checkpoint)
    # its shape and optimizer stay: a change is refused, given on the command line or, to train, edited
    kept = {**{k: shape[k] for k in SHAPE}, 'optim': saved['optim']}
    refused = [k for k in kept if k in changes and changes[k] != kept[k] and (k in overrides or training)]
    if refused:
        what = (f"a trained model keeps its shape ({', '.join(f'{k}={kept[k]!r}' for k in refused)})"
                if refused != ['optim'] else f"a run keeps its optimizer ({path} was trained with "
                f"optim={kept['optim']!r})")
        lines, flags = [f"{k} = {kept[k]!r}" for k in refused if k in edited], [k for k in refused if k in overrides]
        fix = [f"put back {' and '.join([', '.join(lines[:-1]), lines[-1]] if lines[:-1] else lines)} at the top"] if lines else []
        fix += [f"drop {' '.join(f'--{k}' for k in flags)}"] if flags else []
        die(f"{what}: {' and '.join(fix)}, or train a new model with another --out_dir")
    changed = [f"{k} {saved[k]!r} -> {v!r}" + (' (edited in the file)' if k in edited else '')
               for k, v in changes.items() if k in saved and k not in PER_CALL and saved[k] != v]
    print(f"resuming {path} at step {checkpoint['step']} with its settings"
          + (f"; changed: {', '.join(changed)}" if changed else ''))
    return new


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


def no_buffer_sync():
    """ DistributedDataParallel's argument not to send the buffers (tril, the same everywhere) at each forward """
    # forward_sync_buffers=False from PyTorch 2.13 on, where broadcast_buffers=False warns
    if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
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
    if run.world > 1:
        run.model = None  # DistributedDataParallel freed before its process group: left to the exit,
        gc.collect()  # it aborts a process now and then ("terminate called without an active exception")
        torch.distributed.destroy_process_group()
    return run.rank


# ----------------------------------------------------------------------------------------------
# errors, signals and the script's entry: one-line errors, a stop that saves, a reader that goes away

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
def stop_on_signals(run, cfg):
    """ Ctrl-C or SIGTERM (kill, a scheduler, torchrun) stops training after this step, saved """
    # a second Ctrl-C quits at once; a reader that goes away (python gpt.py | head) stops it as SIGTERM does.
    # Signals are taken in the main thread only, and a notebook gets its Ctrl-C handler back
    # SIGTERM comes in twos and threes (a scheduler signals every process of a job, and torchrun passes each
    # on): any number are one stop, and a process stopped by it ignores more up to its exit
    def on_signal(signum, frame):
        if signum == signal.SIGTERM and signum in run.signals:  # the same stop, asked again
            return
        run.signals.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)
            print("\nCtrl-C: stopping after this step and saving (Ctrl-C again to quit at once)", flush=True)
        else:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving", flush=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except BrokenPipeError:  # the Python docs' recipe: the rest of the output goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        run.signals.append(signal.SIGTERM)
        if run.rank == 0 and run.saved_step != run.step and run.optimizer:
            save_checkpoint(run.ckpt_path, run, cfg)
        raise SystemExit(128 + signal.SIGTERM)
    finally:
        # a run stopped by SIGTERM is on its way out (main() exits 143): SIGTERM is ignored up to the exit,
        # Python's shutdown included (where it would be SIGTERM's default again)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGTERM and sig in run.signals else handler)


def run_script(main_function, **kwargs):
    """ python gpt.py, bigram.py and lecture_steps.py all start here: main_function(argv), with the clock from
    the script's start """
    sys.stdout.reconfigure(errors='replace')  # a character the console cannot show is printed as '?'
    # a second Ctrl-C or a reader gone: a quiet exit; an error under torchrun: as torchrun reports it
    try:
        main_function(sys.argv[1:], t_begin=started, **kwargs)
    except KeyboardInterrupt:  # a second Ctrl-C, or one while sampling: quit quietly
        raise SystemExit(130)
    except BrokenPipeError:  # the reader went away while the model sampled: the rest goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGTERM)
    except BaseException as e:
        # Under torchrun an error reads as one line at the end of the output, the root cause of torchrun's
        # report: the message goes to the error file torchrun gives each process, not to stderr, where every
        # process would print it. A process other than the first waits 2 s, so that torchrun reports the
        # first one's error where both failed (the same settings, or a collective the first one left)
        error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
        if not error_file or isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        if os.environ.get('RANK', '0') != '0':
            time.sleep(2)
        if isinstance(e, SystemExit):
            with open(error_file, 'w') as f:
                json.dump(dict(message=dict(message=e.code, extraInfo=dict(timestamp=str(int(time.time()))))), f)
            raise SystemExit(1) from None
        raise


if __name__ == '__main__':
    run_script(main)
