"""Trajectory parity with torch.optim: same model, same data, same hyperparameters, 120 steps.

Both sides run in float64 and compute their own gradients (JAX autodiff vs torch autograd) at
their own parameters, so any difference in the update rule compounds over the trajectory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import schedules

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

pytestmark = pytest.mark.torch

STEPS = 120
RTOL = 1e-5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 0.5, (6, 16)),
        "b1": rng.normal(0, 0.1, (16,)),
        "w2": rng.normal(0, 0.5, (16, 3)),
        "b2": np.zeros(3),
    }
    xs = rng.normal(size=(STEPS, 32, 6))
    ys = rng.integers(0, 3, size=(STEPS, 32))
    return params, xs, ys


def _jax_loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _torch_loss(p, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return torch.nn.functional.cross_entropy(h @ p["w2"] + p["b2"], y)


def _run_jax(tx, params, xs, ys):
    with jax.enable_x64(True):
        p = jax.tree.map(jnp.asarray, params)
        state = tx.init(p)

        @jax.jit
        def step(p, state, x, y):
            g = jax.grad(_jax_loss)(p, x, y)
            u, state = tx.update(g, state, p)
            return dl.apply_updates(p, u), state

        traj = []
        for x, y in zip(xs, ys):
            p, state = step(p, state, jnp.asarray(x), jnp.asarray(y))
            traj.append(jax.tree.map(np.asarray, p))
    return traj


def _run_torch(make_opt, params, xs, ys, scheduler=None):
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = make_opt(list(p.values()))
    sched = scheduler(opt) if scheduler else None
    traj = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        _torch_loss(p, torch.tensor(x), torch.tensor(y)).backward()
        opt.step()
        if sched:
            sched.step()
        traj.append({k: v.detach().numpy().copy() for k, v in p.items()})
    return traj


def _assert_same_trajectory(ours, theirs, params):
    moved = max(np.abs(theirs[-1][k] - params[k]).max() for k in params)
    assert moved > 1e-2, "the problem is too easy: parameters barely moved"
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=1e-9, err_msg=f"step {step}, {k}")


CASES = {
    "sgd": (lambda: dl.sgd(0.3), lambda ps: torch.optim.SGD(ps, lr=0.3)),
    "sgd_momentum": (
        lambda: dl.sgd(0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ),
    "sgd_nesterov_weight_decay": (
        lambda: dl.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "adagrad": (
        lambda: dl.adagrad(0.1, eps=1e-7),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-7),
    ),
    "rmsprop": (
        lambda: dl.rmsprop(0.01, decay=0.9, eps=1e-8),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8),
    ),
    "rmsprop_centered": (
        lambda: dl.rmsprop(0.01, decay=0.95, eps=1e-6, centered=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95, eps=1e-6, centered=True),
    ),
    "rmsprop_momentum": (
        lambda: dl.rmsprop(0.003, decay=0.9, momentum=0.8),
        lambda ps: torch.optim.RMSprop(ps, lr=0.003, alpha=0.9, momentum=0.8),
    ),
    "rmsprop_centered_momentum": (
        lambda: dl.rmsprop(0.003, decay=0.99, eps=1e-8, centered=True, momentum=0.9),
        lambda ps: torch.optim.RMSprop(ps, lr=0.003, alpha=0.99, eps=1e-8, centered=True, momentum=0.9),
    ),
    "adam": (
        lambda: dl.adam(0.01, b1=0.9, b2=0.999, eps=1e-8),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8),
    ),
    "adamw": (
        lambda: dl.adamw(0.01, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_matches_torch_trajectory(name):
    ours, theirs = CASES[name]
    params, xs, ys = _problem()
    _assert_same_trajectory(_run_jax(ours(), params, xs, ys), _run_torch(theirs, params, xs, ys), params)


def test_sgd_momentum_with_step_decay_schedule_matches_torch_steplr():
    params, xs, ys = _problem(1)
    ours = dl.sgd(schedules.step_decay(0.2, 0.5, every=30), momentum=0.9)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
        params,
        xs,
        ys,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5),
    )
    _assert_same_trajectory(_run_jax(ours, params, xs, ys), theirs, params)


def test_adam_with_inverse_time_decay_matches_torch_lambdalr():
    params, xs, ys = _problem(2)
    ours = dl.adam(schedules.inverse_time_decay(0.02, decay=0.05))
    theirs = _run_torch(
        lambda ps: torch.optim.Adam(ps, lr=0.02),
        params,
        xs,
        ys,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.05 * k)),
    )
    _assert_same_trajectory(_run_jax(ours, params, xs, ys), theirs, params)
