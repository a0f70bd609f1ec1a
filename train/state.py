"""The model and the train state: building the model, splitting it into arrays, sharded initialisation.

An NNX model is split once into a static `graphdef` (one for training mode, one for evaluation mode) and arrays:
`params` (`nnx.Param`), `model_state` (every other variable, e.g. BatchNorm statistics) and `rng_state` (RNG
streams). The RNG streams are not part of the train state: every step re-seeds them from `(seed, step)` and the
stream's path, so dropout and stochastic depth are reproducible, resumable and independent of the device layout.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import zlib

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.models.layers import axes as axes_lib

from . import sharding as shard_lib
from .validate import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None


@dataclasses.dataclass(frozen=True)
class ModelDef:
    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef
    rng_state: nnx.State


# Config keys every model takes as constructor overrides (the contract in WORKSPACE.md), with the value that
# leaves the model's default: that value is not passed, so a model without the option still builds at defaults.
MODEL_OPTIONS = {"remat": "none", "dtype": "float32", "param_dtype": "float32"}


def _set_option(kwargs, key: str, value, default) -> None:
    """`kwargs[key] = value` unless `value` is `default`; `ConfigError` if `config.model_kwargs` says otherwise."""
    if value in (None, "", default):
        return
    if kwargs.get(key) not in (None, "", value):
        raise ConfigError(f"config.{key} = {value!r} contradicts config.model_kwargs.{key} = {kwargs[key]!r}; "
                          f"set only one")
    kwargs[key] = value


def _call_builder(builder, config, rngs, kwargs):
    """`builder(rngs=rngs, **kwargs)`; a model that does not take one of the config's options is a ConfigError
    naming it (never silently ignored)."""
    try:
        return builder(rngs=rngs, **kwargs)
    except TypeError as e:
        key = next((k for k in ("context_parallel", *MODEL_OPTIONS) if k in kwargs and
                    f"unexpected keyword argument '{k}'" in str(e)), None)
        if key is None:
            raise
        raise ConfigError(f"config.{key} = {config.get(key)!r}: model {config.model!r} does not take `{key}=` "
                          f"(leave it at {MODEL_OPTIONS.get(key, '')!r})") from None


def build_model(config, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
    """`config.model` is a registry name (`jaxattn.models.create_model`) or `'package.module:builder'`, a callable
    `builder(*, rngs, num_classes | vocab_size, **config.model_kwargs)`. Vision models get `num_classes`, language
    models `vocab_size`. A non-empty `config.context_parallel` is passed as the builder's `context_parallel=`, and
    `config.remat`, `config.dtype`, `config.param_dtype` as `remat=`, `dtype=`, `param_dtype=` when they differ
    from `MODEL_OPTIONS` (a model that does not take them then fails with a `ConfigError` naming the key)."""
    kwargs = dict(config.model_kwargs)
    kwargs["num_classes" if config.task == "classification" else "vocab_size"] = num_outputs
    strategy = config.get("context_parallel", "") or None
    _set_option(kwargs, "context_parallel", strategy, None)
    for key, default in MODEL_OPTIONS.items():
        _set_option(kwargs, key, config.get(key, default), default)
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = jnp.dtype(kwargs[key])
    if ":" in config.model:
        module, _, attr = config.model.partition(":")
        return _call_builder(getattr(importlib.import_module(module), attr), config, rngs, kwargs)
    from jaxattn.models import context_parallel, create_model, get_entry
    entry = get_entry(config.model)
    expected = "vision" if config.task == "classification" else "lm"
    if entry.kind != expected:
        raise ValueError(f"`model` {config.model!r} is a {entry.kind} model, but `task` is {config.task!r}")
    if strategy is not None and strategy not in context_parallel.supported(entry.family):
        options = context_parallel.supported(entry.family)
        raise ConfigError(f"config.context_parallel = {strategy!r}: the {entry.family} family (model "
                          f"{config.model!r}) supports " + (f"{', '.join(map(repr, options))} or ''" if options
                                                            else "no context-parallel strategy (leave it '')"))
    return _call_builder(functools.partial(create_model, config.model), config, rngs, kwargs)


def _rngs(config) -> nnx.Rngs:
    return nnx.Rngs(params=config.seed, dropout=config.seed + 1)


def _split(model):
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def _init_fn(config, num_outputs, tx):
    def init():
        with nnx.use_eager_sharding(False):
            model = build_model(config, num_outputs, _rngs(config))
        _, params, rng_state, model_state = _split(model)
        ema = params if config.optimizer.ema_decay > 0 else None
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                           opt_state=tx.init(params), ema_params=ema)
        return state, rng_state
    return init


def _shardings(abstract, mesh, rules):
    """Variables (parameters, their optimizer moments, statistics) get their logical / FSDP sharding (`rules`:
    overrides of `axes.RULES`); everything else (step counters, scalars) is replicated."""
    rules = axes_lib.rules(rules)

    def leaf(x):
        if isinstance(x, nnx.Variable):
            return x.replace(shard_lib.variable_sharding(x, mesh, rules))
        return shard_lib.replicated(mesh)
    return jax.tree.map(leaf, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create(config, num_outputs: int, tx, mesh, rules):
    """Returns `(model_def, init, abstract_state, state_shardings)`.

    `init()` builds the initial `TrainState` on the mesh, already sharded; `abstract_state` carries the shardings
    (for restoring checkpoints into place).
    """
    init = _init_fn(config, num_outputs, tx)
    with jax.set_mesh(mesh):
        abstract_state, abstract_rngs = jax.eval_shape(init)
    try:
        shard_lib.check_tensor_split(abstract_state.params, mesh)
    except ValueError as e:
        raise ConfigError(f"config.mesh = {dict(mesh.shape)!r}: {e}") from None
    state_shardings = _shardings(abstract_state, mesh, rules)
    rng_state = jax.tree.map(_placeholder, abstract_rngs)  # values never used: every step re-seeds
    with nnx.use_eager_sharding(False):  # outside the mesh: logical names are not mesh axes
        abstract_model = nnx.eval_shape(lambda: build_model(config, num_outputs, _rngs(config)))
    abstract_model.train()
    train_graph = nnx.graphdef(abstract_model)
    abstract_model.eval()
    eval_graph = nnx.graphdef(abstract_model)
    abstract_with_sharding = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
    def initializer():
        with jax.set_mesh(mesh):
            lowered = jax.jit(lambda: init()[0], out_shardings=state_shardings).lower()
        if jax.default_backend() != "cpu":
            return lowered.compile()()
        # Runs once: on CPU, XLA's backend optimisations cost far more compile time than they save (3x).
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()

    return ModelDef(train_graph, eval_graph, rng_state), initializer, abstract_with_sharding, state_shardings


def _placeholder(a: jax.ShapeDtypeStruct):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        key = jax.random.key(0)
        return jax.random.split(key, a.shape) if a.shape else key
    return jnp.zeros(a.shape, a.dtype)


def merge(graph: nnx.GraphDef, params, model_state, rng_state) -> nnx.Module:
    return nnx.merge(graph, params, rng_state, model_state, copy=True)


def split_model_state(model) -> nnx.State:
    """The non-parameter, non-RNG variables of a (merged) model, e.g. updated BatchNorm statistics."""
    return _split(model)[3]


def reseeded(rng_state: nnx.State, key: jax.Array) -> nnx.State:
    """`rng_state` with every stream re-seeded from `key` (e.g. `fold_in(seed_key, step)`): each stream's key is
    `key` folded with a hash of the stream's path, and its counter restarts at 0."""
    def leaf(path, v):
        if isinstance(v, nnx.RngKey):
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            new = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            shape = v.get_value().shape
            return v.replace(jax.random.split(new, shape) if shape else new)
        if isinstance(v, nnx.RngCount):
            return v.replace(jnp.zeros_like(v.get_value()))
        return v
    return jax.tree_util.tree_map_with_path(leaf, rng_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
