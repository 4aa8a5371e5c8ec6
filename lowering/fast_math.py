"""Vectorizable ``exp``, ``erf``, ``tanh`` and the activations built on them (and softmax
over a last axis), for the CPU.

TVM legalizes these element-wise functions to libm calls, which LLVM cannot vectorize:
a 16-lane vector of ``erf`` becomes 16 scalar calls.  In a transformer's MLP the GELU
after the first linear layer cost more than the matrix product it is fused into.  The
fast CPU lowering uses TVM's polynomial forms instead (``topi.fast_exp``, ``fast_erf``,
``fast_tanh``), within 1e-6 relative error of float64 references over [-12, 12]
(``tests/test_fast_lowering.py``): a few float32 roundings, not an approximation a
model can notice.
"""

from __future__ import annotations

import math

from . import cpu_schedules as cs

__all__ = ["FAST_MATH_OPS"]


def _exp(x):
    from tvm import topi

    return topi.fast_exp(x)


def _erf(x):
    from tvm import topi

    return topi.fast_erf(x)


def _tanh(x):
    from tvm import topi

    return topi.fast_tanh(x)


def _sigmoid(x):
    from tvm import te, topi

    neg = te.compute(x.shape, lambda *i: -x(*i), name="neg")
    e = topi.fast_exp(neg)
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="sigmoid")


def _silu(x):
    from tvm import te

    s = _sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="silu")


def _gelu(x):
    from tvm import te, topi

    scaled = te.compute(x.shape, lambda *i: x(*i) * (1.0 / math.sqrt(2.0)), name="gelu_arg")
    e = topi.fast_erf(scaled)
    return te.compute(x.shape, lambda *i: 0.5 * x(*i) * (1.0 + e(*i)), name="gelu")


def _gelu_tanh(x):
    from tvm import te, topi

    c = math.sqrt(2.0 / math.pi)
    inner = te.compute(x.shape, lambda *i: c * (x(*i) + 0.044715 * x(*i) * x(*i) * x(*i)),
                       name="gelu_arg")
    t = topi.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: 0.5 * x(*i) * (1.0 + t(*i)), name="gelu")


def _softmax_last(x):
    """Softmax over the last axis: max, exp of the shifted row (polynomial), sum, divide.
    Two row reductions and element-wise steps: the row-reduction schedule's form."""
    from tvm import te, topi

    *rows, n = x.shape
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(rows, lambda *i: te.max(x[(*i, k)], axis=k), name="softmax_max")
    shifted = te.compute(x.shape, lambda *i: x(*i) - top(*i[:-1]), name="softmax_shift")
    e = topi.fast_exp(shifted)
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute(rows, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="softmax_sum")
    return te.compute(x.shape, lambda *i: e(*i) / total(*i[:-1]), name="softmax")


def _softmax(_info):
    def legalize(bb, call):
        x = call.args[0]
        nd = len(x.ty.shape)
        if str(getattr(x.ty, "dtype", "")) != "float32" or int(call.attrs.axis) % nd != nd - 1:
            return _default("relax.nn.softmax")(bb, call)
        return bb.call_te(_softmax_last, x, primfunc_name_hint="softmax")

    return legalize


#: Relax op -> its TE form with polynomial transcendental functions.
FAST_MATH_OPS = {"relax.exp": _exp, "relax.erf": _erf, "relax.tanh": _tanh,
                 "relax.sigmoid": _sigmoid, "relax.nn.silu": _silu, "relax.nn.gelu": _gelu,
                 "relax.nn.gelu_tanh": _gelu_tanh}


def _factory(op: str, fn):
    def for_target(_info):
        def legalize(bb, call):
            x = call.args[0]
            if str(getattr(x.ty, "dtype", "")) != "float32":
                return _default(op)(bb, call)
            return bb.call_te(fn, x, primfunc_name_hint=op.rsplit(".", 1)[1])

        return legalize

    return for_target


def _default(op: str):
    """TVM's own legalization of ``op`` (other dtypes)."""
    import tvm

    return tvm.ir.Op.get(op).get_attr("FLegalize")


for _op, _fn in FAST_MATH_OPS.items():
    cs.LEGALIZATIONS[_op] = _factory(_op, _fn)
# softmax over the last axis (its exp in polynomial form; other axes: TVM's)
cs.LEGALIZATIONS["relax.nn.softmax"] = _softmax
