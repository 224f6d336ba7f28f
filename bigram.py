"""
The lecture's baseline: a bigram model that predicts the next character from the current one alone.
It differs from gpt.py only in the model: the data, training loop and sampling are gpt.py's own.

    python bigram.py                      # trains in well under a minute on a CPU, then samples
    python bigram.py --max_iters=500      # takes the same settings as gpt.py (see --help)
"""
import gpt  # first: the time budget's clock starts when gpt.py is imported, before torch loads

import torch.nn as nn
from torch.nn import functional as F

# hyperparameters: the lecture's bigram run (every other constant is gpt.py's)
defaults = dict(
    batch_size=32,  # how many independent sequences will we process in parallel?
    block_size=8,  # what is the maximum context length for predictions?
    max_iters=3000,  # total optimizer steps (the cosine decays the rate to a tenth at the last)
    max_time=0,  # no time budget: the lecture's step count
    eval_interval=300,  # estimate train and val loss every this many steps
    eval_iters=200,  # batches of each split averaged in one estimate
    log_interval=500,  # print progress every this many steps
    learning_rate=1e-2,  # a single lookup table learns fast
    dropout=0.0,  # nothing to drop out
    beta2=0.99,  # AdamW beta2 (gpt.py's 0.95 on a CPU is for its 3-minute run)
    optim='adamw',  # the lecture's optimizer for every weight (gpt.py's CPU run uses Muon)
    embedding_lr_scale=1.0,  # one rate for every weight, as the lecture (gpt.py's CPU run: 3x for its tables)
    out_dir='out-bigram',  # its checkpoints apart from gpt.py's
)
# ----------------------------------------------------------------------------------------------


class BigramLanguageModel(nn.Module):
    """ each token directly reads off the logits for the next token from a lookup table """

    def __init__(self, config):
        super().__init__()
        self.config = config  # generate crops the context to config.block_size
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        # idx and targets are both (B,T) tensor of integers
        logits = self.token_embedding_table(idx)  # (B,T,C)
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
        return logits, loss

    generate = gpt.GPTLanguageModel.generate  # the same sampling code as the GPT

    # settings of gpt.py's model that this one does not have: refused on the command line, not ignored
    ignored_settings = ('n_layer', 'n_head', 'n_embd', 'activation', 'position_embedding', 'qkv_bias',
                        'fused_attention')


if __name__ == '__main__':
    gpt.run_script(gpt.main, model_class=BigramLanguageModel, defaults=defaults)  # as python gpt.py runs
