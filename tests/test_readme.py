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


def test_readme_main_commands_resolve(capsys):
    """Every `jaxinterp` line of "Main commands" names the venv's executable (the first command does not
    activate it) and a real command whose arguments resolve to a config (`--list-config`, nothing run)."""
    import shlex

    from jaxinterp import cli

    text = README.read_text()
    block = text[text.index("## Main commands"):]
    block = block[block.index("```bash\n") + len("```bash\n"):block.index("```", block.index("```bash\n") + 7)]
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert all(line.startswith(".venv/bin/") for line in lines), lines
    experiments = [shlex.split(line)[1:] for line in lines if line.startswith(".venv/bin/jaxinterp")]
    assert len(experiments) >= 10
    for argv in experiments:
        if argv[:1] in (["models"], ["--help"]):
            assert cli.main(argv) == 0
        else:
            assert argv[:1] == [] or argv[0] in cli.COMMANDS, argv
            assert cli.main([*argv, "--list-config"]) == 0, (argv, capsys.readouterr().err)
