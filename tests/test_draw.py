"""Tests of slimfx.ir.draw: DOT text and the self-laid-out SVG."""

from __future__ import annotations

import doctest
import re
import xml.etree.ElementTree as ET

import pytest
import torch

import slimfx
from slimfx.ir import draw
from slimfx.ir.draw import save, to_dot, to_svg

SVG = "{http://www.w3.org/2000/svg}"
SHAPE = "f32[1,4,8,8]"


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + x


class Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + skip)


class SmallResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def residual():
    return slimfx.capture(Residual(), (torch.randn(1, 4, 8, 8),))


@pytest.fixture(scope="module")
def resnet():
    return slimfx.capture(SmallResNet(), (torch.randn(1, 3, 16, 16),))


def drawn_nodes(graph, collapse_params=True):
    return [n.name for n in graph.fx.nodes if not (collapse_params and n.op == "get_attr")]


def data_edges(graph, collapse_params=True):
    drawn = set(drawn_nodes(graph, collapse_params))
    return {(a.name, n.name) for n in graph.fx.nodes if n.name in drawn
            for a in n.all_input_nodes if a.name in drawn}


# ------------------------------------------------------------------ a tiny DOT reader
QUOTED = r'"(?:[^"\\]|\\.)*"'
VALUE = rf"(?:{QUOTED}|[\w.#]+)"
ATTRS = rf"\w+={VALUE}(?:,\s*\w+={VALUE})*"
NODE_RE = re.compile(rf"^\s*({QUOTED})\s*\[({ATTRS})\];$")
EDGE_RE = re.compile(rf"^\s*({QUOTED})\s*->\s*({QUOTED})\s*\[({ATTRS})\];$")
DEFAULTS_RE = re.compile(rf"^\s*(graph|node|edge)\s*\[({ATTRS})\];$")


def unquote(q: str) -> str:
    """The text of a DOT quoted string, with Graphviz's label escapes expanded."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), q[1:-1])


def attrs(text: str) -> dict[str, str]:
    pairs = re.findall(rf"(\w+)=({VALUE})", text)
    return {k: unquote(v) if v.startswith('"') else v for k, v in pairs}


def parse_dot(text: str):
    """(graph id, defaults, nodes {name: attrs}, edges [(src, dst, attrs)]); every line
    must be a statement of the expected form."""
    lines = text.strip().splitlines()
    head = re.match(rf"^digraph ({QUOTED}) \{{$", lines[0])
    assert head, lines[0]
    assert lines[-1] == "}"
    defaults, nodes, edges = {}, {}, []
    for line in lines[1:-1]:
        if m := EDGE_RE.match(line):
            edges.append((unquote(m[1]), unquote(m[2]), attrs(m[3])))
        elif m := NODE_RE.match(line):
            name = unquote(m[1])
            assert name not in nodes, f"node {name} declared twice"
            nodes[name] = attrs(m[2])
        elif m := DEFAULTS_RE.match(line):
            defaults[m[1]] = attrs(m[2])
        else:
            raise AssertionError(f"not a DOT statement: {line!r}")
    return unquote(head[1]), defaults, nodes, edges


def luminance(colour: str) -> float:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


# ------------------------------------------------------------------ DOT
def test_dot_one_statement_per_node_and_dependency(residual):
    name, defaults, nodes, edges = parse_dot(to_dot(residual))
    assert name == "Residual"
    assert list(nodes) == drawn_nodes(residual)
    assert list(nodes) == ["x", "convolution", "batch_norm", "relu", "add", "output"]
    pairs = [(s, d) for s, d, _ in edges]
    assert len(pairs) == len(set(pairs)) == 6
    assert set(pairs) == data_edges(residual) == {
        ("x", "convolution"), ("convolution", "batch_norm"), ("batch_norm", "relu"),
        ("relu", "add"), ("x", "add"), ("add", "output")}
    assert all(a["label"] == SHAPE for _, _, a in edges)


def test_dot_labels(residual):
    _, _, nodes, _ = parse_dot(to_dot(residual))
    conv = nodes["convolution"]["label"].split("\n")
    assert conv[:3] == ["aten.convolution", "conv", SHAPE]
    assert "weight f32[4,4,3,3]" in conv and "bias f32[4]" in conv
    assert any(line.endswith("MACs (100.0%)") for line in conv)  # the only op with MACs
    bn = nodes["batch_norm"]["label"].split("\n")
    assert bn[:3] == ["aten.batch_norm", "bn", SHAPE]
    assert {"running_mean f32[4]", "running_var f32[4]"} <= set(bn)
    assert nodes["add"]["label"].split("\n") == ["aten.add.Tensor", SHAPE]
    assert nodes["x"]["label"] == f"x\n{SHAPE}" and nodes["x"]["shape"] == "ellipse"
    assert nodes["output"]["label"] == f"output\n{SHAPE}"
    assert not any("MACs" in nodes[n]["label"] for n in ("batch_norm", "relu", "add"))
    # Colour: only the op with MACs is filled.
    assert nodes["convolution"]["fillcolor"] != "#ffffff"
    assert nodes["relu"]["fillcolor"] == nodes["add"]["fillcolor"] == "#ffffff"


def test_dot_uncollapsed_params(residual):
    _, _, nodes, edges = parse_dot(to_dot(residual, collapse_params=False))
    assert list(nodes) == drawn_nodes(residual, False)
    assert len(nodes) == len(residual.nodes) == 12
    assert {(s, d) for s, d, _ in edges} == data_edges(residual, False)
    assert len(edges) == 12  # 6 activations + 6 parameters
    assert nodes["conv_weight"]["label"] == "conv.weight\nf32[4,4,3,3]"
    assert ("conv_weight", "convolution") in {(s, d) for s, d, _ in edges}
    assert not any("weight" in line for line in nodes["convolution"]["label"].split("\n"))


def test_dot_mac_colours_darken_with_macs():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 16, 3))
    g = slimfx.capture(m, (torch.randn(1, 3, 16, 16),))
    _, _, nodes, _ = parse_dot(to_dot(g))
    small, big = (n for n in nodes if n.startswith("convolution"))
    assert g.info(next(g.find(module_path="1"))).macs > g.info(next(g.find(module_path="0"))).macs
    assert luminance(nodes[big]["fillcolor"]) < luminance(nodes[small]["fillcolor"]) < 255


def test_dot_title_and_escaping():
    g = slimfx.capture(Residual(), (torch.randn(1, 4, 8, 8),))
    weird = 'a"b\\c<d>{e}|f&g \\n'
    next(g.find(module_path="relu")).meta["module_path"] = weird
    g.analyze(force=True)
    text = to_dot(g, title=weird)
    _, defaults, nodes, edges = parse_dot(text)  # every line still parses
    assert defaults["graph"]["label"] == weird
    assert nodes["relu"]["label"].split("\n") == ["aten.relu", weird, SHAPE]
    assert len(nodes) == 6 and len(edges) == 6


def test_multi_output_edges_are_labelled_with_the_element():
    class Halves(torch.nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, 1)
            return a * b

    g = slimfx.capture(Halves(), (torch.randn(2, 6),))
    _, _, nodes, edges = parse_dot(to_dot(g))
    split = next(n for n in nodes if n.startswith("split"))
    assert "f32[2,3] (\u00d72)" in nodes[split]["label"].split("\n")
    assert {a["label"] for s, _, a in edges if s == split} == {"f32[2,3]"}


# ------------------------------------------------------------------ SVG
def parse_svg(text: str):
    """(width, height, nodes {name: (x, y, w, h)}, edges {(src, dst): [(x, y), ...]},
    texts {name: [...]}) in absolute coordinates."""
    root = ET.fromstring(text)
    assert root.tag == SVG + "svg"
    width, height = float(root.get("width")), float(root.get("height"))
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    nodes, edges, texts = {}, {}, {}

    def walk(el, dx, dy):
        if t := el.get("transform"):
            m = re.fullmatch(r"translate\(([-\d.]+),([-\d.]+)\)", t)
            assert m, t
            dx, dy = dx + float(m[1]), dy + float(m[2])
        cls = el.get("class")
        if cls == "node":
            name = el.get("id").removeprefix("node-")
            rects = el.findall(SVG + "rect")
            assert len(rects) == 1, name
            r = rects[0]
            nodes[name] = (float(r.get("x")) + dx, float(r.get("y")) + dy,
                           float(r.get("width")), float(r.get("height")))
            texts[name] = [t.text for t in el.findall(SVG + "text")]
        elif cls == "edge":
            src, dst = el.get("id").removeprefix("edge-").split("-")
            paths = el.findall(SVG + "path")
            assert len(paths) == 1 and paths[0].get("marker-end") == "url(#arrow)"
            pts = re.findall(r"([-\d.]+),([-\d.]+)", paths[0].get("d"))
            assert (src, dst) not in edges
            edges[(src, dst)] = [(float(x) + dx, float(y) + dy) for x, y in pts]
        for child in el:
            walk(child, dx, dy)

    walk(root, 0.0, 0.0)
    return width, height, nodes, edges, texts


def overlap(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def crosses(p, q, box, shrink=1.0) -> bool:
    """Does segment p-q pass through the interior of ``box`` (Liang-Barsky clipping)?"""
    x0, y0 = box[0] + shrink, box[1] + shrink
    x1, y1 = box[0] + box[2] - shrink, box[1] + box[3] - shrink
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for d, lo, hi, start in ((dx, x0, x1, p[0]), (dy, y0, y1, p[1])):
        if abs(d) < 1e-12:
            if not lo < start < hi:
                return False
            continue
        a, b = (lo - start) / d, (hi - start) / d
        t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
        if t0 >= t1:
            return False
    return True


def check_layout(graph, text, collapse_params=True):
    width, height, nodes, edges, texts = parse_svg(text)
    assert list(nodes) == drawn_nodes(graph, collapse_params)
    assert set(edges) == data_edges(graph, collapse_params)
    for name, (x, y, w, h) in nodes.items():
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height, name
        assert w > 0 and h > 0
    boxes = list(nodes.items())
    for i, (a, ra) in enumerate(boxes):
        for b, rb in boxes[i + 1:]:
            assert not overlap(ra, rb), f"{a} and {b} overlap"
    for (src, dst), pts in edges.items():
        sx, sy, sw, sh = nodes[src]
        tx, ty, tw, _ = nodes[dst]
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        assert sx < x0 < sx + sw and y0 == pytest.approx(sy + sh), f"{src}->{dst} start"
        assert tx < x1 < tx + tw and y1 == pytest.approx(ty), f"{src}->{dst} end"
        assert all(b[1] >= a[1] for a, b in zip(pts, pts[1:])), "edges run downwards"
        for p, q in zip(pts, pts[1:]):
            for name, box in nodes.items():
                assert not crosses(p, q, box), f"edge {src}->{dst} runs through {name}"
    return width, height, nodes, edges, texts


def test_svg_residual(residual):
    text = to_svg(residual)
    _, _, nodes, edges, texts = check_layout(residual, text)
    assert len(nodes) == 6 and len(edges) == 6
    assert texts["convolution"][:3] == ["aten.convolution", "conv", SHAPE]
    assert "weight f32[4,4,3,3]" in texts["convolution"]
    assert texts["add"] == ["aten.add.Tensor", SHAPE]
    # Layered top to bottom in data-flow order.
    ys = [nodes[n][1] for n in ("x", "convolution", "batch_norm", "relu", "add", "output")]
    assert ys == sorted(ys) and len(set(ys)) == len(ys)
    # Box width follows the label length.
    assert nodes["convolution"][2] > nodes["add"][2] > nodes["x"][2] - 30


def test_svg_uncollapsed_params(residual):
    _, _, nodes, edges, _ = check_layout(residual, to_svg(residual, collapse_params=False),
                                         collapse_params=False)
    assert len(nodes) == 12 and len(edges) == 12
    # Parameters sit in the row just above their consumer, not all in the top row.
    assert nodes["x"][1] < nodes["bn_weight"][1] == nodes["convolution"][1]
    assert nodes["bn_weight"][1] < nodes["batch_norm"][1]


def test_svg_bigger_graph(resnet):
    for collapse in (True, False):
        text = to_svg(resnet, collapse_params=collapse, title="SmallResNet & <friends>")
        width, height, nodes, edges, _ = check_layout(resnet, text, collapse)
        assert len(nodes) >= (29 if collapse else 60)
        # Readable: the text is never squeezed below its natural size.
        assert width < 40 * len(nodes) and height < 200 * len(nodes)
    root = ET.fromstring(text)
    assert root.find(SVG + "title").text == "SmallResNet & <friends>"


def test_svg_escaping():
    g = slimfx.capture(Residual(), (torch.randn(1, 4, 8, 8),))
    weird = 'a"b\\c<d>{e}&f\'g'
    next(g.find(module_path="relu")).meta["module_path"] = weird
    g.analyze(force=True)
    text = to_svg(g, title=weird)
    _, _, nodes, edges, texts = check_layout(g, text)
    assert texts["relu"] == ["aten.relu", weird, SHAPE]
    assert ET.fromstring(text).find(SVG + "title").text == weird


def test_svg_long_labels_are_shortened_not_clipped():
    g = slimfx.capture(Residual(), (torch.randn(1, 4, 8, 8),))
    long = "encoder.layers." + ".".join(["block"] * 20)
    next(g.find(module_path="relu")).meta["module_path"] = long
    g.analyze(force=True)
    _, _, nodes, _, texts = check_layout(g, to_svg(g))
    shown = texts["relu"][1]
    assert shown.startswith("\u2026") and long.endswith(shown[1:]) and len(shown) < len(long)
    assert nodes["relu"][2] < 400


# ------------------------------------------------------------------ save, doctest
def test_save(residual, tmp_path):
    dot = save(residual, tmp_path / "g.dot", title="t")
    svg = save(residual, str(tmp_path / "g.svg"), collapse_params=False)
    assert dot.read_text() == to_dot(residual, title="t")
    assert svg.read_text() == to_svg(residual, collapse_params=False)
    parse_svg(svg.read_text())
    with pytest.raises(ValueError, match=r"'\.png'.*\.dot, \.svg"):
        save(residual, tmp_path / "g.png")
    with pytest.raises(ValueError, match="no suffix"):
        save(residual, tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.dot", "g.svg"]


def test_docstring_examples_run():
    result = doctest.testmod(draw)
    assert result.attempted >= 5 and result.failed == 0
