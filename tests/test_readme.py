"""The README is true: its example runs, and CI runs its install and test commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", README, re.S)
    assert m, f"README has no python block after {marker}"
    return m.group(1)


def test_custom_pass_example_runs_and_is_short():
    code = _block_after("<!-- example: custom-pass -->")
    assert len(code.strip().splitlines()) <= 30
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md:custom-pass", "exec"), namespace)  # noqa: S102
    graph = namespace["graph"]
    import torch

    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(graph(x), namespace["model"].eval()(x), atol=1e-6, rtol=1e-6)


def test_ci_runs_the_readme_commands():
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert ci[-1] == test  # the test command is the last thing CI does
