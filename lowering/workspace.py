"""Persistent activation memory: the planned intermediate tensors of ``main`` are allocated
once, when a model is loaded, instead of on every call.

TVM's ``StaticPlanBlockMemory`` plans ``main``'s intermediates into a few storages with
static offsets, but the plan is still carried out on every call: each storage is an
``alloc_storage`` and each tensor an ``alloc_tensor`` (a new tensor object viewing the
storage) and a ``kill`` after its last use, three VM calls around each kernel.  On a model
of 0.1 ms they cost as much as a fifth of the run.  Their shapes and offsets are constant,
so :func:`persistent_workspace` moves them into ``main_transform_params`` (run once at
load time, see :class:`slimfx.runtime.CompiledModel`): it allocates the storages and the
tensors and returns them after the transformed parameters; ``main`` takes them as
parameters and its kernels write into them.  The memory plan (which tensors share a
storage, at which offsets) is TVM's, unchanged, and kernels run in the same order, so
reuse stays as safe as TVM planned it.

A tensor stays allocated per call when it could outlive the call or is seen by anything but
a kernel: a model output, a tensor that a ``reshape`` views (the view could be returned)
or that goes into a tuple; its storage then stays per call too.  The kernels' outputs in a
persistent tensor are overwritten by the next call, so a loaded model runs one call at a
time (as :class:`~slimfx.runtime.CompiledModel` does: one virtual machine, inputs set
then invoked).
"""

from __future__ import annotations

#: Module-level switch (benchmarks compare with and without: ``bench/exec_mode.py``).
PERSISTENT_WORKSPACE = True

TRANSFORM = "main_transform_params"


def _free_vars(expr) -> list:
    from tvm import relax

    return list(relax.analysis.free_vars(expr))


def _plan(main, mod):
    """(storages, tensors) of ``main`` that can be allocated once: ``{storage var: call}``
    and ``[(tensor var, alloc_tensor call)]`` in binding order."""
    from tvm import relax, tirx

    storage_op = _op("relax.memory.alloc_storage")
    tensor_op = _op("relax.memory.alloc_tensor")
    bindings = [b for blk in main.body.blocks for b in blk.bindings]
    storages: dict = {}
    tensors: list = []
    alias: dict = {}  # var -> the var it is bound to
    bad: set = set()  # vars used other than as a kernel argument
    for b in bindings:
        v = b.value if isinstance(b, relax.VarBinding) else None
        if v is None:  # a MatchCast: anything it names escapes our analysis
            bad.update(_free_vars(b.value))
            continue
        if isinstance(v, relax.Call) and v.op.same_as(storage_op) \
                and isinstance(v.args[0], relax.ShapeExpr) \
                and all(isinstance(d, tirx.IntImm) for d in v.args[0].values):
            storages[b.var] = v
        elif isinstance(v, relax.Call) and v.op.same_as(tensor_op) \
                and isinstance(v.args[0], relax.Var) and v.args[0] in storages \
                and isinstance(v.args[2], relax.ShapeExpr) \
                and all(isinstance(d, tirx.IntImm) for d in v.args[2].values):
            tensors.append((b.var, v))
        elif isinstance(v, relax.Var):
            alias[b.var] = v
        elif isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) \
                and isinstance(mod[v.op], tirx.PrimFunc):
            for a in v.args:  # a kernel's arguments: fine; anything nested is not
                if not isinstance(a, relax.Var):
                    bad.update(_free_vars(a))
        else:
            bad.update(_free_vars(v))
    bad.update(_free_vars(main.body.body))

    def root(var):
        while var in alias:
            var = alias[var]
        return var

    bad = {root(v) for v in bad}
    # a storage named anywhere but in its alloc_tensors stays per call, and so does one
    # with a tensor that stays
    keep_storage = {s for s in storages if s in bad}
    keep_storage |= {t.args[0] for var, t in tensors if var in bad}
    hoisted = [(var, t) for var, t in tensors if t.args[0] not in keep_storage]
    used = {t.args[0] for _, t in hoisted}
    return {s: c for s, c in storages.items() if s in used}, hoisted


def _op(name: str):
    import tvm

    return tvm.ir.Op.get(name)


def persistent_workspace_fn(mod, _ctx=None):
    """The module pass (after ``StaticPlanBlockMemory``): see the module docstring."""
    from tvm import relax

    names = {gv.name_hint: gv for gv in mod.functions}
    if not PERSISTENT_WORKSPACE or "main" not in names or TRANSFORM not in names:
        return mod
    main, transform = mod["main"], mod[TRANSFORM]
    if not isinstance(main, relax.Function) or not isinstance(transform, relax.Function) \
            or not isinstance(main.body, relax.SeqExpr):
        return mod
    n_in = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else None
    ret = transform.ret_ty
    if n_in is None or not isinstance(ret, relax.TupleType) \
            or len(ret.fields) != len(main.params) - n_in:
        return mod  # main's parameters are not exactly the transform's outputs
    storages, tensors = _plan(main, mod)
    if not tensors:
        return mod

    # main: the planned tensors become trailing parameters
    params = {var: relax.Var(f"workspace{i}", var.ty) for i, (var, _) in enumerate(tensors)}
    drop = set(storages) | set(params)

    @relax.expr_functor.mutator
    class Rebind(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var not in drop:
                super().visit_var_binding_(binding)

    rb = Rebind(mod)
    for var, p in params.items():
        rb.set_var_remap(var, p)
    body = rb.visit_expr(main.body)
    new_main = relax.Function(list(main.params) + list(params.values()), body,
                              main.ret_ty, main.is_pure, main.attrs, main.span)

    # main_transform_params: the old one, then the storages and tensors, returned after it
    mod = mod.clone()
    del mod[TRANSFORM]
    bb = relax.BlockBuilder(mod)
    outer = [relax.Var(p.name, p.ty) for p in transform.params]
    with bb.function(TRANSFORM, outer, attrs=dict(transform.attrs), pure=transform.is_pure):
        fields = []
        if ret.fields:  # (TVM's VM fails on a call to a Relax function whose result is unused)
            inner = bb.add_func(transform.without_attr("global_symbol"), f"{TRANSFORM}_inner")
            out = bb.emit(relax.Call(inner, outer))
            fields = [bb.emit(relax.TupleGetItem(out, i)) for i in range(len(ret.fields))]
        made = {s: bb.emit(relax.Call(c.op, c.args, c.attrs, c.ty_args), "storage")
                for s, c in storages.items()}
        for _, t in tensors:
            fields.append(bb.emit(relax.Call(t.op, [made[t.args[0]], *t.args[1:]], t.attrs,
                                             t.ty_args), "workspace"))
        bb.emit_func_output(relax.Tuple(fields))
    mod = bb.get()
    mod[names["main"]] = new_main
    return mod


def persistent_workspace():
    import tvm

    return tvm.ir.transform.module_pass(persistent_workspace_fn, opt_level=0,
                                        name="SlimfxPersistentWorkspace")
