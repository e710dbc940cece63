"""`flax.nnx` modules as jaxdl layers: `from_nnx`, `as_layer`, `update_module`.

nnx modules are stateful Python objects that hold their variables; jaxdl layers are pure
functions of explicit values. The bridge is nnx's own functional API (flax docs, "Functional
API" / "NNX basics": ``nnx.split``, ``nnx.merge``, ``nnx.update``): a module is split once into a
static ``GraphDef`` and its state, and every ``apply`` merges the graph with the values it is
given into a fresh module, runs it, and splits the new state off again. The user's module is
never mutated (until `update_module` writes trained values back into it).

Which values go where:

- ``params``: every ``nnx.Param`` (``nnx.to_pure_dict``: nested dicts of arrays, keyed by
  attribute names, list indices as ints), what gradients update;
- model ``state``: every other variable but the RNG streams (``nnx.BatchStat`` running
  statistics, counters, ...), what training updates without gradients;
- RNG streams (``nnx.RngState``, e.g. the stream a ``nnx.Dropout(rngs=...)`` keeps) are not
  carried: each training ``apply`` reseeds every stream from jaxdl's ``key``
  (``nnx.reseed``; the ``dropout`` stream with ``key`` itself, any other stream ``s`` with
  ``fold_in(key, crc32(s))``), so jaxdl's ``fold_in(key, step)`` scheme decides the masks, as it
  does for `jaxdl.layers.Dropout`, and resume and vmapped sweeps stay bitwise.

Modes: ``train=True`` runs ``module.train()`` (``deterministic=False``,
``use_running_average=False`` on every submodule that has them), ``train=False`` runs
``module.eval()``: Dropout off, BatchNorm on its running statistics.

Initialization: an nnx module is initialized when it is built (``nnx.Rngs``), so ``init``
returns copies of its *current* values and ignores jaxdl's ``key``; seeds do not change the
initial parameters of an nnx model (build one module per seed for that).
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxdl._checks import check_model
from jaxdl.layers import Layer

__all__ = ["NnxModule", "as_layer", "from_nnx", "update_module"]

# id(module) -> its adapter, while the adapter lives (the adapter holds the module, so the id
# cannot be reused before the entry goes)
_ADAPTERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _nnx():
    from flax import nnx  # imported only when an nnx model is used

    return nnx


def is_nnx_module(obj: Any) -> bool:
    """Whether ``obj`` is a ``flax.nnx.Module`` (without importing flax.nnx when it is not loaded:
    an object cannot be an nnx module before nnx is imported).

    Args:
      obj: any object.

    Returns:
      A bool.
    """
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _copy(tree):
    # fit donates its state to the compiled loop; the module's own buffers must survive that
    return jax.tree.map(jnp.copy, tree)


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def _with_values(template, values):
    """A new ``nnx.State`` of ``template``'s variables holding ``values`` (a pure dict).

    ``nnx.replace_by_pure_dict`` replaces the top-level entries of the state it is given (with new
    nested dicts of new variables), so a shallow copy keeps ``template`` untouched.
    """
    nnx = _nnx()
    state = nnx.State(dict(template))
    nnx.replace_by_pure_dict(state, values)
    return state


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a module is never hashed
class NnxModule(Layer):
    """A ``flax.nnx.Module`` as a layer (made by `from_nnx`; see the module docstring).

    ``init(key, input_shape)`` returns the output shape (traced with ``jax.eval_shape``), copies of
    the module's ``nnx.Param`` values as params and of its other non-RNG variables as state;
    ``apply(params, state, x, train=, key=)`` runs the module on ``x`` in train or eval mode and
    returns ``(y, new_state)``. Training a module that holds RNG streams (Dropout) needs ``key``.
    """

    module: Any
    graphdef: Any = dataclasses.field(repr=False)
    params_template: Any = dataclasses.field(repr=False)
    state_template: Any = dataclasses.field(repr=False)
    rng_state: Any = dataclasses.field(repr=False)

    def __repr__(self):
        return f"NnxModule({type(self.module).__name__})"

    def _split(self, module):
        nnx = _nnx()
        return nnx.split(module, nnx.Param, nnx.RngState, ...)

    def _values(self):
        nnx = _nnx()
        _, params, rngs, state = self._split(self.module)
        return _copy(nnx.to_pure_dict(params)), _copy(nnx.to_pure_dict(state))

    def _init(self, key, input_shape):
        del key  # the module was initialized when it was built
        params, state = self._values()
        x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        y = jax.eval_shape(lambda x: self._apply(params, state, x, False, None)[0], x)
        if not hasattr(y, "shape"):
            raise TypeError(f"NnxModule: the module must return one array, got {type(y).__name__}")
        return tuple(y.shape[1:]), params, state

    def _apply(self, params, state, x, train, key):
        nnx = _nnx()
        module = nnx.merge(
            self.graphdef,
            _with_values(self.params_template, params),
            self.rng_state,
            _with_values(self.state_template, state),
            copy=True,  # new variables: the stored ones are never mutated (nor from inside a trace)
        )
        module.train() if train else module.eval()
        tags = sorted({s.key.tag for _, s in nnx.iter_graph(module) if isinstance(s, nnx.RngStream)})
        if train and tags:
            if key is None:
                raise ValueError(
                    f"NnxModule({type(self.module).__name__}).apply: the module holds RNG streams "
                    f"{tags} (e.g. Dropout); training needs a key (apply(..., train=True, key=...))"
                )
            nnx.reseed(
                module,
                **{
                    t: key if t == "dropout" else jax.random.fold_in(key, zlib.crc32(t.encode()))
                    for t in tags
                },
            )
        y = module(x)
        _, _, _, new_state = self._split(module)
        return y, nnx.to_pure_dict(new_state)


def from_nnx(module) -> NnxModule:
    """Wrap a ``flax.nnx.Module`` as a jaxdl layer (see `NnxModule`); the same adapter for the
    same module object while its structure (``GraphDef``, static attributes included) is the
    same, so compiled steps are reused.

    The module must map a batch ``x`` to one array, ``module(x)``; its mode is switched with
    ``train()``/``eval()``. Source: flax docs, "Flax NNX: basics" (split/merge) and
    ``nnx.Module.train``.

    Args:
      module: a ``flax.nnx.Module``.

    Returns:
      An `NnxModule` layer.
    """
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"from_nnx: module must be a flax.nnx.Module, got an object of type {type(module).__name__}"
        )
    graphdef, params, rngs, state = nnx.split(module, nnx.Param, nnx.RngState, ...)
    adapter = _ADAPTERS.get(id(module))
    if adapter is not None and adapter.module is module and adapter.graphdef == graphdef:
        return adapter
    # templates hold shapes and dtypes only: the values always come from the caller
    adapter = NnxModule(module, graphdef, _abstract(params), _abstract(state), rngs)
    _ADAPTERS[id(module)] = adapter
    return adapter


def as_layer(owner: str, model: Any):
    """``model`` as a layer: an nnx module through `from_nnx`, a layer as it is; anything else
    is refused by `jaxdl._checks.check_model` (naming ``owner``). The one entry of every public
    function that takes a model (`jaxdl.fit`, `jaxdl.evaluate`, `TrainState.create`,
    `supervised_loss`, sweeps, the doctor).

    Args:
      owner: the caller's name, for the error messages.
      model: a jaxdl layer or an nnx module.

    Returns:
      A layer.
    """
    if is_nnx_module(model):
        return from_nnx(model)
    check_model(owner, model)
    return model


def update_module(module, params, model_state=None) -> None:
    """Write trained ``params`` (and ``model_state``, e.g. BatchNorm statistics) into the nnx
    ``module`` in place (``nnx.update``), e.g. ``update_module(model, result.state.params,
    result.state.model_state)`` after ``result = jaxdl.fit(model, ...)``.

    The trees are those `from_nnx` produces (``nnx.to_pure_dict`` of the Param and the other
    non-RNG state); a tree of another structure is refused by nnx with a KeyError/ValueError.

    Args:
      module: the ``flax.nnx.Module`` the model was made from.
      params: trained parameters (e.g. ``result.state.params``).
      model_state: the trained state, or None.
    """
    nnx = _nnx()
    adapter = from_nnx(module)
    nnx.update(module, _with_values(adapter.params_template, _copy(params)))
    if model_state is not None:
        nnx.update(module, _with_values(adapter.state_template, _copy(model_state)))
