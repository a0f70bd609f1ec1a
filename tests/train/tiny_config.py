"""Test config: the tiny models of `tiny_train_models.py` on the embedded datasets, a few steps.

    tiny_config.py            classifier on digits at 16 px
    tiny_config.py:lm         byte-level LM on stdlib_bytes, 32-byte windows
"""
import ml_collections

from jaxattn.configs import base


def get_config(arg=None):
    c = base.get_config()
    c.model = "tiny_train_models:classifier"
    c.model_kwargs = ml_collections.ConfigDict({"delay": 0.0, "poison_after": 0, "dropout": 0.1})
    c.image_size = 16
    c.batch_size = 16
    c.eval_batch_size = 64
    c.eval_max_examples = 64
    c.num_train_steps = 12
    c.optimizer.warmup_steps = 2
    c.log_every = 2
    c.eval_every = 6
    c.checkpoint_every = 3
    c.data_threads = 1
    c.compile_fast = True
    if arg == "lm":
        c.task = "lm"
        c.model = "tiny_train_models:language_model"
        c.model_kwargs = ml_collections.ConfigDict({"dim": 16})
        c.dataset = "stdlib_bytes"
        c.seq_len = 32
        c.eval_max_examples = 128
    return c
