"""
The lecture's models one step at a time, from the bigram to the Transformer, each trained with the
lecture's small settings (n_embd 32, block_size 8, 5000 steps at learning rate 1e-3), so its val
loss can be compared with the video's: each comes within 0.03 of it. The models are built from
gpt.py's own parts, and the data, training loop and sampling are gpt.py's, as in bigram.py.

    python lecture_steps.py --help                      # the steps, what each adds, and the settings
    python lecture_steps.py --step=2                    # 4 heads of self-attention (video: val loss 2.28)
    python lecture_steps.py --step=5 --max_iters=1000   # takes the same settings as gpt.py
"""
import gpt  # first: the time budget's clock starts when gpt.py is imported, before torch loads

import torch
import torch.nn as nn
from torch.nn import functional as F

import bigram

# hyperparameters: the lecture's settings for its small models (every other constant is gpt.py's)
defaults = dict(
    batch_size=32,  # how many independent sequences will we process in parallel?
    block_size=8,  # what is the maximum context length for predictions?
    n_embd=32,  # width of the embedding of each token
    n_head=4,  # 4 heads of 8 from step 2 on (step 1's one head is 32 wide)
    n_layer=3,  # three blocks from step 4 on
    dropout=0.0,  # the lecture adds dropout only when it scales up, after the last step here
    activation='relu',  # the lecture's non-linearity
    max_iters=5000,  # total optimizer steps
    max_time=0,  # no time budget: max_iters sets the length of the run, as in the lecture
    eval_interval=500,  # estimate train and val loss every this many steps
    eval_iters=200,  # batches of each split averaged in one estimate
    log_interval=500,  # print progress every this many steps
    learning_rate=1e-3,  # self-attention can't tolerate very high learning rates, says the lecture
    min_lr_frac=1.0,  # the rate stays at learning_rate: no schedule, as in the lecture
    warmup_iters=0,  # no warmup, as in the lecture
    weight_decay=0.01,  # torch.optim.AdamW's default; gpt.py decays the 2-D weights only (the lecture: all)
    beta1=0.9,  # torch.optim.AdamW's default
    beta2=0.999,  # torch.optim.AdamW's default
    optim='adamw',  # the lecture's optimizer for every weight (gpt.py's CPU run uses Muon)
    embedding_lr_scale=1.0,  # one rate for every weight, as the lecture (gpt.py's CPU run: 3x for its tables)
    grad_clip=0.0,  # the lecture does not clip the gradient
)
# ----------------------------------------------------------------------------------------------
# Where gpt.py's parts differ from the video, a comment says so. Two differences touch every step,
# and each moves the final val loss by less than 0.02: the models of steps 1-5 keep PyTorch's default
# init, as in the video, while step 6 is gpt.GPTLanguageModel with its normal(0.02) init (added in
# the lecture's repo after the video); and gpt.Head scales attention by head_size**-0.5 where the
# video scales by C**-0.5 (n_embd, 32): the same at step 1, twice the video's from step 2 on.


class LectureStep(nn.Module):
    """ what every step shares: token and position embeddings in, lm_head out; a step fills in body """

    def __init__(self, config):
        super().__init__()
        self.config = config  # generate crops the context to config.block_size
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def body(self, x):
        raise NotImplementedError

    def forward(self, idx, targets=None):
        B, T = idx.shape
        # idx and targets are both (B,T) tensor of integers
        tok_emb = self.token_embedding_table(idx)  # (B,T,C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
        x = tok_emb + pos_emb  # (B,T,C)
        x = self.body(x)  # (B,T,C)
        logits = self.lm_head(x)  # (B,T,vocab_size)
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
        return logits, loss

    generate = gpt.GPTLanguageModel.generate  # the same sampling code as the GPT

    # settings of gpt.py's model that a step does not have: refused on the command line, not ignored
    ignored_settings = ('position_embedding',)  # a learned table at every step


class OneHeadModel(LectureStep):
    """ step 1: each token reads the tokens before it through one head of self-attention """

    def __init__(self, config):
        super().__init__(config)
        self.sa_head = gpt.Head(config, head_size=config.n_embd)

    ignored_settings = LectureStep.ignored_settings + ('n_head', 'n_layer', 'activation', 'fused_attention')

    def body(self, x):
        return self.sa_head(x)  # apply one head of self-attention: (B,T,C)


class MultiHeadModel(LectureStep):
    """ step 2: four heads of 8 in parallel, their outputs side by side """

    def __init__(self, config):
        super().__init__(config)
        self.sa_heads = heads_without_proj(config)

    ignored_settings = LectureStep.ignored_settings + ('n_layer', 'activation')

    def body(self, x):
        return self.sa_heads(x)  # apply multi-head self-attention: (B,T,C)


class FeedForwardModel(LectureStep):
    """ step 3: the heads communicate, then a feed-forward layer thinks about it, token by token """

    def __init__(self, config):
        super().__init__(config)
        self.sa_heads = heads_without_proj(config)
        self.ffwd = FirstFeedForward(config)

    ignored_settings = LectureStep.ignored_settings + ('n_layer',)

    def body(self, x):
        x = self.sa_heads(x)  # apply multi-head self-attention: (B,T,C)
        x = self.ffwd(x)  # (B,T,C)
        return x


class PlainBlocksModel(LectureStep):
    """ step 4: three blocks of attention and feed-forward stacked, no residuals: a deep net that trains badly """

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.Sequential(*[PlainBlock(config) for _ in range(config.n_layer)])

    def body(self, x):
        return self.blocks(x)  # (B,T,C)


class ResidualBlocksModel(LectureStep):
    """ step 5: the same three blocks, each adding its result to the residual stream x """

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.Sequential(*[ResidualBlock(config) for _ in range(config.n_layer)])

    def body(self, x):
        return self.blocks(x)  # (B,T,C)


# step 6, the blocks with LayerNorm before sa and ffwd and a final ln_f, is gpt.GPTLanguageModel itself


def heads_without_proj(config):
    """ gpt.MultiHeadAttention without its output projection, which the lecture adds with the blocks """
    sa_heads = gpt.MultiHeadAttention(config)
    sa_heads.proj = nn.Identity()  # the heads' weights and names stay the lecture's: sa_heads.heads.0.key.weight
    return sa_heads


class FirstFeedForward(nn.Module):
    """ the lecture's first feed-forward: one linear layer and a non-linearity """

    def __init__(self, config):
        super().__init__()
        # gpt.FeedForward is the later form, which the lecture adds with the blocks: a 4x wider inner
        # layer, then a projection back to n_embd. Here at step 3 it would have 8,352 weights rather
        # than the video's 1,056, and reach val loss 2.18 rather than the video's 2.24
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, config.n_embd),
            nn.GELU() if config.activation == 'gelu' else nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)  # (B,T,C)


class ResidualBlock(gpt.Block):
    """ the lecture's Block before LayerNorm: x + sa(x), then x + ffwd(x) """

    def __init__(self, config):
        super().__init__(config)
        self.ln1 = nn.Identity()  # the layer norms come at step 6
        self.ln2 = nn.Identity()


class PlainBlock(ResidualBlock):
    """ the same block without its residual connections: each layer only sees the one before """

    # the video stacks step 3's parts here (no projections, a 1x feed-forward) and adds the projections
    # and the 4x feed-forward with the residuals; here they come first, so steps 4 and 5 differ in the
    # residual connections alone
    def forward(self, x):
        x = self.sa(x)  # (B,T,C)
        x = self.ffwd(x)  # (B,T,C)
        return x


# step: (what it adds, the video's val loss, the model, settings of its own on top of defaults)
steps = {
    0: ("bigram: a table row of logits per character (bigram.py's model, lr 1e-2, 3000 steps)", 2.49,
        bigram.BigramLanguageModel, dict(learning_rate=1e-2, max_iters=3000, eval_interval=300)),
    1: ("token and position embeddings, one head of self-attention (head_size 32)", 2.4, OneHeadModel, {}),
    2: ("4 heads of 8 in parallel instead (multi-head attention)", 2.28, MultiHeadModel, {}),
    3: ("+ a feed-forward layer after the heads: Linear(32,32) and ReLU", 2.24, FeedForwardModel, {}),
    4: ("3 blocks (attention with a projection, a 4x feed-forward), no residuals:"
        " a deep net that trains badly", None, PlainBlocksModel, {}),
    5: ("+ residual connections: x = x + sa(x), x = x + ffwd(x)", 2.08, ResidualBlocksModel, {}),
    6: ("+ LayerNorm before sa and ffwd, and ln_f: gpt.py's own GPTLanguageModel", 2.06, gpt.GPTLanguageModel, {}),
}


for k, (_, _, model_class, _) in steps.items():  # what a checkpoint of a step says to resume it with
    if model_class.__module__ == __name__:
        model_class.command = f"python lecture_steps.py --step={k}"


# the chapter of the video where each step is built, as the video lists them
chapters = {0: "simplest baseline: bigram language model, loss, generation",
            1: "inserting a single self-attention block to our network", 2: "multi-headed self-attention",
            3: "feedforward layers of transformer block", 4: "residual connections", 5: "residual connections",
            6: "layernorm and its relationship to our previous batchnorm"}


def step_settings(step):
    """ the model class and the defaults of one step, which saves to a folder of its own """
    _, _, model_class, own = steps[step]
    return model_class, {**defaults, **own, 'out_dir': f'out-step{step}'}


def read_step(argv):
    """ the step named by --step=K (None if none), and the other arguments: gpt.py's settings """
    step, rest = None, []
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not (arg.startswith('--') and name == 'step'):
            rest.append(arg)
        elif text.strip() not in [str(k) for k in steps]:
            gpt.die(f"--step takes one of {', '.join(map(str, steps))}, not '{text if eq else arg}' (see --help)")
        else:
            step = int(text)  # the last --step counts, as for gpt.py's settings
    return step, rest


def print_steps():
    """ --help: each step, what it adds, and the val loss the video reached with it """
    print("usage: python lecture_steps.py --step=K [--name=value ...]   (the lecture's models, one step at a time)")
    for k, (adds, loss, _, _) in steps.items():
        print(f"  --step={k}  {adds}" + (f" (video: val loss {loss})" if loss else "") + f"; chapter \"{chapters[k]}\"")
    print("Step K saves to out-step<K>. Below, gpt.py's settings, with the lecture's values for this step (or step 1):")


def main(argv, t_begin=None):
    """ python lecture_steps.py --step=K [--name=value ...]: gpt.main with step K's model and settings """
    step, rest = read_step(argv)
    if '-h' in rest or '--help' in rest:
        print_steps()
        rest = ['--help']  # gpt.py prints its settings, with this step's values (step 1's if none is named)
    elif step is None:
        gpt.die(f"name a step: --step=K with K one of {', '.join(map(str, steps))} (see --help)")
    model_class, step_defaults = step_settings(1 if step is None else step)
    return gpt.main(rest, model_class=model_class, defaults=step_defaults, t_begin=t_begin)


if __name__ == '__main__':
    gpt.run_script(main)  # as python gpt.py runs
