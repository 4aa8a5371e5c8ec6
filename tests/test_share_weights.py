"""Weight sharing: k-means, the share-weights / hash-weights passes, codebook fine-tuning,
the lowering (decode at load time or in the program) and compact artifact storage."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ConvBnRelu, randomize_bn

import slimfx
from slimfx.errors import PassError, PipelineError
from slimfx.passes.share_weights import (
    codebook_parameters,
    finetune_codebooks,
    hash_buckets,
    kmeans_1d,
    set_decode,
    shared_weights,
    storage_report,
)
from slimfx.runtime import ArtifactError, artifact, load

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(ConvBnRelu(16)).eval()


@pytest.fixture(scope="module")
def folded(model):
    return slimfx.run_pipeline(model, "fold-bn,dce", X)


# ------------------------------------------------------------------------------ k-means
@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_kmeans_1d_beats_uniform_quantization(init):
    x = np.random.default_rng(0).standard_normal(5000) ** 3  # heavy tails
    c, lab = kmeans_1d(x, 8, init=init)
    assert lab.dtype == np.uint8 and lab.max() < 8 and np.all(np.diff(c) >= 0)
    err = np.linalg.norm(c[lab] - x)
    grid = np.linspace(x.min(), x.max(), 8)  # the linear init itself, no Lloyd steps
    uniform = np.linalg.norm(grid[np.abs(x[:, None] - grid).argmin(1)] - x)
    assert err < 0.8 * uniform
    # Lloyd's fixed point: every centroid is the mean of its values, each value nearest
    for j in range(8):
        if (lab == j).any():
            assert c[j] == pytest.approx(x[lab == j].mean())
    assert np.array_equal(np.abs(x[:, None] - c).argmin(1), lab)


def test_kmeans_1d_exact_with_few_values_and_errors():
    x = np.array([0.5, -1.0, 0.5, 2.0])
    c, lab = kmeans_1d(x, 4)
    assert np.array_equal(c[lab], x)
    with pytest.raises(ValueError, match="k must be in 1..256"):
        kmeans_1d(x, 300)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 2)


# ------------------------------------------------------------------------------ passes
@pytest.mark.parametrize("bits, scope", [(2, "layer"), (4, "layer"), (3, "channel")])
def test_no_layer_has_more_than_2_bits_values(folded, bits, scope):
    pm = slimfx.PassManager(f"share-weights{{bits={bits},scope={scope}}},dce")
    g = pm.run(folded)
    weights = shared_weights(g)
    assert sorted(weights) == ["conv1", "conv2", "fc"]
    for path, w in weights.items():
        groups = w.reshape(w.shape[0], -1) if scope == "channel" else w.reshape(1, -1)
        assert max(len(torch.unique(r)) for r in groups) <= 2 ** bits, path
        assert len(torch.unique(w)) > 1
    rec = pm.records[0]
    assert not rec.lossless and rec.status == "ok" and rec.rel_error > 0  # lossy: error kept
    assert 0 < rec.stats["weight_rel_error_max"] < (0.6 if bits == 2 else 0.2)
    names = dict(g.gm.named_parameters())
    assert names["conv2.weight_indices"].dtype == torch.uint8
    assert not any(n.endswith(".weight") for n in names)  # the float weights are gone
    assert rec.stats["stored_bytes"] < rec.stats["fp32_bytes"] / 4


def test_bad_options_are_named(folded):
    with pytest.raises(PipelineError, match=r"share-weights.*'bits' must be in 1..8.*got 9"):
        slimfx.run_pipeline(folded, "share-weights{bits=9}")
    with pytest.raises(PipelineError, match="'buckets' must be in"):
        slimfx.run_pipeline(folded, "hash-weights{buckets=0}")
    with pytest.raises(PassError, match="no conv or linear layer at module path 'conv9'"):
        slimfx.run_pipeline(folded, "share-weights{exclude=[conv9]}")
    with pytest.raises(PassError, match="layer fc has 16 input features, not a multiple of 3"):
        slimfx.run_pipeline(folded, "share-weights{pq=3}")


def test_product_quantization_of_linear_layers(folded):
    g = slimfx.run_pipeline(folded, "share-weights{bits=2,pq=4}")
    fc = next(n for n in g.find(torch.ops.slimfx.pq_weight.default))
    w = shared_weights(g)["fc"]
    for j in range(4):  # each 4-wide sub-space holds at most 4 distinct sub-vectors
        assert len(torch.unique(w[:, 4 * j:4 * j + 4], dim=0)) <= 4
    assert tuple(g.param(fc.args[0]).shape) == (4, 4)  # (out features, sub-vectors)
    assert tuple(g.param(fc.args[1]).shape) == (4, 4, 4)  # (sub-spaces, K, d)


def test_hash_weights_store_no_indices(folded):
    pm = slimfx.PassManager("hash-weights{buckets=32},dce")
    g = pm.run(folded)
    assert pm.records[0].stats["kept"] == []  # conv1 has 432 weights, fc 64
    ops = list(g.find(torch.ops.slimfx.hashed_weight.default))
    assert len(ops) == 3
    assert not any(p.dtype == torch.uint8 for p in g.gm.parameters())
    for w in shared_weights(g).values():
        assert len(torch.unique(w.abs())) <= 32
    # the bucket of each position is a fixed function of (position, seed)
    idx, sign = hash_buckets(1000, 32, 5)
    idx2, _ = hash_buckets(1000, 32, 5)
    assert torch.equal(idx, idx2) and idx.max() < 32 and set(sign.tolist()) == {-1.0, 1.0}
    assert len(torch.unique(idx)) == 32
    big = slimfx.PassManager("hash-weights{buckets=1000}")
    big.run(folded)
    assert big.records[0].stats["kept"] == ["conv1", "fc"]


# ------------------------------------------------------------------------------ fine-tune
def test_codebook_gradient_is_the_sum_over_shared_weights(folded):
    g = slimfx.run_pipeline(folded, "share-weights{bits=3}")
    call = next(g.find(torch.ops.slimfx.codebook_weight.default, module_path="conv2"))
    idx, cb = g.param(call.args[0]), g.param(call.args[1])
    w = torch.ops.slimfx.codebook_weight.default(idx, cb, "load")
    grad_w = torch.randn_like(w)
    (grad_cb,) = torch.autograd.grad(w, cb, grad_w)
    want = torch.stack([grad_w[idx == k].sum() for k in range(8)])
    torch.testing.assert_close(grad_cb[0], want)


def test_finetune_codebooks_trains_centroids_only(folded):
    g = slimfx.run_pipeline(folded, "share-weights{bits=2}")
    idx_before = {k: v.clone() for k, v in g.gm.named_parameters() if v.dtype == torch.uint8}
    bias_before = g.param("conv1.bias").clone()
    tables = codebook_parameters(g)
    assert len(tables) == 3 and all(t.requires_grad for t in tables)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(8, 3, 8, 8, generator=gen)
    target = folded.gm(xs)[0].detach()  # distil the unshared graph into the codebooks
    losses = finetune_codebooks(g, [(xs, target)] * 30, torch.nn.functional.mse_loss, lr=0.01)
    assert losses[-1] < 0.7 * losses[0]
    after = dict(g.gm.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in idx_before.items())
    assert torch.equal(g.param("conv1.bias"), bias_before)
    assert all(p.requires_grad for p in g.gm.parameters() if p.is_floating_point())
    for w in shared_weights(g).values():
        assert len(torch.unique(w)) <= 4


# ------------------------------------------------------------------------------ lowering
@pytest.fixture(scope="module")
def mixed(folded):
    """Per-channel codebooks (conv1), hashing (conv2), product quantization (fc)."""
    return slimfx.run_pipeline(
        folded, "share-weights{bits=3,scope=channel,pq=4,exclude=[conv2]},"
                "hash-weights{buckets=64},dce")


@pytest.fixture(scope="module")
def compiled(mixed):
    return slimfx.compile(mixed, target="host")


def _gather_places(graph):
    from slimfx.lowering import cpu_schedules, host_target, to_relax

    mod = cpu_schedules.prepare(to_relax(graph).mod, host_target())
    main = mod["main"].script()
    return [op for op in ("codebook_weight", "hashed_weight", "pq_weight") if op in main]


def test_decode_at_load_or_in_the_program(mixed, compiled):
    assert compiled.manifest["transform_params"] == "main_transform_params"
    assert _gather_places(mixed) == []  # all three gathers lifted to load time
    prog = mixed.copy()
    assert set_decode(prog, "program") == 3
    assert _gather_places(prog) == ["codebook_weight", "hashed_weight", "pq_weight"]
    cm = slimfx.compile(prog, target="host")
    np.testing.assert_allclose(cm(X.numpy()), compiled(X.numpy()), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="decode must be 'load' or 'program'"):
        set_decode(prog, "lazy")


def _payloads(path: Path) -> dict[str, int]:
    """Bytes of each array in params.npz, without the .npy headers."""
    sizes = {}
    with zipfile.ZipFile(path / "params.npz") as z:
        for info in z.infolist():
            with z.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                assert major == 1
                np.lib.format.read_array_header_1_0(f)
                sizes[info.filename.removesuffix(".npy")] = info.file_size - f.tell()
    return sizes


@pytest.mark.parametrize("coding", ["bitpack", "huffman"])
def test_artifact_stores_packed_indices_and_reloads_exactly(mixed, compiled, coding, tmp_path):
    y = compiled(X.numpy())
    np.testing.assert_allclose(y, mixed(X).detach().numpy(), rtol=1e-5, atol=1e-5)
    path = Path(compiled.save(tmp_path / coding, index_coding=coding))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    report = {r.name: r for r in storage_report(mixed).rows}
    names = manifest["params"]
    coded = {names[int(i)]: e for i, e in manifest["param_coding"].items()}
    assert sorted(coded) == ["conv1.weight_indices", "fc.weight_pq_indices"]
    assert coded["conv1.weight_indices"]["bits"] == 3
    layout = manifest["param_layout"]
    for name, (_, nbytes, _, _) in zip(names, layout):
        r = report[name]
        assert nbytes == (r.huffman_bytes if coding == "huffman" else r.stored_bytes), name
    total = sum(r.huffman_bytes if coding == "huffman" else r.stored_bytes for r in report.values())
    assert _payloads(path) == {"blob": total}  # the file holds exactly the packed bytes
    assert (path / "params.npz").stat().st_size < total + 400  # + one npy and zip header
    assert total < storage_report(mixed).fp32_bytes / 3
    reloaded = load(path)
    assert np.array_equal(reloaded(X.numpy()), y)  # bit-exact
    assert np.array_equal(load(reloaded.save(tmp_path / "again"))(X.numpy()), y)


def test_huffman_is_smaller_on_skewed_indices():
    lin = torch.nn.Linear(512, 64)
    with torch.no_grad():  # trained weights are bell-shaped, not uniform like the init
        lin.weight.copy_(torch.randn(64, 512, generator=torch.Generator().manual_seed(0)))
    g = slimfx.run_pipeline(lin, "share-weights{bits=4,init=density}", torch.randn(1, 512))
    row = next(r for r in storage_report(g).rows if r.kind == "indices")
    # density init: equal-mass clusters give near-uniform indices; linear init skews them
    g2 = slimfx.run_pipeline(lin, "share-weights{bits=4,init=linear}", torch.randn(1, 512))
    row2 = next(r for r in storage_report(g2).rows if r.kind == "indices")
    assert row.stored_bytes == row2.stored_bytes == 512 * 64 // 2
    assert row2.huffman_bytes < 0.95 * row2.stored_bytes
    assert row.huffman_bytes <= row.stored_bytes


def test_corrupt_coding_is_named(compiled, tmp_path):
    path = Path(artifact.save(compiled, tmp_path / "a"))
    m = json.loads((path / "manifest.json").read_text())
    entry = next(iter(m["param_coding"].values()))
    entry["bits"] = 5
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="cannot decode parameter '.*weight.*indices' "
                                            r"\(bitpack\)"):
        load(path)
    with pytest.raises(ArtifactError, match="index_coding must be"):
        artifact.save(compiled, tmp_path / "b", index_coding="zip")
