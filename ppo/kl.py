"""KL-penalty coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences", section 2.2).

The per-token reward in PPO is r_t = -beta * kl_t (+ the score at the end). `beta` is
either fixed, or adapted once per PPO iteration so that the measured KL(pi || pi_ref)
tracks a target:

    e    = clip(KL / target - 1, -0.2, 0.2)          (proportional error, clipped)
    beta = beta * (1 + e * n_steps / horizon)

where n_steps is the number of samples (episodes) consumed since the last update and
horizon (10000 in the paper) sets how fast beta moves.

The controllers are small Python objects living outside jit (they change once per
iteration, from a host-side KL metric). Their state is a flat dict of Python floats,
`state_dict()` / `load_state_dict()`, saved with the checkpoint so that a resumed run
continues with the same beta rather than restarting from init_beta.
"""

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Number = Union[float, int, np.ndarray, jax.Array]

KL_CONTROLLER_KINDS = ("fixed", "adaptive")
_MAX_ERROR = 0.2  # Ziegler et al.: proportional error clipped to [-0.2, 0.2].


def _clip(x, lo: float, hi: float):
    """clip() for Python numbers, NumPy and JAX arrays (including tracers)."""
    if isinstance(x, jax.Array):
        return jnp.clip(x, lo, hi)
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    return min(max(x, lo), hi)


def _check_positive(name: str, value, where: str) -> None:
    # Traced values cannot be checked; they are the caller's responsibility under jit.
    if isinstance(value, jax.core.Tracer):
        return
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"ppo/kl.py {where}: {name} must be a finite number > 0, got {value}")


def adaptive_kl_update(beta: Number, *, kl: Number, target: Number, horizon: Number, n_steps: Number) -> Number:
    """One adaptive-KL step (Ziegler et al. 2019); pure, works on floats or (traced) arrays.

    Args:
      beta: current KL coefficient.
      kl: measured KL(pi || pi_ref) in nats (per sequence, as `target`).
      target: KL target in nats (e.g. 6).
      horizon: adaptation horizon in samples (e.g. 10000).
      n_steps: samples consumed since the previous update (e.g. the rollout batch size).

    Returns:
      beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon), same kind as the
      inputs (a Python float when all inputs are Python numbers).
    """
    _check_positive("target", target, "adaptive_kl_update")
    _check_positive("horizon", horizon, "adaptive_kl_update")
    proportional_error = _clip(kl / target - 1.0, -_MAX_ERROR, _MAX_ERROR)
    return beta * (1.0 + proportional_error * n_steps / horizon)


class FixedKLController:
    """Constant KL coefficient: `.value` stays `beta`; `update` is a no-op."""

    kind = "fixed"

    def __init__(self, beta: float):
        if not (math.isfinite(float(beta)) and float(beta) >= 0):
            raise ValueError(f"ppo/kl.py FixedKLController: beta must be a finite number >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: Number, n_steps: int) -> float:
        """Does nothing (the coefficient is fixed); returns the current value."""
        del current_kl, n_steps
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The controller state for checkpointing: {'value': beta}."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the state written by `state_dict` (values may be NumPy scalars)."""
        self.value = _read_value(state, "FixedKLController", allow_zero=True)

    def __repr__(self) -> str:
        return f"FixedKLController(beta={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019) steering KL(pi || pi_ref) to `target`.

    Args:
      init_beta: initial coefficient (> 0; a zero beta could never adapt).
      target: target KL in nats, measured the same way as the KL passed to `update`.
      horizon: adaptation horizon in samples (10000 in the paper).
    """

    kind = "adaptive"

    def __init__(self, init_beta: float, *, target: float, horizon: float = 10000):
        _check_positive("init_beta", init_beta, "AdaptiveKLController")
        _check_positive("target", target, "AdaptiveKLController")
        _check_positive("horizon", horizon, "AdaptiveKLController")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Number, n_steps: int) -> float:
        """Adapts beta from the KL measured over the last `n_steps` samples; returns it.

        Raises:
          ValueError: if `current_kl` is not finite (a nan would silently poison beta for the
            rest of the run) or `n_steps` is negative.
        """
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"ppo/kl.py AdaptiveKLController.update: current_kl must be finite, got {kl}")
        if n_steps < 0:
            raise ValueError(f"ppo/kl.py AdaptiveKLController.update: n_steps must be >= 0, got {n_steps}")
        self.value = float(
            adaptive_kl_update(self.value, kl=kl, target=self.target, horizon=self.horizon, n_steps=int(n_steps))
        )
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The controller state for checkpointing: {'value': beta}.

        target and horizon are configuration (they come back from the config on resume),
        so only the adapted coefficient is state.
        """
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the state written by `state_dict` (values may be NumPy scalars)."""
        self.value = _read_value(state, "AdaptiveKLController", allow_zero=False)

    def __repr__(self) -> str:
        return f"AdaptiveKLController(beta={self.value}, target={self.target}, horizon={self.horizon})"


def _read_value(state: dict[str, Any], owner: str, *, allow_zero: bool) -> float:
    if not hasattr(state, "keys") or "value" not in state:
        raise ValueError(f"ppo/kl.py {owner}.load_state_dict: expected a dict with key 'value', got {state!r}")
    value = float(np.asarray(state["value"]))
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"ppo/kl.py {owner}.load_state_dict: key 'value' must be a finite "
            f"beta {'>=' if allow_zero else '>'} 0, got {value}"
        )
    return value


def make_kl_controller(
    *, kind: str = "fixed", init_beta: float, target: Optional[float] = None, horizon: float = 10000
):
    """Builds a KL controller from config values.

    Args:
      kind: 'fixed' or 'adaptive'.
      init_beta: the (initial) KL coefficient.
      target: target KL in nats; required for 'adaptive', ignored for 'fixed' (so one
        config can switch kinds without editing other fields).
      horizon: adaptation horizon in samples (adaptive only).

    Returns:
      FixedKLController or AdaptiveKLController.
    """
    if kind == "fixed":
        return FixedKLController(init_beta)
    if kind == "adaptive":
        if target is None:
            raise ValueError("ppo/kl.py make_kl_controller: kind='adaptive' needs a KL target (nats), got target=None")
        return AdaptiveKLController(init_beta, target=target, horizon=horizon)
    raise ValueError(
        f"ppo/kl.py make_kl_controller: unknown kind {kind!r}; expected one of {', '.join(KL_CONTROLLER_KINDS)}"
    )
