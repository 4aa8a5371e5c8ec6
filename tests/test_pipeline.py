"""The textual pipeline and typed options: same schema as the Python API, clear errors."""

from dataclasses import dataclass
from typing import Literal

import pytest

from slimfx.errors import PipelineError
from slimfx.passes import Pass, get_pass, parse_pipeline, register_pass
from slimfx.passes.pipeline import split_items


@dataclass(frozen=True)
class DemoOptions:
    ratio: float = 0.5
    steps: int = 1
    criterion: Literal["l1", "l2", "random"] = "l1"
    exclude: tuple[str, ...] = ()
    verbose: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")


@register_pass("demo-options", replace=True)
class DemoPass(Pass):
    Options = DemoOptions

    def run(self, graph):
        return False


def test_parse_with_all_value_kinds():
    (p,) = parse_pipeline(
        "demo-options{ratio=0.25, steps=3,criterion=l2,exclude=[layer1.0.conv1,fc],verbose=yes,seed=7}")
    assert isinstance(p, DemoPass)
    assert p.options == DemoOptions(0.25, 3, "l2", ("layer1.0.conv1", "fc"), True, 7)


def test_text_and_python_api_give_the_same_options():
    (p,) = parse_pipeline("demo-options{ratio=0.3,criterion=random}")
    q = DemoPass(ratio=0.3, criterion="random")
    assert p.options == q.options
    assert repr(p) == repr(q)
    assert parse_pipeline(repr(q))[0].options == q.options  # repr round-trips


def test_several_passes_and_whitespace():
    names = [p.name for p in parse_pipeline(" fold-bn , dce,demo-options{steps=2} ,const-fold")]
    assert names == ["fold-bn", "dce", "demo-options", "const-fold"]


@pytest.mark.parametrize("text, message", [
    ("fold-bm", r"unknown pass 'fold-bm'; did you mean 'fold-bn'"),
    ("demo-options{ration=0.5}", r"has no option 'ration'; did you mean 'ratio'"),
    ("demo-options{ratio=half}", r"option 'ratio': expected float, got 'half'"),
    ("demo-options{steps=1.5}", r"option 'steps': expected int, got '1.5'"),
    ("demo-options{criterion=l3}", r"option 'criterion': 'l3' is not one of 'l1', 'l2', 'random'"),
    ("demo-options{verbose=maybe}", r"option 'verbose': expected true or false"),
    ("demo-options{ratio=1.5}", r"ratio must be in \(0, 1\), got 1.5"),
    ("demo-options{ratio}", r"option 'ratio' needs a value \(key=value\) at column 14"),
    ("demo-options{ratio=0.1,ratio=0.2}", r"option 'ratio' given twice"),
    ("demo-options{ratio=0.1", r"unclosed '\{' at column 13"),
    ("dce}", r"unmatched '\}'"),
    ("dce,,fold-bn", r"empty pass name at column 5"),
    ("dce fold-bn", r"expected ',' between passes"),
    ("", r"names no pass"),
])
def test_errors_name_the_problem(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_python_api_errors_match():
    with pytest.raises(PipelineError, match="has no option 'ration'"):
        DemoPass(ration=0.5)
    with pytest.raises(PipelineError, match="option 'steps': expected int, got 'x'"):
        DemoPass(steps="x")
    with pytest.raises(PipelineError, match="takes DemoOptions options"):
        DemoPass(options=object())


def test_bracketed_list_commas_do_not_split_options():
    assert split_items("a{x=[1,2],y=3},b") == [("a", {"x": "[1,2]", "y": "3"}), ("b", {})]


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(PipelineError, match="already registered"):
        register_pass("dce")(lambda g: False)
    with pytest.raises(PipelineError, match="invalid pass name"):
        register_pass("bad name")(lambda g: False)
    assert get_pass("dce").lossless
