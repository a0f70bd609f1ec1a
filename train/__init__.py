"""Training: `python -m train.main --config configs/<family>.py[:variant]`. Installed as `jaxattn.train`.

One job per module:
    main.py            command-line flags, `jax.distributed` set-up; `run()` is the `jaxattn-train` entry point
    train.py           `train_and_evaluate(config, workdir)`, `train_step`, `eval_step`: the loop
    validate.py        config checks, a `ConfigError` naming the field
    state.py           model building (registry name or `module:builder`), `TrainState`, sharded init, RNG re-seeding
    sharding.py        mesh from the config (Auto axes), parameter / batch shardings, host -> global arrays
    optimizer.py       AdamW, warmup-cosine, clipping, parameter EMA
    tasks.py           losses and metrics: classification (accuracy), byte-level LM (bits per byte)
    input_pipeline.py  grain over `tfds.data_source`: deterministic, per-process rows, checkpointable
    augment.py         random resized crop, flip, RandAugment, mixup / cutmix, label smoothing
    checkpoint.py      orbax CheckpointManager: async, keep N, resume, damaged-step fallback, SIGTERM
    metrics.py         metrics.jsonl, TensorBoard (tensorboardX), progress bar, curves.png
    datasets/          the embedded TFDS datasets (`digits`, `stdlib_bytes`), built offline on first use
"""
