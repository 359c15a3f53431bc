"""The experiment harness (experiments/common.py): typed --set parsing against the field types, the
run protocol (config.json, results.json, `wrote` line, default --out), and, in subprocesses, the
command line of every experiment main: --help / --list-config exit 0, user errors exit 2 in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Optional

import pytest

from jaxinterp.experiments.common import UsageError, apply_overrides, experiment_main, parse_value, setting_keys


# ----------------------------------------------------------------------------- typed values


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("yes", True), ("True", True),
                                        ("false", False), ("0", False), ("no", False), ("FALSE", False)])
def test_bools_follow_the_text_not_truthiness(text, value):
    assert parse_value(text, bool, "flag") is value


def test_scalars_lists_and_optionals():
    assert parse_value("3e-4", float) == 3e-4 and parse_value("12", int) == 12 and parse_value("x y", str) == "x y"
    assert parse_value("1,2,3", tuple[int, ...]) == (1, 2, 3)
    assert parse_value("[1, 2]", tuple[int, ...]) == (1, 2)  # the older list syntax
    assert parse_value("", tuple[str, ...]) == () and parse_value("relu,topk", tuple[str, ...]) == ("relu", "topk")
    assert parse_value("0.2,0.6", tuple[float, ...]) == (0.2, 0.6)
    assert parse_value("[1,5]", tuple[int, int]) == (1, 5) and parse_value("1,5", list[int]) == [1, 5]
    assert parse_value("none", Optional[int]) is None and parse_value("7", Optional[int]) == 7
    assert parse_value("None", int | None) is None and parse_value("2,3", Optional[tuple[int, ...]]) == (2, 3)
    assert parse_value("none", str) == "none"  # only Optional fields read `none` as None
    assert parse_value("8", Any) == 8 and parse_value("1e-5", Any) == 1e-5 and parse_value("gelu", Any) == "gelu"


@pytest.mark.parametrize("text,tp,expected", [
    ("abc", int, "expected int, got 'abc'"), ("1.5", int, "expected int"), ("maybe", bool, "expected bool"),
    ("x", float, "expected float"), ("1,x", tuple[int, ...], "expected list of int"),
    ("1", tuple[int, int], "expected 2 comma-separated values"), ("x", Optional[int], "expected int or none"),
])
def test_wrong_types_name_key_type_and_value(text, tp, expected):
    with pytest.raises(UsageError, match=expected) as err:
        parse_value(text, tp, "some.key")
    assert f"some.key={text}" in str(err.value)


# ----------------------------------------------------------------------------- dotted overrides


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 1e-3
    warmup: int = 10
    nesterov: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy:
    model: str = "facts-gpt"
    steps: int = 100
    layers: Optional[tuple[int, ...]] = None
    flag: bool = True
    optim: Optim = Optim()
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.optim.warmup >= self.steps:
            raise ValueError(f"optim.warmup ({self.optim.warmup}) must be < steps ({self.steps})")


def test_dotted_keys_mappings_and_one_validation_for_all_overrides():
    cfg = apply_overrides(Toy(), ["optim.lr=3e-4", "optim.nesterov=false", "flag=0", "layers=1,2", "args.d_model=64",
                                  "args.act=gelu"])
    assert cfg == Toy(optim=Optim(lr=3e-4, nesterov=False), flag=False, layers=(1, 2),
                      args={"d_model": 64, "act": "gelu"})
    # warmup 50 is only valid together with steps 200: validation sees the finished config, in any order
    assert apply_overrides(Toy(), ["optim.warmup=50", "steps=200"]).optim.warmup == 50
    with pytest.raises(ValueError, match=r"optim.warmup \(50\) must be < steps \(20\)"):
        apply_overrides(Toy(), ["optim.warmup=50", "steps=20"])
    assert apply_overrides(Toy(), ["steps=5", "steps=300"]).steps == 300  # later wins
    assert setting_keys(Toy()) == ["model", "steps", "layers", "flag", "optim.lr", "optim.warmup", "optim.nesterov",
                                   "args.*"]


def test_override_errors():
    with pytest.raises(UsageError, match=r"unknown key 'stepz' \(did you mean steps\?\); valid keys: model, steps"):
        apply_overrides(Toy(), ["stepz=3"])
    with pytest.raises(UsageError, match=r"unknown key .optim.l. \(did you mean optim.lr"):
        apply_overrides(Toy(), ["optim.l=3"])
    with pytest.raises(UsageError, match="optim is a section; set its fields"):
        apply_overrides(Toy(), ["optim=3"])
    with pytest.raises(UsageError, match="'steps' is a value, not a section"):
        apply_overrides(Toy(), ["steps.x=3"])
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        apply_overrides(Toy(), ["steps"])


def test_real_configs_take_typed_overrides():
    """The bug the harness removes: `--set flag=false` turned a flag on (type(default)("false") is True)."""
    from jaxinterp.experiments.causal_trace.config import TraceExperimentConfig
    from jaxinterp.experiments.elm_erase.config import ExperimentConfig
    from jaxinterp.experiments.train_lm.config import get_config

    assert apply_overrides(TraceExperimentConfig(), ["known_only=false"]).known_only is False
    cfg = apply_overrides(ExperimentConfig(), ["elm.retain_soft=false", "lora.layers=0,1", "methods=", "rmu_layer=2"])
    assert cfg.elm.retain_soft is False and cfg.lora.layers == (0, 1) and cfg.methods == () and cfg.rmu_layer == 2
    lm = get_config("facts-mamba", ["data.world.train_passage_sentences=[1,1]", "model.args.d_model=64",
                                    "train.init_from=none", "optim.lr=1e-2"])
    assert lm.data.world.train_passage_sentences == (1, 1) and lm.model.args["d_model"] == 64
    assert lm.train.init_from is None and lm.optim.lr == 1e-2 and lm.model.args["n_layers"] == 2


# ----------------------------------------------------------------------------- the run protocol


def _toy_main(argv, tmp_path, fn=None):
    def run(cfg, out, *, note):
        (out / "plot.png").write_bytes(note.encode())
        return fn(cfg) if fn else {"steps": cfg.steps, "lr": cfg.optim.lr, "note": note}

    def own_flags(parser):  # the experiment's own flags reach run() by name
        parser.add_argument("--note", default="png")

    presets = {"base": Toy, "short": lambda: Toy(steps=20)}
    return experiment_main("toy", presets, run, add_arguments=own_flags)(argv, prog="toy")


def test_run_writes_config_and_results_and_ends_with_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _toy_main(["--preset", "short", "--set", "optim.lr=0.5", "--set", "flag=no", "layers=3"], tmp_path) == 0
    out = tmp_path / "results" / "toy" / "short"  # results/<experiment>/<preset>/
    assert json.loads((out / "results.json").read_text()) == {"steps": 20, "lr": 0.5, "note": "png"}
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(
        Toy(steps=20, optim=Optim(lr=0.5), flag=False, layers=(3,)))))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out / 'results.json'}, {out / 'config.json'}, {out / 'plot.png'}".replace(
        str(tmp_path) + "/", "")
    # another model than the preset's gets its own default directory; --model = --set model=
    assert _toy_main(["--model", "othello-gpt"], tmp_path) == 0
    assert json.loads((tmp_path / "results/toy/base-othello-gpt/config.json").read_text())["model"] == "othello-gpt"


def test_list_config_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _toy_main(["--list-config", "--set", "optim.warmup=3"], tmp_path) == 0
    assert json.loads(capsys.readouterr().out)["optim"] == {"lr": 1e-3, "warmup": 3, "nesterov": True}
    assert not (tmp_path / "results").exists()


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def broken(cfg):
        raise FileNotFoundError("no such file: data.bin")

    assert _toy_main(["--set", "steps=5"], tmp_path) == 2  # __post_init__: warmup 10 >= 5
    assert capsys.readouterr().err == "toy: error: optim.warmup (10) must be < steps (5)\n"
    assert _toy_main([], tmp_path, broken) == 2
    assert capsys.readouterr().err == "toy: error: no such file: data.bin (--debug shows the traceback)\n"
    assert _toy_main(["--debug"], tmp_path, broken) == 2
    assert "Traceback" in capsys.readouterr().err
    assert _toy_main(["--preset", "nope"], tmp_path) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ZeroDivisionError):  # a bug is not a usage error: it keeps its traceback
        _toy_main([], tmp_path, lambda cfg: 1 / 0)


# ----------------------------------------------------------------------------- every experiment main, as a user runs it

MAINS = {  # module -> an int-typed key of its config
    "jaxinterp.experiments.causal_trace.main": "n_facts",
    "jaxinterp.experiments.train_lm.evaluate": "n_passages",
    "jaxinterp.experiments.rome.main": "n_edits",
    "jaxinterp.experiments.rome.frames": "layer",
    "jaxinterp.experiments.sae_boardgame.main": "steps",
    "jaxinterp.experiments.sae_boardgame.diagnose": "steps",
    "jaxinterp.experiments.sae_boardgame.ceiling": "n_train_games",
    "jaxinterp.experiments.elm_erase.main": "lora.rank",
    "jaxinterp.experiments.train_lm.main": "train.steps",
    "jaxinterp.experiments.train_othello.main": "steps",
    "jaxinterp.experiments.sae_dashboard.main": "steps",
    "jaxinterp.experiments.steering.main": "free_tokens",
    "jaxinterp.experiments.circuits.main": "n_train",
    "jaxinterp.experiments.train_saes.main": "steps",
    "jaxinterp.experiments.lens.main": "rows",
    "jaxinterp.experiments.lre.main": "n",
    "jaxinterp.experiments.token_erasure.main": "steps",
    "jaxinterp.experiments.extractive_qa.main": "n_eval",
    "jaxinterp.experiments.das.main": "steps",
    "jaxinterp.experiments.behaviours.main": "n_contexts",
    "jaxinterp.experiments.shift.main": "top",
}


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    out = []
    for cmd, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def test_every_experiment_main_is_listed():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments"
    mains = {f"jaxinterp.experiments.{p.parent.name}.main" for p in root.glob("*/main.py")}
    assert mains <= set(MAINS)


@pytest.mark.parametrize("module", list(MAINS))
def test_experiment_command_line(module, tmp_path):
    import importlib

    key = MAINS[module]
    py = [sys.executable, "-m", module]
    help_, listed, unknown, wrong, bad_out = _run_all([
        py + ["--help"], py + ["--list-config"], py + ["--set", "no_such_key=1"], py + ["--set", f"{key}=abc"],
        py + ["--out", "/proc/x"]])
    assert help_.returncode == 0 and "--set KEY=VALUE" in help_.stdout and "--list-config" in help_.stdout
    assert listed.returncode == 0, listed.stderr
    default = next(iter(importlib.import_module(module).PRESETS.values()))()  # the printed config is the default
    assert json.loads(listed.stdout) == json.loads(json.dumps(dataclasses.asdict(default), default=str))
    for proc, words in ((unknown, ("unknown key 'no_such_key'", "valid keys")), (wrong, (f"{key}=abc", "expected int")),
                        (bad_out, ("cannot write to --out /proc/x",))):
        assert proc.returncode == 2, (proc.args, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        for w in words:
            assert w in proc.stderr, (w, proc.stderr)


def test_jaxinterp_command(tmp_path):
    cli = [sys.executable, "-m", "jaxinterp.cli"]
    help_, bad_model, hub, unknown = _run_all([cli + ["--help"], cli + ["trace", "--model", "no-such-model"],
                                              cli + ["trace", "--model", "someorg/somemodel"], cli + ["trcae"]])
    assert help_.returncode == 0
    names = [line.split()[0] for line in help_.stdout.splitlines() if line.startswith("  ")]
    assert names == ["trace", "recall", "rome", "sae-boardgame", "sae-dashboard", "train-saes", "circuits", "behaviours", "shift", "steer",
                     "extractive-qa", "lens", "lre", "token-erasure", "das", "elm-erase", "train-lm", "train-othello",
                     "serve", "models"]
    for proc in (bad_model, hub, unknown):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown model 'no-such-model'" in bad_model.stderr and "network" not in bad_model.stderr
    assert "facts-gpt" in bad_model.stderr
    assert "hub ids need a network" in hub.stderr  # only a name that looks like a hub id mentions it
    assert "did you mean trace?" in unknown.stderr
