"""The README's Python example runs as written on the embedded model."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    import jaxinterp as ji

    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start:text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["grads"]["blocks.0.resid_pre"].shape == namespace["acts"]["blocks.0.resid_pre"].shape
