"""The one calling convention of :mod:`reco_ref.fusion.reference`, checked by walking the module.

For every ``*_forward`` function there is a ``*_backward`` and (issue 8, ARCHITECTURE.md):

* ``out, cache = step_forward(...)`` — exactly two values, ``cache`` a plain ``dict``;
* ``step_backward(cache, dout)`` — exactly these two positional parameters, in this order (the whole
  layer's ``fusion_backward(params, cache, dout, *, ...)`` is the one documented exception: ``params``
  first, the backend contract);
* the backward returns one gradient per float input of the forward, in the forward's argument order,
  each with that input's shape and dtype: the array itself for one input, a tuple for several.

A new step added to ``reference.py`` without an entry in ``STEP_INPUTS`` fails the first test, so the
convention cannot be skipped silently. The constants test fails if a backend redefines a constant
that lives in :mod:`reco_ref.fusion.constants`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from reco_ref.fusion import reference as R
from reco_ref.fusion.params import init_params


def _fusion_inputs(rng):
    params = dict(init_params(8, 2, mlp_ratio=2, seed=1, dtype=np.float64))
    for name in params:  # move off the identity init so every gradient is non-trivial
        params[name] = params[name] + 0.1 * rng.standard_normal(params[name].shape)
    mask = np.array([[True, False, True], [True, True, True]])
    return {"params": params, "query": rng.standard_normal((2, 8)), "retrieved": rng.standard_normal((2, 3, 8)),
            "mask": mask, "heads": 2}  # fmt: skip


#: step name → small inputs for its forward (keyword arguments named as in the forward's signature)
STEP_INPUTS = {
    "layernorm": lambda rng: {"x": rng.standard_normal((2, 3, 5)), "gamma": rng.standard_normal(5),
                              "beta": rng.standard_normal(5)},  # fmt: skip
    "linear": lambda rng: {"x": rng.standard_normal((4, 3)), "w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)},
    "attention": lambda rng: {"q": rng.standard_normal((2, 2, 3, 4)), "k": rng.standard_normal((2, 2, 3, 4)),
                              "v": rng.standard_normal((2, 2, 3, 4)), "valid": np.array([[1, 0, 1], [1, 1, 1]], bool)},  # fmt: skip
    "relevance_bias": lambda rng: {"scores": rng.standard_normal((2, 3)), "beta": rng.standard_normal(2),
                                   "gamma": rng.standard_normal(2)},  # fmt: skip
    "gelu": lambda rng: {"u": rng.standard_normal((3, 4))},
    "l2normalize": lambda rng: {"z": rng.standard_normal((3, 4))},
    "fusion": _fusion_inputs,
}


def _steps(module=R):
    """Names ``s`` of every function pair ``s_forward`` / ``s_backward`` defined in ``module``."""
    funcs = {n for n, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__}
    fwd = {n[: -len("_forward")] for n in funcs if n.endswith("_forward")}
    bwd = {n[: -len("_backward")] for n in funcs if n.endswith("_backward")}
    assert fwd == bwd, f"unpaired steps: forwards without backward {sorted(fwd - bwd)}, backwards without forward {sorted(bwd - fwd)}"
    return sorted(fwd)


def _positional(fn):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def check_convention(module, step: str, rng) -> None:
    """Assert the convention for ``module.<step>_forward`` / ``<step>_backward`` (raises AssertionError)."""
    fwd, bwd = getattr(module, f"{step}_forward"), getattr(module, f"{step}_backward")
    want_pos = ["params", "cache", "dout"] if step == "fusion" else ["cache", "dout"]
    assert _positional(bwd) == want_pos, f"{step}_backward{inspect.signature(bwd)}: positional parameters must be {want_pos}"

    inputs = STEP_INPUTS[step](rng)
    res = fwd(**inputs)
    assert isinstance(res, tuple) and len(res) == 2, f"{step}_forward must return (out, cache), got {type(res).__name__}"
    out, cache = res
    assert isinstance(out, np.ndarray), f"{step}_forward: out is a {type(out).__name__}, expected an ndarray"
    assert type(cache) is dict, f"{step}_forward: cache is a {type(cache).__name__}, expected a plain dict"

    dout = rng.standard_normal(out.shape)
    if step == "fusion":
        grads = bwd(inputs["params"], cache, dout)
        assert isinstance(grads, dict) and set(grads) == set(inputs["params"]), "fusion_backward: grads named like params"
        for name, g in grads.items():
            assert g.shape == inputs["params"][name].shape, name
        return
    # the float inputs, in the forward's argument order, are the ones that get a gradient
    order = _positional(fwd)
    diff = [n for n in order if n in inputs and isinstance(inputs[n], np.ndarray) and inputs[n].dtype.kind == "f"]
    grads = bwd(cache, dout)
    if len(diff) == 1:
        assert isinstance(grads, np.ndarray), f"{step}_backward: one float input ({diff[0]}) → return the array itself"
        grads = (grads,)
    else:
        assert isinstance(grads, tuple) and len(grads) == len(diff), (
            f"{step}_backward must return a tuple of {len(diff)} gradients d{diff}, got "
            f"{type(grads).__name__} of length {len(grads) if isinstance(grads, tuple) else '-'}")  # fmt: skip
    for name, g in zip(diff, grads):
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, (
            f"{step}_backward: d{name} has shape {g.shape}, expected {inputs[name].shape} (forward argument order)")  # fmt: skip


def test_every_forward_has_a_backward_and_test_inputs():
    steps = _steps()
    assert set(steps) == set(STEP_INPUTS), f"steps without inputs in STEP_INPUTS: {sorted(set(steps) - set(STEP_INPUTS))}"
    assert {"layernorm", "linear", "attention", "gelu", "l2normalize", "fusion"} <= set(steps)


@pytest.mark.parametrize("step", sorted(STEP_INPUTS))
def test_step_follows_the_convention(step, rng):
    check_convention(R, step, rng)


def test_the_check_catches_a_reverted_step(rng):
    """The walk must fail on the old conventions: a forward returning only ``out``, a backward taking
    ``(dout, cache)`` or ``(dout, x, w)``, a tuple cache."""

    class Old:  # a stand-in module holding old-style steps
        __name__ = "old"

        @staticmethod
        def gelu_forward(u):
            return R.gelu_forward(u)[0]

        @staticmethod
        def gelu_backward(cache, dout):
            return R.gelu_backward(cache, dout)

        @staticmethod
        def linear_forward(x, w, b):
            return R.linear_forward(x, w, b)

        @staticmethod
        def linear_backward(dout, x, w):
            return R.linear_backward({"x": x, "w": w}, dout)

        @staticmethod
        def l2normalize_forward(z):
            y, c = R.l2normalize_forward(z)
            return y, (c["y"], c["norm"])

        @staticmethod
        def l2normalize_backward(cache, dout):
            return R.l2normalize_backward({"y": cache[0], "norm": cache[1]}, dout)

        @staticmethod
        def layernorm_forward(x, gamma, beta):
            return R.layernorm_forward(x, gamma, beta)

        @staticmethod
        def layernorm_backward(cache, dout):
            return R.layernorm_backward(cache, dout)[:2]  # forgets dbeta

    for step in ("gelu", "linear", "l2normalize", "layernorm"):
        with pytest.raises(AssertionError):
            check_convention(Old, step, rng)


#: constants that live in reco_ref/fusion/constants.py and must not be redefined by a backend
_CONSTANT_PATTERNS = [r"\b1e-5\b", r"math\.sqrt\(2(\.0)?\)", r"math\.sqrt\(2(\.0)? \* math\.pi\)", r"=\s*100\.0\b"]


def test_constants_are_defined_once():
    root = Path(R.__file__).resolve().parent  # reco_ref/fusion
    files = [root / "reference.py", root / "numba_cpu.py", *sorted((root / "cuda").glob("*.py")),
             root.parent / "train" / "losses.py"]  # fmt: skip
    hits = [f"{f.relative_to(root.parent)}:{i}: {line.strip()}"
            for f in files for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if not line.lstrip().startswith("#") and any(re.search(p, line) for p in _CONSTANT_PATTERNS)]  # fmt: skip
    assert not hits, "constants redefined outside reco_ref/fusion/constants.py:\n" + "\n".join(hits)
