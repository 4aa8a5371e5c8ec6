"""Fast lowering: blocked-layout convolutions, hand schedules and tuning records.

Each schedule/legalization is checked against PyTorch on small shapes (channel counts the
vector block does not divide, strides, padding, dilation, depthwise and grouped convs,
1x1, a 3-channel stem, pooling, linear layers); the blocked path is shown to be used;
tuning records are shown to be reused.  No timing assertions: speed lives in bench/.
"""

import pytest
import torch
from torch import nn

import slimfx
from slimfx.lowering import cpu_schedules as cs
from slimfx.lowering import host_target, resolve_target, to_relax, tuning


def _check(model, x, **kw):
    model = model.eval()
    cm = slimfx.compile(model, x, **kw)
    assert cm.parity["max_abs_error"] <= cm.parity["tolerance"]
    y = torch.randn_like(x)  # a fresh input, not the one checked at build
    with torch.no_grad():
        ref = model(y)
    assert (cm(y) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    return cm


def _returns(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that every value it returns is also appended to the list
    returned here (the calls themselves unchanged)."""
    seen: list = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


CONVS = {
    # name: (cin, cout, kernel, stride, padding, dilation, groups, size)
    "stem3": (3, 16, 7, 2, 3, 1, 1, 20),
    "3x3": (16, 32, 3, 1, 1, 1, 1, 9),
    "3x3-stride2": (32, 16, 3, 2, 1, 1, 1, 11),
    "1x1": (32, 64, 1, 1, 0, 1, 1, 7),
    "1x1-stride2": (16, 32, 1, 2, 0, 1, 1, 8),
    "odd-channels": (24, 40, 3, 1, 1, 1, 1, 7),  # 24, 40: not multiples of 16
    "few-channels": (5, 6, 3, 1, 0, 1, 1, 9),  # fewer channels than a vector
    "dilated": (16, 16, 3, 1, 2, 2, 1, 10),
    "no-padding": (16, 16, 3, 1, 0, 1, 1, 13),
    "depthwise": (32, 32, 3, 1, 1, 1, 32, 9),
    "depthwise-stride2-odd": (24, 24, 3, 2, 1, 1, 24, 11),
    "grouped": (32, 64, 3, 1, 1, 1, 2, 8),  # 16 -> 32 channels per group: blocked as is
    "grouped-narrow": (32, 32, 3, 2, 1, 1, 4, 9),  # 8 per group: pairs merged
    "grouped-tiny": (32, 32, 3, 1, 1, 1, 16, 8),  # 2 per group: stays NCHW
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_matches_pytorch(name, monkeypatch):
    cin, cout, k, s, p, d, g, size = CONVS[name]
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)  # these small layers would run serially
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, d, groups=g), nn.ReLU())
    cm = _check(model, torch.randn(1, cin, size, size))
    kinds = cm.manifest["build"]["kernels"]
    if g == cin:
        assert kinds.get("dwconv", 0) == 1
    else:
        assert kinds.get("conv", 0) == (0 if name == "grouped-tiny" else 1)


@pytest.mark.parametrize("cin,cout,k,size", [
    (1024, 128, 1, 6),  # 1x1 with a long reduction: 128 KiB of weights per register tile
    (256, 128, 3, 7),  # 3x3: 295 KiB per tile, one input chunk per block, all 7 rows a task
])
@pytest.mark.parametrize("serial", [False, True])
def test_long_reductions_are_blocked(cin, cout, k, size, serial, monkeypatch):
    monkeypatch.setattr(cs, "SERIAL_BELOW", 1 << 30 if serial else 0)
    monkeypatch.setattr(cs, "SERIAL_MAX_ELEMENTS", 1 << 30 if serial else 1 << 14)
    used = []
    real = cs._schedule_conv_blocked_reduction
    monkeypatch.setattr(cs, "_schedule_conv_blocked_reduction",
                        lambda *a: used.append(a) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU())
    cm = _check(model, torch.randn(1, cin, size, size))
    assert used and cm.manifest["build"]["kernels"].get("conv") == 1
    assert (cm.manifest["build"]["serial_kernels"] > 0) == serial  # (layouts too, when serial)
    used.clear()
    monkeypatch.setattr(cs, "BLOCK_REDUCTION_ABOVE", 0)  # the switch turns it off
    _check(model, torch.randn(1, cin, size, size))
    assert not used


def test_blocked_reduction_needs_enough_tasks(monkeypatch):
    """A blocked reduction runs one task per (chunk group, row block): on a small map with
    few output chunks that is fewer tasks than cores, and the plain schedule is kept."""
    plan = cs.blocked_reduction_plan  # (occ, oh, ow, ocb, icc, kh, kw, icb, reg, oct)
    assert plan(8, 6, 6, 16, 64, 1, 1, 16, 6, 2) == (16, 6)  # 4 tasks; 32 KiB blocks
    assert plan(2, 6, 6, 16, 64, 1, 1, 16, 6, 2) is None  # one task
    assert plan(8, 6, 6, 16, 2, 1, 1, 16, 6, 2) is None  # 4 KiB per tile: not blocked
    monkeypatch.setattr(cs, "MIN_BLOCKED_TASKS", 1)
    assert plan(2, 6, 6, 16, 64, 1, 1, 16, 6, 2) == (16, 6)


def _prefetching_kernel(kind: str):
    """A weight-streaming TE kernel: a blocked 3x3 conv (plain or blocked-reduction tile),
    a Winograd transform-domain GEMM with packed U, FFT's complex GEMM with a packed
    spectrum or a linear layer's matmul with packed weights (rows tiled outside the
    panels, or a shared weight's panels outside the rows); (PrimFunc, its argument shapes)."""
    from tvm import te

    from slimfx.lowering import fast_conv as lf

    if kind == "gemm":  # F(2,3) at 14x14: 16 points, 49 tiles, 128 -> 128 channels
        v = te.placeholder((16, 49, 128), name="v")
        u = te.placeholder((16, 128 // 32, 128, 32), name="u")
        args = [v, u, lf._batch_gemm_te(v, u)]
    elif kind.startswith("matmul"):  # x (8, 64) or (1, 8, 64) @ W (64, 96) packed (3, 64, 32)
        x = te.placeholder((8, 64) if kind == "matmul" else (1, 8, 64), name="x")
        wp = te.placeholder((3, 64, 32), name="wp")
        args = [x, wp, cs._packed_matmul_te(x, wp)]
    elif kind == "fft":  # the spectral product: 24 frequencies, 9 tiles, 64 -> 64 channels
        v = te.placeholder((24, 9, 2 * 64), name="v")
        w = te.placeholder((24, 64 // 32, 64, 2, 32), name="w")
        args = [v, w, lf._fft_complex_gemm_te(v, w)]
    else:
        # 36 KiB of weights per register tile / 295 KiB, 4 tasks: a blocked reduction
        cin, cout, size = (32, 64, 14) if kind == "conv" else (256, 128, 7)
        data = te.placeholder((1, cin // 16, size, size, 16), name="data")
        kernel = te.placeholder((cout // 16, cin // 16, 3, 3, 16, 16), name="kernel")
        args = [data, kernel, cs._conv_nchwc_te(data, kernel, (1, 1), (1, 1, 1, 1), (1, 1), False)]
    return te.create_prim_func(args), [[int(d) for d in t.shape] for t in args]


@pytest.mark.parametrize("kind", ["conv", "conv-blocked", "gemm", "fft", "matmul", "matmul-shared"])
def test_weight_streams_are_prefetched(kind, monkeypatch):
    """Kernels streaming large weights prefetch the next task's; the results are bitwise
    those of the same schedule without prefetches; small weights and the switch turn it off."""
    import numpy as np
    import tvm

    info = host_target()
    func, shapes = _prefetching_kernel(kind)
    monkeypatch.setattr(cs, "PREFETCH_MIN_BYTES", 0)  # these small weights qualify
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)  # and these small kernels stay parallel
    blocked = []
    real = cs._schedule_conv_blocked_reduction
    monkeypatch.setattr(cs, "_schedule_conv_blocked_reduction",
                        lambda *a: blocked.append(a) or real(*a))

    def build(prefetch: bool):
        monkeypatch.setattr(cs, "PREFETCH_NEXT_TASK", prefetch)
        f = cs.schedule_primfunc(func, info)
        assert ("llvm.prefetch" in f.script()) == prefetch
        return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                           target=info.tvm()).jit()

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype("float32") for s in shapes[:-1]]
    outs = []
    for prefetch in (True, False):
        args = [tvm.runtime.tensor(a, tvm.cpu()) for a in inputs]
        args.append(tvm.runtime.tensor(np.zeros(shapes[-1], "float32"), tvm.cpu()))
        build(prefetch)["main"](*args)
        outs.append(args[-1].numpy())
    assert np.abs(outs[0]).max() > 0 and np.array_equal(outs[0], outs[1])
    assert bool(blocked) == (kind == "conv-blocked")
    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(cs, "PREFETCH_NEXT_TASK", True)
    monkeypatch.setattr(cs, "PREFETCH_MIN_BYTES", 1 << 30)  # weights below the threshold
    monkeypatch.setattr(lf, "PREFETCH_BYTES", 1 << 30)  # (the transform-domain GEMMs' own)
    assert "llvm.prefetch" not in cs.schedule_primfunc(func, info).script()


@pytest.mark.parametrize("small", [True, False])
def test_transform_domain_gemms_prefetch_smaller_weights(small, monkeypatch):
    """A 64-channel F(4,3) U (590 KB) is under the 1 MB from which other kernels prefetch;
    the Winograd GEMM prefetches it (PREFETCH_SMALL), a direct conv's 1 MB does not."""
    from tvm import te

    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "PREFETCH_SMALL", small)
    info = host_target()
    v = te.placeholder((36, 49, 64), name="v")
    u = te.placeholder((36, 2, 64, 32), name="u")
    f = cs.schedule_primfunc(te.create_prim_func([v, u, lf._batch_gemm_te(v, u)]), info)
    assert ("llvm.prefetch" in f.script()) == small
    data = te.placeholder((1, 16, 14, 14, 16), name="data")  # 256 -> 64 channels: 590 KB
    kernel = te.placeholder((4, 16, 3, 3, 16, 16), name="kernel")
    conv = te.create_prim_func([data, kernel, cs._conv_nchwc_te(data, kernel, (1, 1),
                                                                (1, 1, 1, 1), (1, 1), False)])
    assert "llvm.prefetch" not in cs.schedule_primfunc(conv, info).script()
    monkeypatch.setattr(cs, "PREFETCH_MIN_BYTES", 1 << 19)
    assert "llvm.prefetch" in cs.schedule_primfunc(conv, info).script()


@pytest.mark.parametrize("kind", ["gemm", "fft"])
@pytest.mark.parametrize("stream", [True, False])
def test_one_row_transform_domain_gemms_leave_the_stream_to_the_hardware(kind, stream, monkeypatch):
    """A transform-domain GEMM of one row (an FFT tile covering the map, batch 1) reads each
    weight once, in order: no next-task prefetches (STREAM_ONE_ROW); two rows keep them."""
    from tvm import te

    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "STREAM_ONE_ROW", stream)
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)
    info = host_target()

    def prefetches(rows: int) -> bool:
        if kind == "gemm":  # F(4,3), 256 -> 256 channels: 9.4 MB of U
            v = te.placeholder((36, rows, 256), name="v")
            w = te.placeholder((36, 4, 256, 64), name="u")
            out = lf._batch_gemm_te(v, w)
        else:  # N = 14: 112 frequencies, 128 -> 128 channels: 14.7 MB of spectrum
            v = te.placeholder((112, rows, 256), name="v")
            w = te.placeholder((112, 4, 128, 2, 32), name="w")
            out = lf._fft_complex_gemm_te(v, w)
        return "llvm.prefetch" in cs.schedule_primfunc(te.create_prim_func([v, w, out]), info).script()

    assert prefetches(1) == (not stream)
    assert prefetches(2)


def test_prefetch_in_compiled_models(monkeypatch):
    """Prefetching builds (every conv and Winograd GEMM qualifying) match PyTorch."""
    monkeypatch.setattr(cs, "PREFETCH_MIN_BYTES", 0)
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)
    applied = _returns(monkeypatch, cs, "prefetch_next_task")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 48, 1), nn.ReLU())
    x = torch.randn(1, 32, 10, 10)
    _check(model, x)
    assert applied.count(True) >= 3  # every conv
    applied.clear()
    _check(model, x, pipeline="fold-bn,winograd{tile=2},dce", atol=1e-3)
    assert applied.count(True) >= 2  # the Winograd GEMMs


@pytest.mark.parametrize("cin,size,stride,bands", [
    (16, 16, 1, True),  # 2.3K weights, 4K input values: a row band per core
    (16, 16, 2, True),  # strided: 8 output rows, the input rows of each band
    (32, 16, 1, False),  # 9K weights, 8K input values: output channels split, as before
    (16, 15, 1, False),  # 15 rows: no equal bands
])
def test_convs_with_small_weights_split_rows_across_cores(cin, size, stride, bands, monkeypatch):
    """A conv with fewer weights than input values gives each core a band of rows (the
    layers around it then read and write the same rows on the same core); others keep
    splitting output channels.  Both match PyTorch."""
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)
    chosen = _returns(monkeypatch, cs, "_row_parts")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1), nn.ReLU(),
                          nn.Conv2d(cin, cin, 3, 1, 1), nn.ReLU())
    x = torch.randn(1, cin, size, size)
    _check(model, x)
    cores = host_target().num_cores
    assert max(chosen, default=1) == (cores if bands and cores > 1 and (size // stride) % cores == 0 else 1)
    chosen.clear()
    monkeypatch.setattr(cs, "ROW_PARTITION", False)
    _check(model, x)
    assert set(chosen) == {1}


def test_small_kernels_run_on_one_thread(monkeypatch):
    """Kernels under SERIAL_BELOW iterations and SERIAL_MAX_ELEMENTS elements (or
    SERIAL_REUSED_ELEMENTS, reusing their data) lose their parallel loops (the pool's
    hand-off cost as much as the work); larger ones keep them."""
    from tvm import te

    def matmul(rows, k, cols):
        a, w = te.placeholder((rows, k), name="a"), te.placeholder((k, cols), name="w")
        r = te.reduce_axis((0, k), name="r")
        c = te.compute((rows, cols), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r),
                       name="matmul")
        return te.create_prim_func([a, w, c])

    info = host_target()
    small, large = matmul(4, 32, 64), matmul(64, 256, 256)  # 8K / 4M multiply-adds
    assert "T.parallel" not in cs.hand_schedule(small, info).mod.script()
    assert "T.parallel" in cs.hand_schedule(large, info).mod.script()
    monkeypatch.setattr(cs, "SERIAL_MAX_ELEMENTS", 1000)  # the small one's data is larger
    assert "T.parallel" in cs.hand_schedule(small, info).mod.script()
    monkeypatch.undo()
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)
    assert "T.parallel" in cs.hand_schedule(small, info).mod.script()
    monkeypatch.undo()
    # over SERIAL_MAX_ELEMENTS: serial only where each element of the largest buffer (the
    # weight) feeds SERIAL_MIN_REUSE or more iterations
    reused, streamed = matmul(16, 128, 128), matmul(2, 128, 256)  # 16 and 2 rows per weight
    assert "T.parallel" not in cs.hand_schedule(reused, info).mod.script()
    assert "T.parallel" in cs.hand_schedule(streamed, info).mod.script()
    monkeypatch.setattr(cs, "SERIAL_REUSED_ELEMENTS", 0)
    assert "T.parallel" in cs.hand_schedule(reused, info).mod.script()
    monkeypatch.undo()

    # a whole model: its small kernels serial, counted in the manifest, results unchanged
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    cm = _check(model, torch.randn(1, 8, 10, 10))
    assert cm.manifest["build"]["serial_kernels"] >= 2
    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)
    assert _check(model, torch.randn(1, 8, 10, 10)).manifest["build"]["serial_kernels"] == 0


class _ChannelsLastMlp(nn.Module):
    """ConvNeXt's MLP: linears on (1, H, W, C), plus a product of two inputs (no weight)."""

    def __init__(self, c=48):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x, y):
        return self.fc2(nn.functional.gelu(self.fc1(x))) + x, x @ y


def test_linear_weights_are_packed_in_panels():
    """(K, N) weights are re-laid out at load time as (N / P, K, P) panels, P two vectors
    of columns (ConvNeXt-T: 149 -> 91 ms with the panel-outer schedule), and matmuls of
    two activations are left to the plain schedule."""
    torch.manual_seed(0)
    model = _ChannelsLastMlp().eval()
    x, y = torch.randn(1, 6, 7, 48), torch.randn(1, 6, 48, 5)
    cm = slimfx.compile(model, (x, y))
    x2, y2 = torch.randn_like(x), torch.randn_like(y)
    for a, b in zip(cm(x2, y2), model(x2, y2)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    shapes = {k.name: k.shapes for k in cm.profile(x, y, repeat=1).kernels}
    packed = [n for n in shapes if "matmul_packed" in n]
    assert len(packed) == 2, shapes
    lanes = cs.vector_lanes(host_target())

    def panels(k, n):  # two vectors of columns where they divide N, else one
        p = 2 * lanes if n % (2 * lanes) == 0 else lanes
        return f"{n // p}x{k}x{p}"

    text = " ".join(shapes[n] for n in packed)
    assert panels(48, 192) in text and panels(192, 48) in text, text
    assert sum("matmul" in n and "packed" not in n for n in shapes) == 1


class _SamePadded(nn.Module):
    """TensorFlow-style "same" padding before a strided depthwise conv (EfficientNet)."""

    def __init__(self, also_return_pad: bool):
        super().__init__()
        self.also = also_return_pad
        self.c = nn.Conv2d(16, 16, 1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw = nn.Conv2d(16, 16, 3, 2, padding=0, groups=16)

    def forward(self, x):
        p = self.pad(torch.relu(self.c(x)))
        return (self.dw(p), p) if self.also else self.dw(p)


@pytest.mark.parametrize("also_return_pad", [False, True])
def test_zero_pad_folds_into_the_conv(also_return_pad):
    torch.manual_seed(0)
    model = _SamePadded(also_return_pad).eval()
    x = torch.randn(1, 16, 12, 12)
    cm = slimfx.compile(model, x)
    y = torch.randn(1, 16, 12, 12)
    got, ref = cm(y), model(y)
    for a, b in zip(*((got, ref) if also_return_pad else ((got,), (ref,)))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    kernels = [k.name for k in cm.profile(x, repeat=1).kernels]
    # no pass over the map of its own unless the padded map is itself an output
    assert any("pad" in k and "conv" not in k for k in kernels) == also_return_pad


@pytest.mark.parametrize("groups", [2, 4, 16])
def test_grouped_conv_between_blocked_convs(groups):
    """RegNet / ResNeXt blocks: a grouped 3x3 between blocked 1x1 convs.  With no layout
    for it TVM 0.27 failed to build ("Layouts must have the same size"); now groups of 16
    run blocked, groups of 8 merge in pairs (block-diagonal weights), and groups of 2 run
    in NCHW between layout transforms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=groups), nn.ReLU(),
                          nn.Conv2d(32, 16, 1)).eval()
    cm = _check(model, torch.randn(1, 16, 10, 10))
    assert cm.manifest["build"]["kernels"].get("conv", 0) == (2 if groups == 16 else 3)


def test_inverted_residual_relu6_stays_blocked():
    """MobileNetV2 blocks: 1x1 expand, depthwise 3x3 (stride 1 and 2, odd map, 24 and 144
    channels: 8-wide blocks), ReLU6, 1x1 project, residual.  ReLU6 is lowered as
    max/min so it follows the blocked layout and fuses into the convolutions: no clip
    kernel, no layout transform between the blocks (one at each end); pads inlined."""

    def block(cin, mid, cout, stride):
        return nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU6(), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6())
            self.down = block(16, 96, 24, 2)
            self.same = block(24, 144, 24, 1)

        def forward(self, x):
            y = self.down(self.stem(x))
            return y + self.same(y)

    torch.manual_seed(0)
    model = Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, outputs past 6
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 4)
    x = 3 * torch.randn(1, 3, 21, 21)  # odd: stride 2 maps 11 -> 6 at the depthwise conv
    cm = _check(model, x, pipeline="fold-bn,dce")
    kinds = cm.manifest["build"]["kernels"]
    assert kinds.get("dwconv") == 2 and kinds.get("conv") == 5
    mod, calls = _scheduled_kernels(model, x)
    assert len(calls) == 9 and not any("clip" in n for n in calls)
    assert [n for n in calls if "layout_transform" in n] == [calls[0], calls[-1]]
    dw = [mod[n].script() for n in calls if n.startswith("fused_dwconv2d")]
    assert len(dw) == 2 and not any("data_pad" in t for t in dw)  # the pad is inlined


def _scheduled_kernels(model, x):
    """``model`` lowered and hand-scheduled for the host: (module, kernel names called by
    ``main`` in order)."""
    from tvm import relax

    g = slimfx.run_pipeline(slimfx.capture(model, (x,)), "fold-bn,dce,legalize-tvm")
    mod = cs.schedule(cs.prepare(to_relax(g).mod, host_target()), host_target())
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e.args[0].name_hint)
                                    if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return mod, calls


def _conv_scripts(model, x) -> list[str]:
    """The scheduled TIR of each convolution kernel of ``model`` for the host."""
    mod, calls = _scheduled_kernels(model, x)
    return [mod[n].script() for n in calls if n.startswith("fused_conv2d")]


def test_strided_convs_read_their_padding_in_place(monkeypatch):
    """A stride-2 3x3 convolution with many input channels reads its input through the
    border test (a padded copy costs 4x more per MAC than at stride 1); the stride-1 one
    keeps the copy; both match PyTorch, odd sizes included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1)).eval()
    x = torch.randn(1, 32, 15, 15)
    _check(model, x)
    padded = [("data_pad" in t) for t in _conv_scripts(model, x)]
    assert sorted(padded) == [False, True]
    monkeypatch.setattr(cs, "STRIDED_PAD_INLINE", False)  # the switch: both copy
    assert [("data_pad" in t) for t in _conv_scripts(model, x)] == [True, True]


@pytest.mark.parametrize("cin, cout, size, k, copy", [
    (64, 64, 4, 3, True),    # 64 x 9 x 16/36 = 256 multiply-adds per copied value: the copy
    (64, 64, 8, 5, True),    # the stride is the conv's own, not a guess from the widths
    (48, 48, 4, 3, False),   # 192: the border test
    (128, 32, 7, 3, False),  # DenseNet's 3x3 at 7x7: 174
    (128, 32, 14, 3, True),  # a longer row keeps the copy
])
def test_stride_1_padding_copy_or_border_test(cin, cout, size, k, copy, monkeypatch):
    """Stride-1 convolutions with many input channels read a padded copy, except on short
    rows where each copied value feeds few multiply-adds (PAD_COPY_MIN_WORK)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), nn.ReLU()).eval()
    x = torch.randn(1, cin, size, size)
    _check(model, x)
    assert ["data_pad" in t for t in _conv_scripts(model, x)] == [copy]
    monkeypatch.setattr(cs, "PAD_COPY_MIN_WORK", 0)  # 0: always the copy
    assert ["data_pad" in t for t in _conv_scripts(model, x)] == [True]


class _Shortcut(nn.Module):
    """A ResNet downsampling block: 3x3 / 2 main branch, strided 1x1 shortcut, add."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.main = nn.Conv2d(cin, cout, 3, stride, 1)
        self.short = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.main(x) + self.short(x))


@pytest.mark.parametrize("stride, size", [(2, 9), (2, 8), (3, 10)])
def test_strided_pointwise_convs_read_a_subsampled_copy(stride, size, monkeypatch):
    """A strided 1x1 convolution becomes a strided slice of its blocked input (a kernel of
    its own) and a stride-1 convolution, odd sizes and stride 3 included; the 3x3 keeps its
    stride; the switch restores the strided 1x1."""
    torch.manual_seed(0)
    model, x = _Shortcut(32, 32, stride).eval(), torch.randn(1, 32, size, size)
    _check(model, x)
    mod, calls = _scheduled_kernels(model, x)
    slices = [n for n in calls if n.startswith("strided_slice")]
    assert len(slices) == 1
    assert len(mod[slices[0]].params[0].shape) == 5  # in the blocked layout
    strides = [f'"{cs.STRIDE_ATTR}": {stride}' in t for t in _conv_scripts(model, x)]
    assert sorted(strides) == [False, True]  # the 1x1 reads the slice at stride 1
    monkeypatch.setattr(cs, "SUBSAMPLE_STRIDED_POINTWISE", False)
    _check(model, x)
    assert not [n for n in _scheduled_kernels(model, x)[1] if n.startswith("strided_slice")]


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-0.5, 0.75)])
def test_clip_after_depthwise_matches_pytorch(lo, hi):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.Hardtanh(lo, hi))
    cm = _check(model, 4 * torch.randn(1, 16, 9, 9))
    assert cm.manifest["build"]["kernels"].get("dwconv") == 1


def test_residual_block_with_pooling_and_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 24, 3, padding=1)
            self.bn = nn.BatchNorm2d(24)
            self.conv = nn.Conv2d(24, 24, 3, padding=1, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            y = torch.relu(self.bn(self.stem(x)))
            y = torch.relu(self.conv(y) + y)
            y = self.pool(y)
            return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))

    torch.manual_seed(0)
    cm = _check(Net(), torch.randn(2, 3, 12, 12), pipeline="fold-bn,dce")
    assert cm.manifest["build"]["kernels"]["conv"] == 2
    assert cm.manifest["transform_params"] == "main_transform_params"


@pytest.mark.parametrize("rows", [1, 6])
def test_linear_layers(rows):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 24))
    cm = _check(model, torch.randn(rows, 40))
    assert cm.manifest["build"]["kernels"].get("matmul", 0) >= 1


class _Bmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 32, 48))

    def forward(self, x):
        return torch.bmm(x, self.w)


@pytest.mark.parametrize("model, shape", [(lambda: nn.Linear(40, 64), (1, 13, 40)),
                                          (lambda: nn.Linear(40, 64), (13, 40)),
                                          (_Bmm, (3, 13, 32))])
def test_matmul_rows_without_a_divisor_get_partial_tiles(model, shape, monkeypatch):
    # 13 rows (a prime, like ViT's 197 tokens) were tiled one row at a time; now in tiles
    # of 4, the last one masked.
    from tvm import te

    torch.manual_seed(0)
    cm = _check(model(), torch.randn(shape))
    assert cm.manifest["build"]["kernels"]["matmul"] == 1
    a, w = te.placeholder(shape, name="a"), te.placeholder((shape[-1], 64), name="w")
    k = te.reduce_axis((0, shape[-1]), name="k")
    c = te.compute((*shape[:-1], 64), lambda *i: te.sum(a[(*i[:-1], k)] * w[k, i[-1]], axis=k),
                   name="matmul")
    func = te.create_prim_func([a, w, c])
    assert "T.where" in cs.hand_schedule(func, host_target()).mod.script()  # a masked tile
    monkeypatch.setattr(cs, "RAGGED_ROWS", False)
    assert "T.where" not in cs.hand_schedule(func, host_target()).mod.script()


def test_blocked_layout_is_used_and_weights_are_lifted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    g = slimfx.run_pipeline(slimfx.capture(model, (torch.randn(1, 3, 8, 8),)), "legalize-tvm")
    info = host_target()
    mod = cs.prepare(to_relax(g).mod, info)
    lanes = info.vector_bits // 32
    text = mod["main"].script(show_meta=False)
    assert f"NCHW{cs.channel_block(32, lanes)}c" not in text  # legalized: no Relax conv left
    convs = [gv.name_hint for gv, f in mod.functions.items() if "conv2d_nchwc" in gv.name_hint]
    assert len(convs) == 2
    assert cs.kernel_kind(mod[convs[0]]) == "conv"
    # kernels re-laid out once, in main_transform_params, not in main
    transform = mod["main_transform_params_tuple"].script(show_meta=False)
    assert "layout_transform" in transform
    assert "layout_transform" not in " ".join(
        n for n in text.split() if "p_" in n and "weight" in n)
    scheduled = cs.schedule(mod, info)
    assert set(cs.kernel_kinds(scheduled).values()) <= {"conv", "generic", "matmul", "dwconv"}


def test_channel_blocks():
    assert cs.channel_block(64, 16) == 16 and cs.channel_block(3, 16) == 3
    assert cs.channel_block(24, 16) == 8 and cs.channel_block(40, 16) == 8
    assert cs.channel_block(64, 4) == 4 and cs.channel_block(6, 8) == 6


def test_aarch64_uses_128_bit_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    info = resolve_target("aarch64")
    assert info.vector_bits == 128
    g = slimfx.run_pipeline(slimfx.capture(model, (torch.randn(1, 8, 8, 8),)), "legalize-tvm")
    mod = cs.prepare(to_relax(g).mod, info)
    transform = mod["main_transform_params_tuple"].script(show_meta=False)
    assert "(4, 2, 3, 3, 4, 4)" in transform  # OIHW4i4o: 128-bit NEON vectors
    cm = slimfx.compile(model, torch.randn(1, 8, 8, 8), target="aarch64")
    assert cm.parity is None and cm.manifest["build"]["kernels"]["conv"] == 1


def test_plain_build_still_available():
    torch.manual_seed(0)
    cm = _check(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8), fast=False)
    assert cm.manifest["build"]["fast"] is False and "transform_params" not in cm.manifest


def test_tuning_records_are_reused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 8, 6, 6)
    records = tmp_path / "records"
    opts = tuning.TuneOptions(trials=4, records=records, trials_per_iter=4, verbose=False,
                              strategy="replay-trace")
    first = _check(model, x, tune_options=opts)
    t = first.manifest["build"]["tuning"]
    assert (t["tasks"], t["tuned"], t["cached"], t["applied"]) == (1, 1, 0, 1)
    assert any(records.glob("database_tuning_record.json"))

    from tvm.s_tir import meta_schedule as ms

    def no_tuning(**_kw):
        raise AssertionError("a rebuild with records present must not tune")

    monkeypatch.setattr(ms, "tune_tasks", no_tuning)
    again = _check(model, x, tune=4, records=records, verbose=False)
    t = again.manifest["build"]["tuning"]
    assert (t["tuned"], t["cached"], t["applied"], t["trials"]) == (0, 1, 1, 0)
    assert again.manifest["build"]["kernels"].get("tuned") == 1


def test_tuning_option_errors():
    with pytest.raises(slimfx.SlimfxError, match="needs a records folder"):
        tuning.TuneOptions(trials=8)
    with pytest.raises(slimfx.SlimfxError, match="must be >= 0"):
        tuning.TuneOptions(trials=-1, records="x")


@pytest.mark.parametrize("ow, occ, lanes, tile", [
    (56, 4, 16, (7, 2)),    # two channel vectors per broadcast input: 1x1 convs 1.1-1.5x
    (14, 16, 16, (7, 2)),
    (8, 2, 16, (4, 2)),
    (3, 8, 16, (3, 2)),     # short rows keep the two vectors
    (14, 3, 16, (14, 1)),   # odd channel chunks: one vector, a longer row
    (13, 4, 16, (13, 1)),   # no divisor >= 4 fits two vectors: the whole row, one vector
    (56, 4, 8, (4, 2)),     # AVX2: 8 accumulators
])
def test_conv_register_tile(ow, occ, lanes, tile):
    assert cs._conv_tile(ow, occ, lanes) == tile


@pytest.mark.parametrize("ow, occ, lanes, tile", [
    (56, 4, 16, (4, 4)),    # a long reduction: 4 pixels x 4 vectors
    (28, 8, 16, (4, 4)),
    (56, 3, 16, (4, 3)),    # 24 channels in 8-wide blocks: 3 chunks
    (14, 16, 16, (7, 2)),   # the row is not a multiple of 4
    (56, 2, 16, (7, 2)),    # too few chunks
    (56, 4, 8, (4, 2)),     # AVX2's 16 registers: unchanged
])
def test_conv_register_tile_long_reduction(ow, occ, lanes, tile, monkeypatch):
    assert cs._conv_tile(ow, occ, lanes, long_reduction=True) == tile
    monkeypatch.setattr(cs, "SQUARE_TILES", False)  # the switch turns it off
    assert cs._conv_tile(ow, occ, lanes, long_reduction=True) == cs._conv_tile(ow, occ, lanes)


@pytest.mark.parametrize("ow, occ, lanes, tile", [
    (28, 5, 16, (2, 5)),    # 80 channels: 5 vectors per broadcast input
    (56, 9, 16, (4, 3)),    # MobileNetV2's 144: 9 chunks, 3 at a time
    (14, 7, 16, (2, 7)),
    (7, 5, 16, (7, 1)),     # a prime row: no 2-pixel tile, the row
    (28, 4, 16, (7, 2)),    # even chunks: unchanged
    (28, 5, 8, (7, 1)),     # AVX2: unchanged (8 accumulators: a 7-pixel row)
])
def test_conv_register_tile_pointwise_odd_chunks(ow, occ, lanes, tile, monkeypatch):
    assert cs._conv_tile(ow, occ, lanes, pointwise=True) == tile
    assert cs._conv_tile(ow, occ, lanes) == cs._conv_tile(ow, occ, lanes, pointwise=False)
    monkeypatch.setattr(cs, "ODD_CHUNK_TILES", False)  # the switch turns it off
    assert cs._conv_tile(ow, occ, lanes, pointwise=True) == cs._conv_tile(ow, occ, lanes)


@pytest.mark.parametrize("ow, occ, strided, tile", [
    (4, 5, False, (4, 5)),    # 80 channels on a 4-wide row: the row x 5 vectors
    (7, 3, False, (7, 3)),    # 48 channels on a 7-wide row
    (4, 7, False, (2, 7)),    # 112 channels: at most 21 accumulators
    (7, 5, False, (7, 1)),    # no divisor of 7 fits 5 vectors: the row
    (14, 3, False, (14, 1)),  # a long row keeps one vector
    (4, 5, True, (4, 1)),     # strided: the row (4 x 5 measured 0.83-0.87x)
    (4, 4, False, (4, 2)),    # even chunks: unchanged
])
def test_conv_register_tile_short_rows(ow, occ, strided, tile, monkeypatch):
    assert cs._conv_tile(ow, occ, 16, strided=strided) == tile
    assert cs._conv_tile(ow, occ, 8, strided=strided) == cs._conv_tile(ow, occ, 8)  # AVX2
    # depthwise: one vector per tile, the row's pixels as without the switch
    assert cs._conv_tile(ow, occ, 16, depthwise=True) == (cs._largest_divisor(ow, 14),
                                                           2 - occ % 2)
    monkeypatch.setattr(cs, "SHORT_ROW_TILES", False)  # the switch turns it off
    assert cs._conv_tile(ow, occ, 16) == (cs._largest_divisor(ow, 14), 2 - occ % 2)


def test_short_row_tiles_compile_and_match(monkeypatch):
    """3x3 convolutions with 5 and 3 channel chunks on 4- and 7-wide maps take
    multi-vector tiles (stride 1) and match PyTorch; the strided one keeps the row."""
    tiles = _returns(monkeypatch, cs, "_conv_tile")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(48, 80, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(80, 80, 3, padding=1))
    _check(model, torch.randn(1, 48, 7, 7))
    if cs.vector_lanes(host_target()) >= 16:
        assert sorted(tiles) == [(4, 1), (4, 5), (7, 3)], tiles


def test_odd_chunk_pointwise_tiles_compile_and_match(monkeypatch):
    """80 -> 80 and 80 -> 112 1x1 convolutions (5 and 7 chunks) on an 8-wide map take
    multi-chunk tiles and match PyTorch."""
    tiles = _returns(monkeypatch, cs, "_conv_tile")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(80, 80, 1), nn.ReLU(), nn.Conv2d(80, 112, 1))
    _check(model, torch.randn(1, 80, 8, 8))
    if cs.vector_lanes(host_target()) >= 16:
        assert sorted(tiles) == [(2, 5), (2, 7)], tiles


@pytest.mark.parametrize("cin, cout, k", [(128, 64, 1), (48, 24, 1), (32, 64, 3)])
def test_square_tiles_compile_and_match(cin, cout, k, monkeypatch):
    """Reducing convolutions get the 4 x 4 (or 4 x 3) tile, the 3x3 one in the blocked-
    reduction schedule too, and match PyTorch; expanding ones keep the 7 x 2 tile."""
    tiles = []
    real = cs._conv_tile
    monkeypatch.setattr(cs, "_conv_tile", lambda *a: tiles.append((a[3], real(*a))) or tiles[-1][1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(),
                          nn.Conv2d(cout, 4 * cout, 1))
    _check(model, torch.randn(1, cin, 8, 8))
    assert sorted(long for long, _ in tiles) == [False, True]  # the reducing conv, the expanding
    if cs.vector_lanes(host_target()) >= 16:
        for long, (pixels, vectors) in tiles:
            assert (pixels, vectors >= 3) == (4, True) if long else vectors <= 2, tiles


class _Sdpa(nn.Module):
    def __init__(self, causal: bool = False, mask: bool = False):
        super().__init__()
        self.causal, self.mask = causal, mask

    def forward(self, q, k, v):
        m = None
        if self.mask:  # a (1, 1, S, T) boolean mask: lowered as an additive bias
            m = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()[None, None]
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                          is_causal=self.causal)


@pytest.mark.parametrize("s,t,heads,dim,dv,causal,mask", [
    (37, 37, 2, 16, 16, False, False),  # rows and keys not multiples of the tiles
    (37, 29, 2, 8, 24, False, False),  # cross-attention, values wider than a vector
    (20, 20, 3, 16, 16, True, False),  # causal
    (19, 19, 2, 16, 16, False, True),  # masked: the bias path
    (8, 64, 1, 64, 64, False, False),
])
def test_attention_kernel_matches_pytorch(s, t, heads, dim, dv, causal, mask):
    torch.manual_seed(0)
    q, k = 2 * torch.randn(2, heads, s, dim), 2 * torch.randn(2, heads, t, dim)
    v = torch.randn(2, heads, t, dv)
    model = _Sdpa(causal, mask).eval()
    cm = slimfx.compile(model, (q, k, v), pipeline="")
    assert cm.manifest["build"]["kernels"].get("attention") == 1  # slimfx's kernel, scheduled
    q2, k2, v2 = (torch.randn_like(a) for a in (q, k, v))
    torch.testing.assert_close(cm(q2, k2, v2), model(q2, k2, v2), atol=2e-6, rtol=1e-5)


class _MaskedSelfAttention(nn.Module):
    def forward(self, q, mask):
        return nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("shape,dtype", [
    ((6, 6), torch.bool), ((6, 6), torch.float32),  # TVM's importer takes only 4-D biases:
    ((2, 6, 6), torch.float32), ((2, 1, 6), torch.bool),  # legalize-tvm adds the unit dims
    ((1, 2, 6, 6), torch.bool),
])
def test_attention_masks_of_any_rank_and_dtype(shape, dtype):
    torch.manual_seed(0)

    def mask():
        if dtype == torch.bool:  # the diagonal stays True: no row masked entirely (NaN)
            return (torch.rand(shape) > 0.4) | torch.eye(6, dtype=torch.bool)[:shape[-2]]
        return torch.randn(shape)

    model = _MaskedSelfAttention().eval()
    cm = slimfx.compile(model, (torch.randn(1, 2, 6, 8), mask()), pipeline="")
    q, m = torch.randn(1, 2, 6, 8), mask()  # new values, so the mask is read at run time
    torch.testing.assert_close(cm(q, m), model(q, m), atol=2e-6, rtol=1e-5)


class _Exps(nn.Module):
    def forward(self, x):
        return torch.exp(x - 3) + torch.erf(x)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
                                 nn.Sigmoid(), nn.Tanh(), _Exps()],
                         ids=["gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "exp_erf"])
def test_fast_math_activations_match_pytorch(act):
    from slimfx.lowering.fast_math import FAST_MATH_OPS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), act).eval()
    x = 4 * torch.randn(8, 16)  # past the saturation of tanh/sigmoid/erf both ways
    _check(model, x)
    g = slimfx.capture(model, x)
    mod = cs.schedule(cs.prepare(to_relax(g).mod, host_target()), host_target())
    text = "\n".join(f.script() for f in mod.functions.values() if type(f).__name__ == "PrimFunc")
    # polynomials, not libm calls (which LLVM cannot vectorize)
    assert not any(f"T.{fn}(" in text for fn in ("exp", "erf", "tanh", "sigmoid"))
    assert "relax.nn.gelu" in FAST_MATH_OPS


def test_convs_in_an_nchw_model_still_use_the_blocked_kernels():
    """A ConvNeXt-style block: its layer norm keeps the model in NCHW, yet the patchify
    stem, the depthwise 7x7 and the downsampling conv get the blocked kernels (each with
    its own layout transforms)."""

    class Block(nn.Module):
        def __init__(self, c=24):
            super().__init__()
            self.stem = nn.Conv2d(3, c, 4, stride=4)
            self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
            self.ln = nn.LayerNorm(c)
            self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
            self.down = nn.Conv2d(c, 2 * c, 2, stride=2)

        def forward(self, x):
            x = self.stem(x)
            y = self.ln(self.dw(x).permute(0, 2, 3, 1))
            y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
            return self.down(x + y)

    torch.manual_seed(0)
    cm = _check(Block(), torch.randn(1, 3, 32, 32))
    kinds = cm.manifest["build"]["kernels"]
    assert kinds.get("conv") == 2 and kinds.get("dwconv") == 1


@pytest.mark.parametrize("op", ["relax.exp", "relax.erf", "relax.tanh", "relax.sigmoid"])
def test_fast_math_polynomials_are_float32_accurate(op):
    import math

    import numpy as np
    import tvm
    from tvm import te

    from slimfx.lowering.fast_math import FAST_MATH_OPS

    ref = {"relax.exp": np.exp, "relax.erf": np.vectorize(math.erf), "relax.tanh": np.tanh,
           "relax.sigmoid": lambda a: 1 / (1 + np.exp(-a))}[op]
    a = np.linspace(-12, 12, 20001).astype("float32")
    x = te.placeholder(a.shape, "float32", name="x")
    lib = tvm.tirx.build(te.create_prim_func([x, FAST_MATH_OPS[op](x)]), target="llvm")
    out = tvm.runtime.tensor(np.zeros_like(a))
    lib(tvm.runtime.tensor(a), out)
    want = ref(a.astype("float64"))
    rel = np.abs(out.numpy() - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() < 1e-6  # float32 eps is 1.2e-7


class _SigmoidChain(nn.Module):
    def forward(self, x):
        for i in range(8):
            x = torch.relu(x) * 0.5 if i % 2 else torch.sigmoid(x)
        return x


def test_chained_polynomials_are_not_copied_into_each_read():
    """A polynomial exp reads its argument several times; inlining a chain of them copied
    each upstream expression into every read (exponential: four sigmoids in one kernel took
    a 276 s build, five ran out of memory).  Large expressions read more than once are
    computed once instead."""
    from tvm import te

    from slimfx.lowering.fast_math import FAST_MATH_OPS

    x = te.placeholder((1, 16, 4, 4), name="x")
    y = x
    for _ in range(3):
        y = FAST_MATH_OPS["relax.sigmoid"](y)
    text = cs.hand_schedule(te.create_prim_func([x, y]), host_target()).mod.script()
    assert len(text) < 50_000  # 1.1M characters when every read got a copy
    torch.manual_seed(0)
    cm = _check(_SigmoidChain(), torch.randn(1, 16, 4, 4))  # one fused kernel, built in ~1 s
    assert sum(cm.manifest["build"]["kernels"].values()) <= 3


class _Escapes(nn.Module):
    """Intermediates that must stay allocated per call: an output that later kernels also
    read, an output that is a view (flatten) of a kernel's result, and one that is not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        c = self.c(b) + a
        return a, torch.flatten(self.c(c), 1), c.mean((2, 3))


def _main_calls(cm, name: str) -> int:
    text = cm._executable.as_text()
    main = text[text.index("@main:"):].split("\n\n")[0]
    return main.count(f"call  {name} ")


def test_intermediates_are_allocated_once(monkeypatch):
    """The planned intermediates move to load time (workspace.py); outputs, and tensors a
    view could return, stay per call: the outputs of one call survive the next."""
    from slimfx.lowering import workspace

    torch.manual_seed(0)
    model, x = _Escapes().eval(), torch.randn(1, 3, 10, 10)
    cm = slimfx.compile(model, x, pipeline="dce")  # checks parity at x
    monkeypatch.setattr(workspace, "PERSISTENT_WORKSPACE", False)
    per_call = slimfx.compile(model, x, pipeline="dce")
    assert _main_calls(per_call, "vm.builtin.alloc_tensor") >= 4
    # left per call: the tensors of the three outputs (two leave through a reshape's view)
    assert 0 < _main_calls(cm, "vm.builtin.alloc_tensor") \
        < _main_calls(per_call, "vm.builtin.alloc_tensor")
    vm = cm._ensure_vm()
    xs = [torch.randn(1, 3, 10, 10) for _ in range(2)]
    held = []
    for xi in xs:  # the VM's own output tensors, not copies
        cm._set_inputs([xi.numpy()])
        vm.invoke_stateful("main")
        held.append(list(vm.get_outputs("main")))
    for xi, outs in zip(xs, held):
        with torch.no_grad():
            ref = model(xi)
        for o, r in zip(outs, ref):
            torch.testing.assert_close(torch.from_numpy(o.numpy()), r, atol=1e-4, rtol=1e-4)


class _RowOps(nn.Module):
    def __init__(self, op: str, dim: int):
        super().__init__()
        self.op = op
        self.norm = nn.LayerNorm(dim) if op == "layer_norm" else nn.RMSNorm(dim)
        with torch.no_grad():
            self.norm.weight.normal_()
            if op == "layer_norm":
                self.norm.bias.normal_()

    def forward(self, x):
        return torch.softmax(3 * x, -1) if self.op == "softmax" else self.norm(x)


@pytest.mark.parametrize("op,shape,kind", [
    ("layer_norm", (1, 7, 5, 48), "row-reduction"),  # ConvNeXt's channels-last norm
    ("layer_norm", (2, 9, 64), "row-reduction"),  # a transformer's tokens
    ("softmax", (3, 11, 32), "row-reduction"),
    ("rms_norm", (4, 80), "row-reduction"),
    ("layer_norm", (3, 18), "generic"),  # rows not a whole number of vectors
])
def test_row_reductions_match_pytorch(op, shape, kind):
    """Reductions over each row's last axis followed by element-wise use of the results on
    the row (layer norm, softmax, RMS norm) get the row schedule (rows parallel, partial
    sums in vectors), and match PyTorch."""
    torch.manual_seed(0)
    lanes = cs.vector_lanes(host_target())
    if kind == "row-reduction" and shape[-1] % lanes:
        pytest.skip(f"rows of {shape[-1]} are not whole vectors of {lanes}")
    model = _RowOps(op, shape[-1]).eval()
    cm = _check(model, torch.randn(shape), pipeline="")
    kinds = cm.manifest["build"]["kernels"]
    assert kinds.get(kind, 0) >= 1, kinds
    if kind == "generic":
        assert "row-reduction" not in kinds


class _ConvNextBlock(nn.Module):
    """ConvNeXt's block: a depthwise 7x7 conv in NCHW, then channels-last layer norm and
    MLP, permuted back and added to the input."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        for _ in range(2):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
            x = x + y.permute(0, 3, 1, 2)
        return x


def test_depthwise_conv_next_to_layer_norms_runs_channels_last(monkeypatch):
    """In a model kept in NCHW (layer norms), a depthwise conv over whole vectors of
    channels runs channels-last: its output is a view that the bias add and the permute to
    the layer norm read in one kernel, where a blocked conv needed a layout transform out
    of it first.  Both forms match PyTorch."""
    lanes = cs.vector_lanes(host_target())
    torch.manual_seed(0)
    model, x = _ConvNextBlock(2 * lanes).eval(), torch.randn(1, 2 * lanes, 9, 9)
    g = slimfx.capture(model, (x,))
    calls = {}
    for nhwc in (True, False):
        monkeypatch.setattr(cs, "NHWC_DEPTHWISE", nhwc)
        cm = _check(model, x, pipeline="")
        assert cm.manifest["build"]["kernels"].get("dwconv") == 1  # one kernel, called twice
        text = cs.prepare(to_relax(g).mod, host_target())["main"].script(show_meta=False)
        calls[nhwc] = (text.count("R.call_tir("), text.count("te_layout_transform"))
    assert calls[True][1] == 0 < calls[False][1], calls
    assert calls[True][0] == calls[False][0] - 2, calls  # one kernel fewer per block


def _workspace_kernels(model, x, pipeline: str, monkeypatch) -> dict[str, int]:
    """Compile ``model`` (parity checked) and count, per parallel task body (an LLVM
    ``__tvm_parallel_lambda``) of the built library, the calls that allocate from TVM's
    workspace pool: one allocation per task.  (A kernel may allocate a buffer once per call
    outside its parallel loop: the NHWC copy of an NCHW input, here.)"""
    import re

    from tvm import relax

    built = _returns(monkeypatch, relax, "build")
    slimfx.compile(model, x, pipeline=pipeline, verbose=False)
    mod = built[-1].mod
    ll = "".join(m.inspect_source("ll") for m in [mod, *mod.imports] if m.kind == "llvm")
    counts: dict[str, int] = {}
    name = None
    for line in ll.splitlines():
        if line.startswith("define"):
            name = re.search(r"@([\w.]+)\(", line).group(1)
        elif "load ptr, ptr @__TVMBackendAllocWorkspace" in line and "parallel_lambda" in name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_fast_conv_kernels_allocate_nothing_per_task(monkeypatch):
    """Winograd transforms compute their intermediate a row at a time and the
    transform-domain GEMMs keep their accumulators on the stack: no kernel of these layers
    allocates from the workspace pool (each parallel task did, before)."""
    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(cs, "SERIAL_BELOW", 0)  # small kernels stay parallel
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 5, padding=2)).eval()
    x = torch.randn(1, 16, 12, 12)
    pipeline = "winograd{tile=4},fft-conv"
    assert _workspace_kernels(model, x, pipeline, monkeypatch) == {}
    monkeypatch.setattr(lf, "ROW_TRANSFORMS", False)
    monkeypatch.setattr(lf, "STACK_ACCUMULATORS", False)
    assert len(_workspace_kernels(model, x, pipeline, monkeypatch)) >= 3

