"""train_lm: config overrides, kill-and-resume bit-identity, data parallelism, HF export parity,
and the shipped facts-world models' accuracy targets."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.train_lm.config import get_config
from jaxinterp.experiments.train_lm.evaluate import evaluate_world
from jaxinterp.experiments.train_lm.config import TrainConfig
from jaxinterp.experiments.train_lm.data import answer_weights
from jaxinterp.experiments.train_lm.main import build_model, decay_mask, export, lm_loss, main, make_optimizer, train
from jaxinterp.hf import read_safetensors


def test_overrides():
    cfg = get_config("facts-gpt", ["train.steps=700", "model.args.d_model=64", "optim.lr=1e-3",
                                   "data.world.entities_per_domain=5"])
    assert cfg.train.steps == 700 and cfg.model.args["d_model"] == 64 and cfg.optim.lr == 1e-3
    assert cfg.data.world.entities_per_domain == 5 and cfg.model.args["n_layers"] == 4
    with pytest.raises(ValueError, match=r"unknown key 'train.stepz' \(did you mean train.steps"):
        get_config("facts-gpt", ["train.stepz=1"])
    with pytest.raises(ValueError, match="presets"):
        get_config("nope")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        get_config("tiny", ["train.steps"])
    with pytest.raises(ValueError, match="steps"):
        get_config("tiny", ["train.steps=0"])


def test_warmup_longer_than_run_is_a_clear_error():
    # used to crash inside optax ("cosine_decay_schedule requires positive decay_steps")
    with pytest.raises(ValueError, match=r"optim.warmup_steps \(100\) must be smaller than train.steps \(30\)"):
        get_config("facts-gpt", ["train.steps=30"])
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(dataclasses.replace(get_config("tiny"), train=TrainConfig(steps=5)))
    cfg = get_config("facts-mamba", ["train.steps=30", "optim.warmup_steps=3"])  # order of overrides is free
    lr = make_optimizer(cfg).init({"w": np.zeros((2, 2), np.float32)})
    assert cfg.optim.warmup_steps == 3 and lr is not None


def _leaf_names(tree, keep):
    return sorted(jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(tree) if keep(v))


def test_weight_decay_mask_excludes_ssm_params_norms_and_biases():
    """Mamba: no decay on A_log, D, biases and norm scales (as reference Mamba); GPT: exactly the
    matrices, i.e. the plain ndim >= 2 mask it always had."""
    world = FactsWorld(get_config("tiny").data.world)
    for name in ("tiny", "tiny-mamba"):
        params = build_model(get_config(name), world, jax.random.PRNGKey(0)).params
        mask = decay_mask(params)
        decayed = _leaf_names(mask, lambda m: m)
        # per-layer matrices: parameters under 'layers' carry a leading layer axis
        layer_ndim = {jax.tree_util.keystr(path): v.ndim - (getattr(path[0], "key", None) == "layers")
                      for path, v in jax.tree_util.tree_leaves_with_path(params)}
        matrices = sorted(k for k, n in layer_ndim.items() if n >= 2)
        if name == "tiny":
            assert decayed == matrices
        else:
            ssm = {f"['layers']['mixer']['{n}']" for n in ("A_log", "D")}
            assert set(matrices) - set(decayed) == {k for k in ssm if "A_log" in k}
            assert not set(decayed) & ssm and all("bias" not in k and "scale" not in k for k in decayed)
            assert "['layers']['mixer']['conv1d']['kernel']" in decayed
    # the optimizer applies it: AdamW steps with zero gradients (pure weight decay) move only decayed leaves
    cfg = get_config("tiny-mamba")
    params = build_model(cfg, world, jax.random.PRNGKey(0)).params
    opt = make_optimizer(cfg)
    state, zeros = opt.init(params), jax.tree_util.tree_map(np.zeros_like, params)
    update = jax.jit(opt.update)
    for _ in range(cfg.optim.warmup_steps + 1):  # lr is 0 at step 0 of the warmup
        updates, state = update(zeros, state, params)
    moved = _leaf_names(updates, lambda u: bool(np.any(np.asarray(u) != 0)))
    assert moved == _leaf_names(decay_mask(params), lambda m: m)


def _cmd(out, steps=16, extra=()):
    return [sys.executable, "-m", "jaxinterp.experiments.train_lm.main", "--config", "tiny", "--out", str(out),
            "--no-progress", "--eval-prompts", "8", "--set", f"train.steps={steps}", "--set", "train.save_every=4",
            *extra]


def _env(devices=1):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def _params(out):
    return read_safetensors(Path(out) / "export" / "model.safetensors")


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_and_data_parallel_agrees(tmp_path):
    full = subprocess.Popen(_cmd(tmp_path / "full"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sharded = subprocess.Popen(_cmd(tmp_path / "dp8"), env=_env(8), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cmd(tmp_path / "killed"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    for line in victim.stdout:
        if line.startswith("saved checkpoint step 8"):
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "export").exists()  # it really died mid-run
    resumed = subprocess.run(_cmd(tmp_path / "killed"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    for proc in (full, sharded):
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
    ref, got, dp = _params(tmp_path / "full"), _params(tmp_path / "killed"), _params(tmp_path / "dp8")
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
        np.testing.assert_allclose(np.asarray(dp[k]), np.asarray(ref[k]), atol=2e-4, err_msg=k)
    assert any(not np.array_equal(ref[k], _init_params()[k]) for k in ref)  # training moved the weights


def _init_params():
    cfg = get_config("tiny")
    model = build_model(cfg, FactsWorld(cfg.data.world), jax.random.PRNGKey(cfg.train.seed))
    fam = ji.get_family(model.family)
    return fam.to_hf(model.config, model.params)


@pytest.mark.parametrize("preset,hf_cls", [("tiny", "GPT2LMHeadModel"), ("tiny-mamba", "MambaForCausalLM")])
def test_export_loads_in_transformers_with_same_logits(tmp_path, preset, hf_cls):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = get_config(preset)
    world = FactsWorld(cfg.data.world)
    model = build_model(cfg, world, jax.random.PRNGKey(3))
    export(model, world, tmp_path)
    ours = ji.load(tmp_path)
    hf = getattr(transformers, hf_cls).from_pretrained(tmp_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = world.context_passages(1, seed=0)[0].text
    ids = [world.bos_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(world.context_passages(1, seed=0)[0].ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.run(np.array([ids])).logits), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.run(np.array([ids])).logits), ref, atol=1e-4)
    assert FactsWorld.from_dir(tmp_path).entities == world.entities


def test_answer_weights_mark_passage_answers_and_weight_the_loss():
    world = FactsWorld(get_config("tiny").data.world)
    period = world.encode(".")[0]
    passages = world.context_passages(6, seed=3)
    width = max(len(p.ids) for p in passages) + 4
    tokens = np.full((len(passages), width), world.pad_id, np.int32)
    for i, p in enumerate(passages):
        tokens[i, :len(p.ids) + 2] = [*p.ids, p.answer_id, period]
    w = answer_weights(world, tokens, 7.0)
    expected = np.ones_like(w)
    for i, p in enumerate(passages):
        expected[i, len(p.ids) - 1] = 7.0  # the target after the question's last token is the answer
        assert tokens[i, len(p.ids)] == p.answer_id
    np.testing.assert_array_equal(w, expected)
    doc = [world.bos_id, *world.encode(world.domain_documents("cuisine", 1)[0])]  # no questions: all weight 1
    assert (answer_weights(world, np.array([doc]), 7.0) == 1).all()

    cfg = get_config("tiny")
    model = build_model(cfg, world, jax.random.PRNGKey(0))
    logits = np.asarray(model.run(tokens[:, :-1]).logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lm_loss(model.params, model, tokens, w), (ce * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(lm_loss(model.params, model, tokens), ce.mean(), rtol=1e-5)


def test_init_from_loads_weights_checks_them_and_resumes(tmp_path):
    # constant lr after step 1; weighted answers exercise the weighted loss path of the loop
    flat = ["optim.end_lr_frac=1.0", "optim.warmup_steps=1", "train.save_every=2", "data.answer_weight=5"]
    base = get_config("tiny", flat)
    world = FactsWorld(base.data.world)
    src = export(build_model(base, world, jax.random.PRNGKey(7)), world, tmp_path / "src")
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, init_from=str(src)))
    start = build_model(cfg, world, jax.random.PRNGKey(0))
    ref = ji.load(src)
    jax.tree_util.tree_map(np.testing.assert_array_equal, start.params, ref.params)

    with pytest.raises(ValueError, match="family"):
        build_model(dataclasses.replace(cfg, model=get_config("tiny-mamba").model), world, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="d_model"):
        build_model(get_config("tiny", [f"train.init_from={src}", "model.args.d_model=48"]), world, None)
    other = FactsWorld(dataclasses.replace(world.config, seed=1))
    with pytest.raises(ValueError, match="another facts world"):
        build_model(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, world=other.config)), other, None)

    # the CLI flag records the source; 4 steps then a resume to 6 == 6 steps straight (fresh optimizer both)
    argv = ["--config", "tiny", "--init-from", str(src), "--no-progress", "--eval-prompts", "8",
            *[a for kv in flat for a in ("--set", kv)]]
    assert main([*argv, "--set", "train.steps=4", "--out", str(tmp_path / "ft")]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["train"]["init_from"] == str(src)
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["config"]["train"]["init_from"] == str(src)
    logs = []
    six = get_config("tiny", [f"train.init_from={src}", *flat, "train.steps=6"])
    resumed, _ = train(six, tmp_path / "ft", progress=False, log=logs.append)
    assert any(line.startswith("resumed from step 4 ") for line in logs), logs
    straight, _ = train(six, tmp_path / "straight", progress=False, log=logs.append)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, straight.params)
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                                             straight.params, ref.params))
    assert any(moved)  # training started from the loaded weights and changed them


@pytest.mark.parametrize("name", ["facts-gpt", "facts-mamba"])
def test_shipped_models_recall_facts(name):
    res = _shipped_eval(name)
    assert res["train_acc"] >= 0.95, res
    assert res["paraphrase_acc"] >= 0.80, res


@pytest.mark.parametrize("name", ["facts-gpt", "facts-mamba"])
def test_shipped_models_copy_in_context(name):
    res = _shipped_eval(name)
    assert res["copy_acc"] >= 0.90, res


def test_curriculum_stages_chain_their_exports(tmp_path):
    """make_embedded trains a preset's curriculum stages in order, each from the previous export,
    then the preset itself from the last one; every stage's overrides parse into a valid config."""
    from jaxinterp.experiments.train_lm.config import CURRICULA
    from jaxinterp.experiments.train_lm.make_embedded import _stage_argvs

    run = tmp_path / "facts-mamba"
    argvs = _stage_argvs("facts-mamba", run)
    assert len(argvs) == len(CURRICULA["facts-mamba"]) + 1
    sources = [None] + [str(tmp_path / f"facts-mamba-{stage}" / "export") for stage, _ in CURRICULA["facts-mamba"]]
    for argv, source in zip(argvs, sources):
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        init = argv[argv.index("--init-from") + 1] if "--init-from" in argv else None
        assert init == source
        cfg = get_config("facts-mamba", sets)
        assert cfg.data.world.passage_sentences == (2, 5)  # evaluation passages are never shortened
    assert argvs[-1][-1] == str(run) and get_config("facts-mamba", []).data.world.train_passage_sentences == (1, 5)
    assert _stage_argvs("facts-gpt", run) == [["--preset", "facts-gpt", "--out", str(run)]]


def test_shipped_models_share_one_world():
    """Experiments swap facts-gpt and facts-mamba: same facts, prompts and evaluation passages
    (their world.json may differ only in the training corpus mix)."""
    from jaxinterp.loading import embedded_dir

    names = [n for n in ("facts-gpt", "facts-mamba") if n in ji.embedded_models()]
    if len(names) < 2:
        pytest.skip("needs both shipped facts models")
    gpt, mamba = (FactsWorld.from_dir(embedded_dir(n)) for n in names)
    assert gpt.facts == mamba.facts and gpt.vocab_size == mamba.vocab_size
    for split in ("train", "paraphrase"):
        assert [p.ids for p in gpt.fact_prompts(split)] == [p.ids for p in mamba.fact_prompts(split)]
    assert gpt.context_passages(32, seed=5) == mamba.context_passages(32, seed=5)
    assert gpt.domain_documents("cuisine", 4, seed=2) == mamba.domain_documents("cuisine", 4, seed=2)


@functools.lru_cache(maxsize=None)
def _shipped_eval(name):
    from jaxinterp.loading import embedded_dir

    if name not in ji.embedded_models():
        pytest.skip(f"{name} is not shipped yet")
    model = ji.load(name)
    world = FactsWorld.from_dir(embedded_dir(name))
    return evaluate_world(model, world, n_prompts=256, n_passages=128, seed=1)
