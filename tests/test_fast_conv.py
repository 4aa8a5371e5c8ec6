"""Fast convolution: Winograd F(2,3)/F(4,3) and FFT ops, their passes and lowerings.

Every substituted op is checked against direct convolution within its documented bound
(``WINOGRAD_TOLERANCE``, ``FFT_TOLERANCE``, relative to the output magnitude): in PyTorch
on odd sizes, paddings and partial tiles, and compiled (three TVM builds, module-scoped).
No timing assertions: speed lives in ``bench/fast_conv.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.errors import PassError, PipelineError
from slimfx.passes import fast_conv as fc

aten = torch.ops.aten
WINOGRAD = torch.ops.slimfx.winograd_conv2d.default
FFT = torch.ops.slimfx.fft_conv2d.default


def _rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.abs().max()).item()


def _conv_weight(cout, cin, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cout, cin, k, k, generator=g) * (cin * k * k) ** -0.5


# --------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matrices_compute_1d_correlation_exactly(tile):
    at, g, bt = fc.winograd_matrices(tile)
    alpha = tile + 2
    assert at.shape == (tile, alpha) and g.shape == (alpha, 3) and bt.shape == (alpha, alpha)
    d = torch.randn(alpha, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)
    want = torch.stack([d[i:i + 3] @ w for i in range(tile)])
    torch.testing.assert_close(at @ ((g @ w) * (bt @ d)), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="F\\(3,3\\) is not supported"):
        fc.winograd_matrices(3)


# --------------------------------------------------------------------------- PyTorch ops
SHAPES = [  # (n, cin, cout, size, padding)
    (1, 3, 5, 9, 1),    # partial tiles, few channels
    (2, 8, 16, 7, 0),   # no padding: 5x5 output
    (1, 16, 8, 12, 2),  # padding wider than the kernel's half
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_op_matches_direct(tile, shape):
    n, cin, cout, size, pad = shape
    torch.manual_seed(1)
    x = torch.randn(n, cin, size, size)
    w, b = _conv_weight(cout, cin, 3), torch.randn(cout)
    want = F.conv2d(x, w, b, padding=pad)
    got = fc.winograd_conv2d(x, fc.winograd_filter(w, tile), b, [pad, pad], tile)
    assert got.shape == want.shape
    assert _rel(got, want) <= fc.WINOGRAD_TOLERANCE[tile]
    no_bias = fc.winograd_conv2d(x, fc.winograd_filter(w, tile), None, [pad, pad], tile)
    assert _rel(no_bias, F.conv2d(x, w, padding=pad)) <= fc.WINOGRAD_TOLERANCE[tile]


def test_f43_error_is_larger_than_f23_and_within_its_bound():
    # The documented error growth: F(4,3)'s transforms amplify rounding more than F(2,3)'s.
    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, 16)
    w = _conv_weight(64, 64, 3)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    err = {t: _rel(fc.winograd_conv2d(x, fc.winograd_filter(w, t), None, [1, 1], t), exact)
           for t in (2, 4)}
    assert err[2] < err[4] <= fc.WINOGRAD_TOLERANCE[4]
    assert err[2] <= fc.WINOGRAD_TOLERANCE[2]


@pytest.mark.parametrize("k", [3, 5, 7, 11])
def test_fft_op_matches_direct(k):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 13, 11)  # non-square, several tiles, partial tiles
    w, b = _conv_weight(10, 6, k), torch.randn(10)
    pad = k // 2
    tile = fc.fft_tile(k, 13, 11, 6, 10)
    spec = fc.fft_spectrum(w, tile + k - 1)
    assert spec.shape == (2, tile + k - 1, (tile + k - 1) // 2 + 1, 6, 10)
    got = fc.fft_conv2d(x, spec, b, [pad, pad], k, tile)
    want = F.conv2d(x, w, b, padding=pad)
    assert got.shape == want.shape
    assert _rel(got, want) <= fc.FFT_TOLERANCE
    small = fc.fft_conv2d(x, fc.fft_spectrum(w, 2 + k - 1), b, [0, 0], k, 2)  # tiny tiles
    assert _rel(small, F.conv2d(x, w, b)) <= fc.FFT_TOLERANCE


@pytest.mark.parametrize("h,w,k,batch", [
    (7, 7, 7, 1),    # N = 10, not overlap-save's 14
    (14, 14, 11, 2),  # N = 20, not 30
    (7, 9, 5, 1),    # non-square: one window of 12 covers both axes
    (5, 5, 3, 1),    # N = 6 = tile + kernel - 1 - 1: the padding on one side left out
])
def test_fft_one_window_wraps_around_exactly(h, w, k, batch):
    """On a map that one window covers, the window may leave out the padding on one side:
    what wraps past its end reads the zero padding on the other (fft_wraps).  Exact in
    float64 against direct convolution; a window one point smaller than that is refused."""
    torch.manual_seed(3)
    x = torch.randn(batch, 4, h, w, dtype=torch.float64)
    wt, b = _conv_weight(6, 4, k).double(), torch.randn(6, dtype=torch.float64)
    pad = [k // 2, k // 2]
    size, tile = fc.fft_plan(k, (h, w), pad, 4, 6) if k > 3 else (6, 5)
    assert size < tile + k - 1 and fc.fft_wraps(size, tile, k, (h, w), pad)
    got = fc.fft_conv2d(x, fc.fft_spectrum(wt, size), b, pad, k, tile)
    assert _rel(got, F.conv2d(x, wt, b, padding=pad)) < 1e-12
    least = max(h, w) + k // 2  # the plan's N, or the even N above it
    assert size - least in (0, 1) and fc.fft_wraps(least, tile, k, (h, w), pad)
    assert not fc.fft_wraps(least - 1, tile, k, (h, w), pad)
    with pytest.raises(ValueError, match=f"windows of {least - 1} hold neither a tile of {tile}"):
        fc.fft_conv2d(x, fc.fft_spectrum(wt, least - 1), b, pad, k, tile)
    if tile - 1 + k - 1 > size:  # two tiles: no window may wrap
        with pytest.raises(ValueError, match="overlap-save"):
            fc.fft_conv2d(x, fc.fft_spectrum(wt, size), b, pad, k, tile - 1)


def test_fft_conv_pass_plans_one_window_on_small_maps():
    """fft-conv's automatic plan: one window of N = 10 for a 7x7 kernel on a 7x7 map (a
    spectrum of 10 x 6 bins per channel pair, not 14 x 8), overlap-save tiles elsewhere."""
    m = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2)).eval()
    x = torch.randn(1, 8, 7, 7)
    g = slimfx.run_pipeline(slimfx.capture(m, x), "fft-conv")
    spectra = [g.param(n) for n in g.nodes if n.op == "get_attr" and "fft_spectrum" in n.target]
    assert [tuple(t.shape[:3]) for t in spectra] == [(2, 10, 6), (2, 10, 6)]
    assert fc.fft_plan(5, (56, 56), (2, 2)) == (14, 10)  # many tiles: overlap-save
    with torch.no_grad():
        assert _rel(g(x), m(x)) <= fc.FFT_TOLERANCE


def test_mac_models_count_the_transform_domain_work():
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 7, padding=3))
    x = torch.randn(1, 16, 16, 16)
    g0 = slimfx.capture(m.eval(), x)
    g = slimfx.run_pipeline(g0, "winograd{tile=4},fft-conv")
    direct = [i.macs for i in g0.layers()]
    fast = {i.op: i.macs for i in g.layers()}
    gemm = 36 * 16 * 16 * 16  # alpha^2 x 16 tiles x Cin x Cout
    assert gemm < fast["slimfx.winograd_conv2d"] < direct[0]
    assert 0 < fast["slimfx.fft_conv2d"] < direct[1]


# --------------------------------------------------------------------------- passes
class Mixed(nn.Module):
    """3x3, 5x5 and 7x7 convs the passes replace; stride-2, dilated, grouped, 1x1 they keep."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c = nn.Conv2d(16, 16, 5, padding=2)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.dil = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.grp = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(16, 12, 1)
        self.d = nn.Conv2d(12, 12, 7, padding=3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        y = self.c(y)
        y = self.grp(self.dil(self.down(y)))
        return self.d(self.pw(y))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(1, 3, 15, 15)
    return model, x, slimfx.capture(model, x)


def _ops(g):
    return [n.target for n in g.find() if n.target in (aten.convolution.default, WINOGRAD, FFT)]


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_pass_replaces_eligible_convs_and_reports_errors(mixed, tile):
    model, x, g = mixed
    pm = slimfx.PassManager(f"winograd{{tile={tile}}}")
    g2 = pm.run(g)
    rec = pm.records[0]
    assert rec.status == "ok" and rec.modified
    assert sorted(rec.stats["layers"]) == ["a", "b"]
    assert rec.stats["skipped"] == {"c": "kernel 5x5 (Winograd F(m,3) needs 3x3)",
                                    "down": "stride [2, 2]", "dil": "dilation [2, 2]",
                                    "grp": "groups=4", "pw": "kernel 1x1 (Winograd F(m,3) needs 3x3)",
                                    "d": "kernel 7x7 (Winograd F(m,3) needs 3x3)"}
    for layer in rec.stats["layers"].values():
        assert layer["algo"] == f"winograd F({tile},3)"
        assert 0 < layer["rel_error"] <= fc.WINOGRAD_TOLERANCE[tile]
        assert layer["params"] == [16 * layer["params"][0] // 16, (tile + 2) ** 2 * layer["params"][0] // 9]
    assert _ops(g2).count(WINOGRAD) == 2 and _ops(g2).count(aten.convolution.default) == 6
    # the old 3x3 weights are gone, the transformed filters are parameters
    names = dict(g2.gm.named_parameters())
    assert "a.weight" not in names and names["a.winograd_u"].shape == (tile + 2, tile + 2, 16, 3)
    y = torch.randn_like(x)
    assert _rel(g2(y), model(y)) <= fc.WINOGRAD_TOLERANCE[tile]


def test_fft_pass_and_its_options(mixed):
    model, x, g = mixed
    pm = slimfx.PassManager("fft-conv")
    g2 = pm.run(g)
    layers = pm.records[0].stats["layers"]
    assert sorted(layers) == ["c", "d"]  # 5x5 and 7x7; 3x3 below min_kernel
    assert all(0 < r["rel_error"] <= fc.FFT_TOLERANCE for r in layers.values())
    assert _ops(g2).count(FFT) == 2
    g3 = slimfx.run_pipeline(g, "fft-conv{min_kernel=3,tile=4,exclude=[d]}")
    assert _ops(g3).count(FFT) == 3  # a, b, c (7x7 'd' excluded)
    spec = dict(g3.gm.named_parameters())["c.fft_spectrum"]
    assert spec.shape == (2, 8, 5, 16, 16)  # N = tile + k - 1 = 8
    y = torch.randn_like(x)
    assert _rel(g3(y), model(y)) <= fc.FFT_TOLERANCE


def test_bad_options_and_inputs_are_named(mixed):
    _, _, g = mixed
    with pytest.raises(PipelineError, match="pass 'winograd', option 'tile': '3' is not one of 2, 4"):
        slimfx.run_pipeline(g, "winograd{tile=3}")
    with pytest.raises(PipelineError, match="pass 'fft-conv': min_kernel must be at least 2"):
        slimfx.run_pipeline(g, "fft-conv{min_kernel=1}")
    with pytest.raises(PipelineError, match="unknown algorithm.*'fast'.*in algos"):
        slimfx.run_pipeline(g, "select-conv-algo{algos=[winograd4,fast]}")
    with pytest.raises(PipelineError, match="margin must be >= 1"):
        slimfx.run_pipeline(g, "select-conv-algo{margin=0.5}")
    with pytest.raises(PassError, match="exclude names module 'nope'"):
        slimfx.run_pipeline(g, "winograd{exclude=[nope]}")
    with pytest.raises(PassError, match="cannot measure on target 'aarch64'.*use by=model"):
        slimfx.run_pipeline(g, "select-conv-algo{target=aarch64}")
    with pytest.raises(ValueError, match="kernels up to 29"):
        fc.fft_tile(31, 64, 64)


def test_manager_verifies_at_the_tile_tolerance(mixed, monkeypatch):
    _, _, g = mixed
    assert fc.WinogradPass(tile=2).atol == 1e-5 and fc.WinogradPass(tile=4).atol == 1e-4
    # a bound tighter than F(4,3)'s real error must fail verification and roll back
    monkeypatch.setitem(fc.WINOGRAD_TOLERANCE, 4, 1e-9)
    with pytest.raises(PassError, match="lossless pass changed the outputs"):
        slimfx.run_pipeline(g, "winograd{tile=4}")


def test_select_by_model_applies_only_choices_that_beat_direct():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 11, padding=5), nn.ReLU(),
                          nn.Conv2d(64, 4, 3, padding=1)).eval()
    x = torch.randn(1, 64, 56, 56)
    pm = slimfx.PassManager("select-conv-algo{by=model}")
    g = pm.run(model, x)
    stats = pm.records[0].stats
    choices = stats["choices"]
    assert stats["by"] == "model" and sorted(choices) == ["0", "2", "4"]
    for name, c in choices.items():
        ms = c["ms"]
        assert set(ms) == ({"direct", "winograd2", "winograd4", "fft"} if name != "2"
                           else {"direct", "fft"})
        if c["choice"] != "direct":
            assert ms["direct"] >= 1.05 * ms[c["choice"]]
            assert name in stats["layers"]
        else:
            assert min(ms.values()) * 1.05 > ms["direct"] and name not in stats["layers"]
    # the model prefers F(4,3) for the wide 3x3, FFT for the 11x11, direct for 4 outputs
    assert [choices[n]["choice"] for n in ("0", "2", "4")] == ["winograd4", "fft", "direct"]
    ops = [n.target for n in g.find() if n.target in (WINOGRAD, FFT, aten.convolution.default)]
    assert ops == [WINOGRAD, FFT, aten.convolution.default]


@pytest.mark.parametrize("whole_ms, applied", [({"direct": 1.0, "selected": 0.5}, True),
                                               ({"direct": 1.0, "selected": 1.2}, False)])
def test_select_by_measure_keeps_direct_when_the_whole_model_is_slower(monkeypatch, whole_ms,
                                                                        applied):
    # the layer measures faster with F(4,3); the whole model decides whether it stays
    monkeypatch.setattr(fc, "measure_layer", lambda p, algos, *a, **k: {
        a: (1.0 if a == "direct" else 0.5 if a == "winograd4" else 2.0) for a in algos})
    monkeypatch.setattr(fc, "measure_models", lambda graphs, *a, **k: dict(whole_ms))
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    pm = slimfx.PassManager("select-conv-algo{by=measure}")
    g = pm.run(model, torch.randn(1, 16, 8, 8))
    stats = pm.records[0].stats
    assert stats["model_ms"] == whole_ms
    ops = [n.target for n in g.find() if n.target in (WINOGRAD, aten.convolution.default)]
    if applied:
        assert ops == [WINOGRAD] and stats["choices"]["0"]["choice"] == "winograd4"
    else:
        assert ops == [aten.convolution.default] and pm.records[0].modified is False
        assert stats["choices"]["0"]["choice"] == "direct"
        assert "1.200 ms vs 1.000 ms direct" in stats["rolled_back"]


@pytest.mark.parametrize("spec, cold", [("select-conv-algo{by=measure}", True),
                                        ("select-conv-algo{by=measure,cold=false}", False)])
def test_select_by_measure_times_layers_cold(monkeypatch, spec, cold):
    # layers are timed with their weights out of the caches, as inside a model
    seen = []
    monkeypatch.setattr(fc, "measure_layer", lambda p, algos, *a, **k: seen.append(k["cold"]) or {
        a: 1.0 for a in algos})
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    slimfx.PassManager(spec).run(model, torch.randn(1, 16, 8, 8))
    assert seen == [cold]


# --------------------------------------------------------------------------- compiled
class Net(nn.Module):
    """A stem (direct, blocked layout), Winograd convs with ReLU and a residual add
    between blocked neighbours, a 1x1, an FFT conv, odd channels and partial tiles."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.w2 = nn.Conv2d(16, 16, 3, padding=1)
        self.w4 = nn.Conv2d(16, 24, 3, padding=1)
        self.pw = nn.Conv2d(24, 16, 1)
        self.f = nn.Conv2d(16, 12, 5, padding=2)
        self.w4b = nn.Conv2d(12, 8, 3)  # no padding, 12 -> 8 channels

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.w2(y) + y)
        y = self.pw(torch.relu(self.w4(y)))
        return self.w4b(torch.relu(self.f(y)))


@pytest.fixture(scope="module")
def compiled_net():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 26, 26)
    pipeline = "winograd{tile=2,exclude=[w4,w4b]},winograd{tile=4},fft-conv"
    return model, x, slimfx.compile(model, x, pipeline=pipeline, atol=fc.WINOGRAD_TOLERANCE[4])


def test_compiled_fast_convs_match_direct(compiled_net):
    model, x, cm = compiled_net
    graph = cm.manifest["graph"]
    assert graph["outputs"] == ["f32[1,8,11,11]"]
    kernels = cm.manifest["build"]["kernels"]
    assert kernels["winograd_input"] == 3 and kernels["winograd_output"] == 3
    assert kernels["winograd_gemm"] == 3
    # FFT: forward and inverse transforms one hand-scheduled kernel each, and the spectral
    # product on (Re, Im) pairs; no matrix DFT of its own
    assert kernels["fft_input"] == 1 and kernels["fft_output"] == 1 and "fft_gemm" not in kernels
    assert kernels["fft_complex_gemm"] == 1
    assert kernels["conv"] == 2  # stem and 1x1 stay direct (blocked)
    for seed in (1, 2):
        y = torch.randn_like(x, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = model(y)
        assert _rel(cm(y), ref) <= fc.WINOGRAD_TOLERANCE[4]


@pytest.mark.parametrize("algo", ["winograd2", "winograd4", "fft"])
def test_each_compiled_op_alone_matches_direct_in_nchw(algo):
    # no blocked neighbours: NCHW in and out, channel counts the vector does not divide
    torch.manual_seed(3)
    k = 3 if algo != "fft" else 7
    conv = nn.Conv2d(20, 36, k, padding=1).eval()
    x = torch.randn(2, 20, 10, 9)
    pipe = fc._pipeline_of(algo)
    tol = fc.WINOGRAD_TOLERANCE[int(algo[-1])] if algo != "fft" else fc.FFT_TOLERANCE
    cm = slimfx.compile(conv, x, pipeline=pipe, atol=tol)
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), conv(y)) <= tol


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cin,cout,size,k,tile,batch,bias", [
    (16, 32, 12, 5, 10, 1, True),    # N = 14, 4 tiles (2 guarded), blocked between layers
    (8, 16, 9, 7, 0, 2, False),      # the cost model's tile; batch 2, no bias
    (16, 16, 14, 11, 12, 1, True),   # N = 22
    (16, 16, 10, 11, 20, 1, True),   # N = 30: one tile larger than the map
    (6, 20, 8, 5, 2, 1, True),       # N = 6; channel counts no vector divides
    (16, 16, 7, 7, 0, 1, True),      # fft_plan's one window of N = 10 that wraps around
    (8, 12, 9, 7, 0, 2, False),      # the same on a 9x9 map (N = 12), batch 2, no bias
])
def test_compiled_fft_matches_direct(fused, cin, cout, size, k, tile, batch, bias, monkeypatch):
    """Two FFT layers with a ReLU between (the second reads the first's blocked output),
    fused transforms or composed of matrix DFTs (FUSED_FFT), against PyTorch."""
    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "FUSED_FFT", fused)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), nn.ReLU(),
                          nn.Conv2d(cout, cout, k, padding=k // 2, bias=bias)).eval()
    x = torch.randn(batch, cin, size, size)
    if not tile:
        n, t = fc.fft_plan(k, (size, size), (k // 2, k // 2), cin, cout)
        assert n < t + k - 1 and t == size
    cm = slimfx.compile(model, x, pipeline=f"fft-conv{{tile={tile}}}", atol=fc.FFT_TOLERANCE)
    kernels = cm.manifest["build"]["kernels"]
    assert kernels["fft_complex_gemm"] >= 1  # one PrimFunc where the two layers share shapes
    if fused:  # hand-scheduled (a schedule that raises would fall back to "generic")
        assert kernels["fft_input"] == 2 and kernels["fft_output"] == 2, kernels
    else:
        assert "fft_input" not in kernels and kernels["fft_gemm"] >= 4, kernels
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), model(y)) <= fc.FFT_TOLERANCE


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("h,w,k,batch", [(7, 9, 5, 1), (9, 6, 7, 2)])
def test_compiled_fft_one_window_on_non_square_maps(fused, h, w, k, batch, monkeypatch):
    """fft_plan's one window (N = 12, tile 9) on a map whose sides differ, compiled with the
    fused transforms and with matrix DFTs: it matches PyTorch."""
    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "FUSED_FFT", fused)
    n, t = fc.fft_plan(k, (h, w), (k // 2, k // 2), 8, 8)
    assert (n, t) == (12, 9)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(8, 8, k, padding=k // 2), nn.ReLU(),
                          nn.Conv2d(8, 12, k, padding=k // 2)).eval()
    x = torch.randn(batch, 8, h, w)
    cm = slimfx.compile(model, x, pipeline="fft-conv", atol=fc.FFT_TOLERANCE)
    assert cm.manifest["build"]["kernels"]["fft_complex_gemm"] >= 1
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), model(y)) <= fc.FFT_TOLERANCE


@pytest.mark.parametrize("algo,cin,cout,size,k", [
    ("winograd4", 16, 64, 7, 3),   # 4 tiles: 64-channel panels of packed U, 4 rows
    ("winograd4", 8, 48, 10, 3),   # 9 tiles (8 + a guarded 1), 16-channel panels
    ("fft", 8, 64, 6, 5),          # 9 tiles of N=6: (Re, Im) panels of 16 channels
])
def test_compiled_small_maps_use_packed_panels_and_match_direct(algo, cin, cout, size, k):
    # deep-and-small layers: few tiles, so the GEMM streams panels of the packed weights
    from slimfx.lowering import fast_conv as lf

    torch.manual_seed(4)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2).eval()
    x = torch.randn(1, cin, size, size)
    tol = fc.WINOGRAD_TOLERANCE[4] if algo != "fft" else fc.FFT_TOLERANCE
    cm = slimfx.compile(conv, x, pipeline=fc._pipeline_of(algo), atol=tol)
    kernels = cm.manifest["build"]["kernels"]
    assert kernels.get("winograd_gemm" if algo != "fft" else "fft_complex_gemm") == 1
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), conv(y)) <= tol
    assert lf.gemm_panel(4, 64) == 64 and lf.gemm_panel(9, 48) == 16


@pytest.mark.parametrize("n,cin,cout,size,factored", [
    (1, 16, 32, 14, True),   # 16 tiles: H, (alpha, Cout / nb, 3, Cin, nb)
    (4, 8, 16, 7, True),     # batch 4 x 4 tiles
    (1, 16, 32, 28, False),  # 49 tiles: U, each weight reused enough to be read whole
])
def test_f43_on_few_tiles_reads_half_transformed_weights(n, cin, cout, size, factored, monkeypatch):
    """F(4,3) with few tiles reads H = G g (alpha x 3, half of U) and forms U in its GEMM;
    two such layers in a row (the second's input transform reads the blocked layout and
    scales V's columns too) match direct, as with FACTOR_U off."""
    from slimfx.lowering import fast_conv as lf

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(cout, cout, 3, padding=1)).eval()
    x = torch.randn(n, cin, size, size)
    tol = fc.WINOGRAD_TOLERANCE[4]
    with torch.no_grad():
        want = model(x)
    shapes = {}
    for on in (True, False):
        monkeypatch.setattr(lf, "FACTOR_U", on)
        cm = slimfx.compile(model, x, pipeline="winograd{tile=4}", atol=tol)
        assert cm.manifest["build"]["kernels"].get("winograd_gemm") == 2  # the hand schedule
        assert _rel(cm(x), want) <= tol
        prof = cm.profile(x.numpy(), repeat=1, warmup=0)
        shapes[on] = {k.shapes.split()[1] for k in prof.kernels if k.name.startswith("winograd_matmul")}
    nb = lf.gemm_panel(n * -(-size // 4) ** 2, cout)
    h = {f"6x{cout // nb}x3x{c}x{nb}" for c in (cin, cout)}
    u = {f"36x{cout // nb}x{c}x{nb}" for c in (cin, cout)}
    assert shapes == {True: h if factored else u, False: u}


@pytest.mark.parametrize("n,cin,cout,size,target", [
    (1, 16, 32, 7, "host"),         # 4 tiles: g, panels of 16 output channels
    (1, 24, 40, 5, "host"),         # channels not multiples of 16: V blocks and panels of 8
    (1, 16, 16, 4, "host"),         # one tile
    (1, 16, 32, 7, "x86-64-avx2"),  # 16 vector registers: the points nu in groups
])
def test_f43_on_four_tiles_forms_u_from_the_3x3_weights(n, cin, cout, size, target, monkeypatch):
    """FORM_U: F(4,3) on at most 4 tiles reads g = P^T U P (9 per channel pair, packed
    (Cout / nb, Cin, 9, nb)) and forms U in its GEMM, which keeps its hand schedule (not the
    generic fallback) and, with FORM_OUTPUT, computes the output transform in the same
    kernel (no winograd_output kernel); two such layers in a row, the second with a
    residual add, match PyTorch, as with FORM_OUTPUT off and with FORM_U off (H)."""
    from slimfx.lowering import cpu_schedules as cs
    from slimfx.lowering import fast_conv as lf

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(cin, cout, 3, padding=1)
            self.b = nn.Conv2d(cout, cout, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return torch.relu(self.b(y) + y)

    torch.manual_seed(9)
    model = Block().eval()
    x = torch.randn(n, cin, size, size)
    tol = fc.WINOGRAD_TOLERANCE[4]
    with torch.no_grad():
        want = model(x)
    monkeypatch.setattr(lf, "FORM_MIN_BYTES", 0)  # small layers here, read as large ones
    assert lf.weight_form(4, n * -(-size // 4) ** 2, cin * cout) == "g"
    shapes, outputs = {}, {}
    for form, fused in (("g", True), ("g", False), ("h", True)):
        monkeypatch.setattr(lf, "FORM_U", form == "g")
        monkeypatch.setattr(lf, "FORM_OUTPUT", fused)
        cm = slimfx.compile(model, x, pipeline="winograd{tile=4}", atol=tol, target=target)
        kernels = cm.manifest["build"]["kernels"]
        # GEMMs of one shape share a kernel; fused with their outputs, the two differ
        assert kernels.get("winograd_gemm") == (1 if cin == cout and not (form == "g" and fused)
                                                else 2)
        outputs[form, fused] = kernels.get("winograd_output", 0)
        assert _rel(cm(x), want) <= tol
        prof = cm.profile(x.numpy(), repeat=1, warmup=0)
        shapes[form, fused] = {k.shapes.split()[1] for k in prof.kernels if "winograd_matmul" in k.name}
    nb = cs._largest_divisor(cout, 16)
    g = {f"{cout // nb}x{c}x9x{nb}" for c in (cin, cout)}
    assert shapes["g", True] == shapes["g", False] == g
    assert all(s.startswith("6x") and s.count("x3x") for s in shapes["h", True])  # H
    assert outputs == {("g", True): 0, ("g", False): 2, ("h", True): 2}


@pytest.mark.parametrize("twice", [True, False])
def test_formed_gemm_prefetches_the_next_chunk_outside_its_register_loop(twice, monkeypatch):
    """The formed GEMM's reduction runs in chunks of FORM_K_CHUNK channels; each point eps
    prefetches its sixth of the next chunk's g (flat addresses, one line each) before its
    pass over the chunk, never inside the loop whose accumulators stay in registers; with
    FORM_PREFETCH_TWICE, the sixth before it again, so every line is prefetched twice."""
    import collections
    import re

    import numpy as np
    from tvm import s_tir, te

    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "FORM_PREFETCH_TWICE", twice)
    v = te.placeholder((6, 4, 6, 4, 16), name="v")
    g = te.placeholder((4, 64, 9, 16), name="g")  # 4 panels of 64 channels: 16 chunks
    func = te.create_prim_func([v, g, lf._formed_gemm_te(v, g, lf.factored_weights(4)[1])])
    sch = s_tir.Schedule(func)
    lf._schedule_formed_gemm(sch, sch.get_sblock(lf.GEMM_BLOCK), 16)
    text = sch.mod["main"].script()
    lines, chunk = 16 * 9 * 16 * 4 // 64 // 6, 16 * 9 * 16  # per point: a sixth of a chunk
    assert text.count("llvm.prefetch") == lines * (2 if twice else 1) and "g_flat" in text
    assert "for k_0 in range(4):" in text  # 64 channels: 4 chunks of 16
    at = [i for i in range(len(text)) if text.startswith("llvm.prefetch", i)]
    points, register_loop = text.index("for eps in T.unroll(6):"), text.index("for k_1, k_2")
    assert points < min(at) and max(at) < register_loop
    # the lines each point (task j_0, chunk k_0, eps) prefetches, from the addresses
    exprs = re.findall(r"llvm\.prefetch\", T\.address_of\(g_flat\[(.*)\]\), 0, 2, 1\)", text)
    t = type("T", (), {"min": staticmethod(min), "max": staticmethod(max)})
    times = collections.Counter()
    for j_0, k_0, eps in np.ndindex(4, 4, 6):
        got = [eval(e, {"T": t, "j_0": j_0, "k_0": k_0, "eps": eps}) for e in exprs]  # noqa: S307
        assert all(a % 16 == 0 for a in got)  # one line each
        times.update(a // 16 for a in got)
        nxt = (j_0 * 4 + k_0 + 1) * chunk  # the next chunk (the next panel's first)
        if nxt < g.shape[0] * 64 * 9 * 16:
            first = nxt + (eps - twice) * lines * 16
            assert got == list(range(first, nxt + (eps + 1) * lines * 16, 16))
    per_line = [times[a // 16] for a in range(chunk, 15 * chunk, 16)]  # chunks 1-14
    assert set(per_line) == {2 if twice else 1}


@pytest.mark.parametrize("adds", [True, False])
def test_formed_gemm_forms_u_with_adds(adds, monkeypatch):
    """FORM_ADDS: G1's rows are integers and their 2s and 4s doublings, so the formed GEMM's
    update on 4 tiles has no constant multiples (off, or on one tile: it multiplies by
    G1's entries); either way the scheduled kernel computes V @ (G1 g G1^T) point by point."""
    import numpy as np
    import tvm
    from tvm import s_tir, te

    from slimfx.lowering import fast_conv as lf
    from slimfx.lowering import host_target

    monkeypatch.setattr(lf, "FORM_ADDS", adds)
    g1 = lf.factored_weights(4)[1]
    assert np.array_equal(g1, np.round(g1)) == adds
    g = te.placeholder((2, 32, 9, 16), name="g")  # 32 output channels in 2 panels

    def scheduled(tiles: int):
        v = te.placeholder((6, 2, 6, tiles, 16), name="v")  # 32 input channels
        func = te.create_prim_func([v, g, lf._formed_gemm_te(v, g, g1.astype("float32"))])
        sch = s_tir.Schedule(func)
        lf._schedule_formed_gemm(sch, sch.get_sblock(lf.GEMM_BLOCK), 16)
        text = sch.mod["main"].script()
        update = text[text.index('T.sblock("winograd_matmul_update")'):]
        update = update[:update.index("T.sblock(", 10)] if "T.sblock(" in update[10:] else update
        return sch, "T.float32(" in update

    sch, multiplies = scheduled(4)
    assert multiplies != adds and scheduled(1)[1]
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=host_target().tvm())
    rng = np.random.default_rng(3)
    vv = rng.standard_normal((6, 2, 6, 4, 16)).astype("float32")
    gg = rng.standard_normal((2, 32, 9, 16)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((6, 6, 4, 32), "float32"), tvm.cpu())
    lib["main"](tvm.runtime.tensor(vv), tvm.runtime.tensor(gg), out)
    w = gg.transpose(1, 0, 3, 2).reshape(32, 32, 3, 3).astype("float64")  # (Cin, Cout, 3, 3)
    u1 = np.einsum("ea,kjab,nb->enkj", g1, w, g1)
    vk = vv.transpose(0, 2, 3, 1, 4).reshape(6, 6, 4, 32).astype("float64")  # (eps, nu, tile, Cin)
    want = np.einsum("enik,enkj->enij", vk, u1)
    assert np.abs(out.numpy() - want).max() <= 1e-4 * np.abs(want).max()


def test_only_cpu_lowerings_read_half_transformed_weights():
    """The factored GEMM is a CPU schedule: lowered for CUDA, F(4,3) on 16 tiles reads U."""
    import re

    from slimfx.lowering.relax import to_relax

    g = slimfx.run_pipeline(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval(),
                            "winograd{tile=4}", torch.randn(1, 16, 14, 14))

    def gemm_weight(kind: str) -> str:
        text = to_relax(g, kind).mod["main"].script(show_meta=False)
        call = re.search(r"call_tir\((?:cls\.)?winograd_matmul, \((\w+), (\w+)\)", text)
        return re.search(rf"\b{call.group(2)}: R\.Tensor\(\(([\d, ]+)\)", text).group(1)

    assert gemm_weight("llvm") == "6, 1, 3, 16, 32" and gemm_weight("cuda") == "36, 1, 16, 32"


def test_only_cpu_lowerings_fuse_the_fft_transforms():
    """The fused FFT transforms are CPU schedules: lowered for CUDA, the layer keeps the
    matrix DFTs (GEMMs dlight schedules)."""
    from slimfx.lowering.relax import to_relax

    g = slimfx.run_pipeline(nn.Sequential(nn.Conv2d(8, 8, 5, padding=2)).eval(),
                            "fft-conv", torch.randn(1, 8, 12, 12))

    def calls(kind: str) -> set[str]:
        text = to_relax(g, kind).mod["main"].script(show_meta=False)
        return {n for n in ("fft_input", "fft_output", "fft_matmul", "fft_cmatmul") if n in text}

    assert calls("llvm") == {"fft_input", "fft_output", "fft_cmatmul"}
    assert calls("cuda") == {"fft_matmul", "fft_cmatmul"}


@pytest.mark.parametrize("chunks", [True, False])
def test_factored_gemm_runs_all_points_over_each_chunk_of_channels(chunks, monkeypatch):
    """FACTOR_K_CHUNKS: the six points of a factored GEMM task with one row tile (4 tiles)
    take one chunk of 32 input channels after another (the chunk's H stays in L1), so the
    reduction's outer loop encloses the unrolled points; two row tiles (16 tiles) keep
    whole rows; 64 -> 32 channels at 7x7 match direct either way."""
    import re

    from tvm import te

    from slimfx.lowering import cpu_schedules as cs
    from slimfx.lowering import fast_conv as lf
    from slimfx.lowering import host_target

    monkeypatch.setattr(lf, "FACTOR_K_CHUNKS", chunks)
    v = te.placeholder((36, 4, 64), name="v")
    h = te.placeholder((6, 1, 3, 64, 32), name="h")
    g1 = lf.factored_weights(4)[1].astype("float32")
    func = te.create_prim_func([v, h, lf._factored_gemm_te(v, h, g1)])
    script = cs.schedule_primfunc(func, host_target()).script()
    chunked = re.compile(r"for k_0 in range\(2\):\s*for e_1 in T.unroll\(6\)")
    assert bool(chunked.search(script)) == chunks
    v16 = te.placeholder((36, 16, 64), name="v")
    func = te.create_prim_func([v16, h, lf._factored_gemm_te(v16, h, g1)])
    assert not chunked.search(cs.schedule_primfunc(func, host_target()).script())
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 64, 7, 7)
    tol = fc.WINOGRAD_TOLERANCE[4]
    cm = slimfx.compile(model, x, pipeline="winograd{tile=4}", atol=tol)
    with torch.no_grad():
        assert _rel(cm(x), model(x)) <= tol


def test_select_by_model_counts_half_the_bytes_of_factored_f43(monkeypatch):
    """256 channels at 14x14 (16 tiles): the factored F(4,3) reads half of U's 9.4 MB, so
    the cold model picks it over F(2,3) (with U whole, it picked F(2,3))."""
    from slimfx.lowering import fast_conv as lf

    p = fc.ConvParams(256, 256, 3, (1, 1), (1, 256, 14, 14), (1, 256, 14, 14))
    picks = {}
    for on in (True, False):
        monkeypatch.setattr(lf, "FACTOR_U", on)
        picks[on] = fc.choose({a: fc.estimate_ms(a, p) for a in ("direct", *fc.ALGOS)}, 1.05)
    assert picks == {True: "winograd4", False: "winograd2"}


def test_unpacked_weight_layout_still_compiles_and_matches(monkeypatch):
    # PACK_U=False (U as (alpha^2, Cin, Cout), the A/B baseline of bench/fast_conv.py)
    from slimfx.lowering import fast_conv as lf

    monkeypatch.setattr(lf, "PACK_U", False)
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.randn(1, 16, 7, 7)
    cm = slimfx.compile(conv, x, pipeline="winograd{tile=4}", atol=fc.WINOGRAD_TOLERANCE[4])
    assert cm.manifest["build"]["kernels"].get("winograd_gemm") == 1
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), conv(y)) <= fc.WINOGRAD_TOLERANCE[4]


def test_select_by_measure_records_times_and_applies_faster_choices():
    conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 16, 12, 12)
    fc._MEASURED.clear()
    pm = slimfx.PassManager("select-conv-algo{by=measure,algos=[winograd4],repeat=3}")
    g = pm.run(conv, x)
    c = pm.records[0].stats["choices"]["0"]
    assert set(c["ms"]) == {"direct", "winograd4"} and all(t > 0 for t in c["ms"].values())
    faster = c["ms"]["direct"] >= 1.05 * c["ms"]["winograd4"]
    assert c["choice"] == ("winograd4" if faster else "direct")
    assert (next(g.find()).target is WINOGRAD) == faster
    assert len(fc._MEASURED) == 2  # cached: a layer of the same shape is not measured again


class BlockedNet(nn.Module):
    """Winograd convs between direct (blocked) neighbours: ReLU, a residual add, a max
    pool and a bias-free conv between them; 24 channels (an 8-wide block on AVX-512)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.a = nn.Conv2d(24, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 3, padding=1, bias=False)
        self.c = nn.Conv2d(24, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.b(torch.relu(self.a(y))) + y)
        y = nn.functional.max_pool2d(self.c(y), 2)
        return self.head(torch.relu(y))


def _main_calls(mod) -> list[str]:
    """Callee names of ``main``'s kernel calls, in order."""
    from tvm import relax

    names = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                names.append(v.args[0].name_hint)
    return names


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_reads_and_writes_the_blocked_layout(tile, monkeypatch):
    from slimfx.lowering import cpu_schedules, to_relax
    from slimfx.lowering import fast_conv as lf
    from slimfx.lowering.targets import host_target

    torch.manual_seed(5)
    model = BlockedNet().eval()
    x = torch.randn(1, 3, 12, 12)
    pipe = f"winograd{{tile={tile},exclude=[stem]}}"
    graph = slimfx.run_pipeline(slimfx.capture(model, x), pipe)
    prog = to_relax(graph)
    calls = {}
    for blocked in (True, False):
        monkeypatch.setattr(lf, "BLOCKED", blocked)
        calls[blocked] = _main_calls(cpu_schedules.prepare(prog.mod, host_target()))
    transforms = {k: [c for c in v if "layout_transform" in c] for k, v in calls.items()}
    # blocked: only the model's input and output are converted; before, every Winograd op
    # converted its input from and its output back to the blocked layout
    assert len(transforms[True]) == 2 and len(transforms[False]) >= 5
    assert sum("winograd_output" in c for c in calls[True]) == 3
    tol = fc.WINOGRAD_TOLERANCE[tile]
    outs = {}
    for blocked in (True, False):
        monkeypatch.setattr(lf, "BLOCKED", blocked)
        outs[blocked] = slimfx.compile(graph, x, pipeline="", atol=tol)(x)
    with torch.no_grad():
        ref = model(x)
    assert _rel(outs[True], ref) <= tol
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


def test_select_by_model_cold_false_uses_the_warm_constants():
    """cold=false: the constants fitted with weights in cache, with which Winograd wins on
    96 channels at 7x7 (with the weights from memory, the model keeps the layer direct)."""
    model = nn.Sequential(nn.Conv2d(96, 96, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 96, 7, 7)
    picks = {}
    for cold in (True, False):
        pm = slimfx.PassManager(f"select-conv-algo{{by=model,cold={str(cold).lower()}}}")
        pm.run(model, x)
        picks[cold] = pm.records[0].stats["choices"]["0"]
    assert picks[True]["choice"] == "direct" and picks[False]["choice"] != "direct"
    from slimfx.lowering import host_target

    t = host_target()
    p = fc.ConvParams(96, 96, 3, (1, 1), (1, 96, 7, 7), (1, 96, 7, 7))
    for algo in ("winograd2", "winograd4"):
        warm = fc.estimate_ms(algo, p, vector_bits=t.vector_bits, cores=t.num_cores,
                              model=fc.MODEL_WARM)
        assert picks[False]["ms"][algo] == round(warm, 4)


# --------------------------------------------------------------------------- float16 U
@pytest.mark.parametrize("tile", [2, 4])
def test_half_u_op_error_is_within_its_bound_and_above_float32s(tile):
    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, 16)
    w = _conv_weight(64, 64, 3)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    u16 = fc.winograd_filter(w, tile, torch.float16)
    assert u16.dtype == torch.float16 and u16.shape == (tile + 2, tile + 2, 64, 64)
    half = _rel(fc.winograd_conv2d(x, u16, None, [1, 1], tile), exact)
    single = _rel(fc.winograd_conv2d(x, fc.winograd_filter(w, tile), None, [1, 1], tile), exact)
    assert 10 * single < half <= fc.HALF_ERROR[f"winograd{tile}"]


def test_half_u_pass_is_lossy_stores_half_the_bytes_and_skips_out_of_range_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    with torch.no_grad():
        model[4].weight.mul_(1e-7)  # its U would fall to float16's subnormals
    x = torch.randn(1, 8, 12, 12)
    g = slimfx.capture(model, x)
    pm = slimfx.PassManager("winograd{tile=4,weight_dtype=float16}")
    g2 = pm.run(g)
    rec = pm.records[0]
    assert rec.status == "ok" and not rec.lossless and rec.rel_error > 0  # recorded
    assert sorted(rec.stats["layers"]) == ["0", "2"]
    assert rec.stats["skipped"]["4"].startswith("float16 U loses precision")
    params = dict(g2.gm.named_parameters())
    for name, layer in rec.stats["layers"].items():
        assert layer["weight_dtype"] == "float16" and params[f"{name}.winograd_u"].dtype == torch.float16
        assert layer["bytes"][1] == 2 * layer["params"][1]  # 2 bytes per element of U
        assert fc.WINOGRAD_TOLERANCE[4] < layer["rel_error"] <= fc.HALF_ERROR["winograd4"]
    assert _ops(g2).count(WINOGRAD) == 2 and "4.weight" in params  # the tiny layer kept
    y = torch.randn_like(x)
    assert _rel(g2(y), model(y)) <= 2 * fc.HALF_ERROR["winograd4"]
    big = fc.winograd_filter(torch.full((4, 4, 3, 3), 1e5), 2, torch.float64)
    assert fc.half_problem(big).startswith("float16 U out of range")
    with pytest.raises(PipelineError, match="option 'weight_dtype'"):
        slimfx.run_pipeline(g, "winograd{weight_dtype=int8}")
    # float32 U (the default) stays lossless, verified at the tile's tolerance
    pm32 = slimfx.PassManager("winograd{tile=4}")
    pm32.run(g)
    assert pm32.records[0].lossless and pm32.records[0].stats["layers"]["0"]["weight_dtype"] == "float32"


def test_compiled_half_u_reads_float16_and_matches_its_graph(tmp_path):
    import os

    import numpy as np

    from slimfx.runtime import load

    torch.manual_seed(6)
    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 16, 10, 10)
    graph = slimfx.run_pipeline(conv, "winograd{tile=4,weight_dtype=float16}", x)
    cm = slimfx.compile(graph, atol=fc.WINOGRAD_TOLERANCE[4])  # vs the graph: float32 rounding
    assert cm.manifest["build"]["kernels"].get("winograd_gemm") == 2  # the hand schedule
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), graph(y)) <= fc.WINOGRAD_TOLERANCE[4]
        assert _rel(cm(y), conv(y)) <= 2 * fc.HALF_ERROR["winograd4"]
    # the artifact stores U in float16 (half the bytes on disk too) and runs the same
    path = cm.save(tmp_path / "half_u")
    with np.load(os.path.join(path, "params.npz")) as params:
        dtypes = sorted(str(a.dtype) for a in params.values())
    assert dtypes.count("float16") == 2  # the two U; the biases stay float32
    torch.testing.assert_close(load(path)(y), cm(y), rtol=0, atol=0)


def test_select_by_model_with_float16_weights_models_half_their_bytes():
    # 512 channels at 4x4, F(2,3) the candidate: float32 U (16.8 MB), read for 4 tiles,
    # stays direct cold; half of it wins.  (F(4,3) would win in float32 there, reading g.)
    model = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1)).eval()
    x = torch.randn(1, 512, 4, 4)
    p = fc.ConvParams(512, 512, 3, (1, 1), tuple(x.shape), tuple(x.shape))
    assert fc.estimate_ms("winograd2", p, weight_bytes=2) < fc.estimate_ms("winograd2", p)
    picks, records = {}, {}
    for weight_dtype in ("float32", "float16"):
        pm = slimfx.PassManager(
            f"select-conv-algo{{by=model,algos=[winograd2],weight_dtype={weight_dtype}}}")
        g = pm.run(model, x)
        picks[weight_dtype], records[weight_dtype] = pm.records[0].stats["choices"]["0"], pm.records[0]
    assert picks["float32"]["choice"] == "direct" and records["float32"].lossless
    assert picks["float16"]["choice"] == "winograd2" and not records["float16"].lossless
    assert dict(g.gm.named_parameters())["0.winograd_u"].dtype == torch.float16
    with torch.no_grad():
        model[0].weight.fill_(1e5)  # U beyond float16's range: F(2,3) gives way
    pm = slimfx.PassManager("select-conv-algo{by=model,weight_dtype=float16}")
    pm.run(model, x)
    pick = pm.records[0].stats["choices"]["0"]
    assert pick["choice"] != "winograd2"
    assert pick["not_float16"]["winograd2"].startswith("float16 U out of range")


def test_half_spectrum_fft_is_lossy_within_its_bound_and_compiles():
    torch.manual_seed(7)
    x = torch.randn(1, 16, 14, 14)
    w = _conv_weight(16, 16, 7)
    exact = F.conv2d(x.double(), w.double(), padding=3)
    tile = fc.fft_tile(7, 14, 14, 16, 16)
    spec16 = fc.fft_spectrum(w, tile + 6, torch.float16)
    half = _rel(fc.fft_conv2d(x, spec16, None, [3, 3], 7, tile), exact)
    single = _rel(fc.fft_conv2d(x, fc.fft_spectrum(w, tile + 6), None, [3, 3], 7, tile), exact)
    assert spec16.dtype == torch.float16 and 10 * single < half <= fc.HALF_ERROR["fft"]
    model = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3), nn.ReLU(),
                          nn.Conv2d(16, 16, 5, padding=2)).eval()
    with torch.no_grad():
        model[2].weight.fill_(1e5)  # a spectrum beyond float16's range: that layer stays direct
    pm = slimfx.PassManager("fft-conv{weight_dtype=float16}")
    g = pm.run(model, x)
    rec = pm.records[0]
    assert rec.status == "ok" and not rec.lossless and sorted(rec.stats["layers"]) == ["0"]
    assert rec.stats["skipped"]["2"].startswith("float16 spectrum out of range")
    layer = rec.stats["layers"]["0"]
    assert layer["weight_dtype"] == "float16" and layer["bytes"][1] == 2 * layer["params"][1]
    assert 0 < layer["rel_error"] <= fc.HALF_ERROR["fft"]
    assert dict(g.gm.named_parameters())["0.fft_spectrum"].dtype == torch.float16
    cm = slimfx.compile(g, atol=fc.FFT_TOLERANCE)  # vs the graph: float32 rounding
    assert cm.manifest["build"]["kernels"].get("fft_complex_gemm") == 1  # the hand schedule
    y = torch.randn_like(x)
    with torch.no_grad():
        assert _rel(cm(y), g(y)) <= fc.FFT_TOLERANCE
