"""The one calling convention (docs/architecture.md), checked by walking the modules that write the math:
:mod:`reco_ref.fusion.reference`, :mod:`reco_ref.classify.reference` and :mod:`reco_ref.train.losses`.

For every ``*_forward`` function there is a ``*_backward`` and:

* ``out, cache = step_forward(...)`` — exactly two values, ``cache`` a plain ``dict``; ``out`` an array, or a
  float for a loss;
* ``step_backward(cache, dout)`` — exactly these two positional parameters, in this order (``dloss`` for a
  loss). The whole layers — ``fusion_backward(params, cache, dout, *, ...)`` and
  ``classify_backward(params, cache, dlogits, *, ...)`` — take ``params`` first (the backend contract) and
  return a dict named like the parameters;
* the backward returns one gradient per float input of the forward, in the forward's argument order,
  each with that input's shape and dtype: the array itself for one input, a tuple for several. A float
  input fixed by design gets none; those are listed in ``NO_GRAD`` and said in the backward's docstring.

A new step added to one of these modules without an entry in its inputs table fails the first test, so
the convention cannot be skipped silently. The constants test fails if a backend redefines a constant
that lives in :mod:`reco_ref.fusion.constants`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from reco_ref.classify import reference as CR
from reco_ref.fusion import reference as R
from reco_ref.fusion.params import init_params
from reco_ref.train import losses as TL


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


def _classify_inputs(rng):
    """The memory-attention classifier with every parameter in use (softmax attention): D 6, Dk 5, Dv 4,
    attention width 4 in 2 heads, 3 classes, 2 queries with 3 items (one masked)."""
    D, Dk, Dv, Da, C = 6, 5, 4, 4, 3
    shapes = {"w_c": (D, C), "b_c": (C,), "lnq_gamma": (D,), "lnq_beta": (D,), "lnk_gamma": (Dk,), "lnk_beta": (Dk,),
              "lnv_gamma": (Dv,), "lnv_beta": (Dv,), "w_q": (D, Da), "b_q": (Da,), "w_k": (Dk, Da), "b_k": (Da,),
              "w_v": (Dv, Da), "b_v": (Da,), "w_o": (Da, D), "b_o": (D,)}  # fmt: skip
    return {"params": {n: rng.standard_normal(s) for n, s in shapes.items()}, "query": rng.standard_normal((2, D)),
            "keys": rng.standard_normal((2, 3, Dk)), "values": rng.standard_normal((2, 3, Dv)),
            "valid": np.array([[True, False, True], [True, True, True]]), "heads": 2}  # fmt: skip


#: reco_ref.classify.reference: step name → small inputs for its forward
CLASSIFY_INPUTS = {
    "uniform_attention": lambda rng: {"v": rng.standard_normal((2, 3, 4)), "valid": np.array([[1, 0, 1], [1, 1, 1]], bool)},
    "cross_entropy": lambda rng: {"logits": rng.standard_normal((3, 5)), "labels": np.array([0, 4, 2])},
    "score_readout": lambda rng: {"scores": rng.uniform(0.5, 1.0, (2, 3)), "valid": np.array([[1, 0, 1], [1, 1, 1]], bool),
                                  "values_text": rng.standard_normal((2, 3, 4)), "class_text": rng.standard_normal((5, 4)),
                                  "beta": 2.0, "log_sv": 0.5},  # fmt: skip
    "classify": _classify_inputs,
}

#: reco_ref.train.losses: step name → small inputs for its forward
LOSS_INPUTS = {
    "infonce": lambda rng: {"a": rng.standard_normal((4, 3)), "b": rng.standard_normal((4, 3)), "tau": 1.5},
    "reco_loss": lambda rng: {"v_bar": rng.standard_normal((4, 3)), "t_bar": rng.standard_normal((4, 3)),
                              "v": rng.standard_normal((4, 3)), "t": rng.standard_normal((4, 3)), "tau": 1.5},  # fmt: skip
}

#: the modules walked, each with its inputs table
MODULES = {"fusion.reference": (R, STEP_INPUTS), "classify.reference": (CR, CLASSIFY_INPUTS),
           "train.losses": (TL, LOSS_INPUTS)}  # fmt: skip

#: steps of the whole-layer form: ``backward(params, cache, d<out>)`` returning a dict named like ``params``
WHOLE = {"fusion", "classify"}

#: (step, input): float inputs that are fixed by design and get no gradient — the score readout's class prompts,
#: the RECO loss's frozen-encoder embeddings
NO_GRAD = {("score_readout", "class_text"), ("reco_loss", "v"), ("reco_loss", "t")}


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


def _is_float(x) -> bool:
    return isinstance(x, float) or (isinstance(x, np.ndarray) and x.dtype.kind == "f")


def check_convention(module, step: str, rng, table=STEP_INPUTS) -> None:
    """Assert the convention for ``module.<step>_forward`` / ``<step>_backward`` (raises AssertionError)."""
    fwd, bwd = getattr(module, f"{step}_forward"), getattr(module, f"{step}_backward")
    inputs = table[step](rng)
    res = fwd(**inputs)
    assert isinstance(res, tuple) and len(res) == 2, f"{step}_forward must return (out, cache), got {type(res).__name__}"
    out, cache = res
    loss = isinstance(out, float)
    assert loss or isinstance(out, np.ndarray), f"{step}_forward: out is a {type(out).__name__}, expected an ndarray (a float for a loss)"
    assert type(cache) is dict, f"{step}_forward: cache is a {type(cache).__name__}, expected a plain dict"

    pos = _positional(bwd)
    if step in WHOLE:
        assert len(pos) == 3 and pos[:2] == ["params", "cache"] and pos[2].startswith("d"), (
            f"{step}_backward{inspect.signature(bwd)}: positional parameters must be (params, cache, d<out>)")  # fmt: skip
    else:
        want_pos = ["cache", "dloss" if loss else "dout"]
        assert pos == want_pos, f"{step}_backward{inspect.signature(bwd)}: positional parameters must be {want_pos}"

    dout = 1.3 if loss else rng.standard_normal(out.shape)
    if step in WHOLE:
        grads = bwd(inputs["params"], cache, dout)
        assert isinstance(grads, dict) and set(grads) == set(inputs["params"]), f"{step}_backward: grads named like params"
        for name, g in grads.items():
            assert g.shape == inputs["params"][name].shape, name
        return
    # the float inputs, in the forward's argument order, are the ones that get a gradient
    order = _positional(fwd)
    diff = [n for n in order if n in inputs and _is_float(inputs[n]) and (step, n) not in NO_GRAD]
    grads = bwd(cache, dout)
    if len(diff) == 1:
        assert not isinstance(grads, (tuple, list, dict)), f"{step}_backward: one float input ({diff[0]}) → return the array itself"
        grads = (grads,)
    else:
        assert isinstance(grads, tuple) and len(grads) == len(diff), (
            f"{step}_backward must return a tuple of {len(diff)} gradients d{diff}, got "
            f"{type(grads).__name__} of length {len(grads) if isinstance(grads, tuple) else '-'}")  # fmt: skip
    for name, g in zip(diff, grads):
        x = inputs[name]
        assert np.shape(g) == np.shape(x), (
            f"{step}_backward: d{name} has shape {np.shape(g)}, expected {np.shape(x)} (forward argument order)")  # fmt: skip
        if isinstance(x, np.ndarray):
            assert g.dtype == x.dtype, f"{step}_backward: d{name} is {g.dtype}, expected {x.dtype}"
        else:
            assert np.isrealobj(g), f"{step}_backward: d{name} must be a real scalar"


@pytest.mark.parametrize("where", sorted(MODULES))
def test_every_forward_has_a_backward_and_test_inputs(where):
    module, table = MODULES[where]
    steps = _steps(module)
    assert set(steps) == set(table), f"{where}: steps without test inputs: {sorted(set(steps) - set(table))}"
    assert {"layernorm", "linear", "attention", "gelu", "l2normalize", "fusion"} <= set(_steps(R))
    assert {"uniform_attention", "cross_entropy", "score_readout", "classify"} <= set(_steps(CR))
    assert {"infonce", "reco_loss"} <= set(_steps(TL))


@pytest.mark.parametrize("where,step", [(w, s) for w in sorted(MODULES) for s in sorted(MODULES[w][1])])
def test_step_follows_the_convention(where, step, rng):
    module, table = MODULES[where]
    check_convention(module, step, rng, table)


def test_the_check_catches_a_reverted_step(rng):
    """The walk must fail on the old conventions: a forward returning only ``out``, a backward taking
    ``(dout, cache)`` or ``(dout, x, w)``, a tuple cache, gradients returned as a dict."""

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

        @staticmethod
        def cross_entropy_forward(logits, labels):  # classify's old tuple cache
            loss, c = CR.cross_entropy_forward(logits, labels)
            return loss, (c["probs"], c["labels"])

        @staticmethod
        def cross_entropy_backward(cache, dloss=1.0):
            return CR.cross_entropy_backward({"probs": cache[0], "labels": cache[1]}, dloss)

        @staticmethod
        def score_readout_forward(scores, valid, values_text, class_text, beta, log_sv):
            return CR.score_readout_forward(scores, valid, values_text, class_text, beta, log_sv)

        @staticmethod
        def score_readout_backward(cache, dout):  # classify's old dict of gradients
            dscores, dvalues_text, dbeta, dlog_sv = CR.score_readout_backward(cache, dout)
            return {"beta": dbeta, "log_sv": dlog_sv, "values_text": dvalues_text, "scores": dscores}

    for step in ("gelu", "linear", "l2normalize", "layernorm"):
        with pytest.raises(AssertionError):
            check_convention(Old, step, rng)
    for step in ("cross_entropy", "score_readout"):
        check_convention(CR, step, rng, CLASSIFY_INPUTS)  # the current pair passes ...
        with pytest.raises(AssertionError):
            check_convention(Old, step, rng, CLASSIFY_INPUTS)  # ... its old form does not


#: constants that live in reco_ref/fusion/constants.py and must not be redefined by a backend
_CONSTANT_PATTERNS = [r"\b1e-5\b", r"math\.sqrt\(2(\.0)?\)", r"math\.sqrt\(2(\.0)? \* math\.pi\)", r"=\s*100\.0\b",
                      r"(math|np)\.log\(1(\.0)?\s*/\s*0\.07\)"]  # the last: DEFAULT_TAU


def test_constants_are_defined_once():
    root = Path(R.__file__).resolve().parent  # reco_ref/fusion
    files = [root / "reference.py", *sorted((root / "numba_cpu").glob("*.py")), *sorted((root / "cuda").glob("*.py")),
             root.parent / "train" / "losses.py", root.parent / "reco" / "weights.py"]  # fmt: skip
    hits = [f"{f.relative_to(root.parent)}:{i}: {line.strip()}"
            for f in files for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if not line.lstrip().startswith("#") and any(re.search(p, line) for p in _CONSTANT_PATTERNS)]  # fmt: skip
    assert not hits, "constants redefined outside reco_ref/fusion/constants.py:\n" + "\n".join(hits)
