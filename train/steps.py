"""The jitted steps of training, built once from `(config, mesh)`: `build_steps` is what `train.train_and_evaluate`
runs and what `train.aot` compiles for a TPU slice, so the two cannot drift apart.

`train_step(state, batch, rng_state) -> (state, metrics)` advances the sharded `TrainState` (donated) on a global
batch; `eval_step(params, model_state, batch, rng_state)` returns sums of the task's evaluation metrics. The batch
shardings come from the batch's keys and ranks (`sharding.batch_shardings`): `Steps.jit_train_step(batch_shardings)`
gives the jitted train step for them.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from . import input_pipeline, optimizer, sharding, tasks
from . import state as state_lib

# Classes and training examples of the classification datasets the configs name, so that a step can be built
# without the data (`train.aot`); another dataset's classes are read from its TFDS metadata.
DATASET_FACTS = {"imagenet2012": (1000, 1_281_167), "cifar10": (10, 50_000), "cifar100": (100, 50_000),
                 "digits": (10, 1_437)}


def train_step(state: state_lib.TrainState, batch, rng_state, *, model_def, task, tx, schedule, config):
    """One optimizer step on a global batch. Returns `(new_state, metrics)` (metrics stay on the device)."""
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    rng_state = state_lib.reseeded(rng_state, jax.random.fold_in(key, 1))

    def loss_fn(params):
        model = state_lib.merge(model_def.train_graph, params, state.model_state, rng_state)
        with sharding.logical_axis_scope(config.logical_axis_rules):  # the models' activation constraints
            loss, aux = task.train_loss(model, batch, jax.random.fold_in(key, 2))
        return loss, (aux, state_lib.split_model_state(model))

    (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = optimizer.ema_update(ema, params, config.optimizer.ema_decay, state.step)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                              ema_params=ema)
    out = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
           **{k: v for k, v in aux.items()}}
    return new_state, out


def eval_step(params, model_state, batch, rng_state, *, model_def, task, rules):
    """Sums of the task's evaluation metrics over a (masked) global batch."""
    model = state_lib.merge(model_def.eval_graph, params, model_state, rng_state)
    with sharding.logical_axis_scope(rules):
        return task.eval_sums(model, batch)


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # a third to a half of the compile time, slower code


def compile_step(jitted, args, *, fast: bool = False):
    """Compiles `jitted` for `args` (arrays or `ShapeDtypeStruct`s; with XLA's backend optimisations off if
    `fast`: for smoke tests)."""
    lowered = jitted.lower(*args)
    return lowered.compile(compiler_options=FAST_COMPILE) if fast else lowered.compile()


@dataclasses.dataclass(frozen=True)
class Steps:
    """Everything a training run compiles, for one config on one mesh.

    `init()` builds the initial sharded `TrainState`; `abstract_state` is its `ShapeDtypeStruct`s with their
    shardings (`state_shardings`); `eval_step` is jitted (its shardings follow its arguments')."""
    mesh: jax.sharding.Mesh
    model_def: state_lib.ModelDef
    init: object
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    rng_sharding: object
    task: object
    tx: optax.GradientTransformation
    schedule: object
    train_fn: object  # `train_step` with the model, task, optimizer and config bound
    eval_step: object

    def jit_train_step(self, batch_shardings):
        """The jitted train step for batches sharded as `batch_shardings` (the state donated)."""
        return jax.jit(self.train_fn, in_shardings=(self.state_shardings, batch_shardings, self.rng_sharding),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)

    def abstract_batch(self, spec):
        """`spec` (`batch_spec`) with the batch shardings attached."""
        shardings = self.batch_shardings(spec)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in spec.items()}

    def batch_shardings(self, batch):
        """The shardings of a (global) batch: its batch dim over data x fsdp, sequences' length over context."""
        return sharding.batch_shardings(self.mesh, batch, sequence_keys=self.task.sequence_keys)


def build_steps(config, mesh, num_outputs: int, total_steps: int) -> Steps:
    """The model, optimizer, task, sharded train state and jitted steps of `config` on `mesh` (`num_outputs`:
    classes or vocabulary; `total_steps`: the length of the learning-rate schedule)."""
    rules = sharding.logical_rules(config)
    tx, schedule = optimizer.make_optimizer(config, total_steps)
    task = tasks.make_task(config, num_outputs)
    model_def, init, abstract_state, state_shardings = state_lib.create(config, num_outputs, tx, mesh, rules)
    rng_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), model_def.rng_state)
    train_fn = functools.partial(train_step, model_def=model_def, task=task, tx=tx, schedule=schedule,
                                 config=config)
    jitted_eval = jax.jit(functools.partial(eval_step, model_def=model_def, task=task, rules=rules))
    return Steps(mesh=mesh, model_def=model_def, init=init, abstract_state=abstract_state,
                 state_shardings=state_shardings, rng_sharding=rng_sharding, task=task, tx=tx, schedule=schedule,
                 train_fn=train_fn, eval_step=jitted_eval)


def total_train_steps(config, num_train_examples: int) -> int:
    """`config.num_train_steps`, or `num_epochs` of `batch_size` over `num_train_examples` when it is -1."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def batch_spec(config, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of the input pipeline's global batches (`input_pipeline`): classification
    `{'image': uint8 [B, S, S, C], 'label': int32 [B]}`, language models `{'inputs', 'targets': int32 [B, T]}`,
    evaluation batches (`eval_batch_size`) with `'mask': int32 [B]`."""
    batch = config.batch_size if train else config.eval_batch_size
    if config.task == "classification":
        size = config.image_size
        spec = {"image": jax.ShapeDtypeStruct((batch, size, size, config.input.channels), jnp.uint8),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    else:
        tokens = jax.ShapeDtypeStruct((batch, config.seq_len), jnp.int32)
        spec = {"inputs": tokens, "targets": tokens}
    if not train:
        spec["mask"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return spec


def dataset_facts(config) -> tuple[int, int]:
    """`(num_outputs, train_examples)` without reading data: the byte vocabulary for language models; classes
    and split size from `DATASET_FACTS` (else the dataset's TFDS metadata, and one epoch of one step)."""
    if config.task == "lm":
        return input_pipeline.BYTE_VOCAB_SIZE, config.batch_size
    if config.dataset in DATASET_FACTS:
        return DATASET_FACTS[config.dataset]
    return input_pipeline.num_classes(config), config.batch_size
