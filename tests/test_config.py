"""Every Hydra config composes, validates and instantiates; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cqjax import config as cfg_lib
from cqjax.cli.common import model_dir
from cqjax.config import config_dir
from cqjax.errors import ConfigError
from cqjax.pipeline import Chain, Needs
from cqjax.recipes import build

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


def test_config_dir_is_the_source_checkout():
    assert (CONF / "config.yaml").is_file() and CONF.name == "conf"


def test_every_group_has_options():
    assert {"smollm2-135m", "gemma3-270m", "hf", "gemma4", "qwen3", "llama-3.2"} <= set(options("model"))
    assert set(options("pipeline")) == {"cq", "cq-ef", "cq-tune", "rtn", "gptq"} and {"default", "quick"} <= set(options("eval"))
    assert {"mobile", "embed8"} <= set(options("bundle"))
    assert "production" in options("experiment")


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes(model):
    cfg = composed(f"+model={model}")
    cfg_lib.validate(cfg)
    cfg_lib.validate_inputs(cfg)
    m = cfg.model
    assert m.name and (m.source or m.packaged or model == "hf")
    if m.source:
        assert m.source.count("/") == 1  # a hub id
    assert OmegaConf.get_type(m) is cfg_lib.ModelConfig


@pytest.mark.parametrize("model", [m for m in options("model") if m not in ("hf", "smollm2-135m", "gemma3-270m")])
def test_hub_models_take_a_local_path(model, tmp_path):
    cfg = composed(f"+model={model}", f"model.path={tmp_path}")
    assert model_dir(cfg.model) == tmp_path


@pytest.mark.parametrize("group, option", [(g, o) for g in ("quant", "bundle", "pipeline", "eval", "experiment")
                                           for o in options(g)])
def test_every_option_composes_validates_and_instantiates(group, option):
    cfg = composed("+model=smollm2-135m", f"{group}={option}")
    cfg_lib.validate(cfg)
    cfg_lib.validate_inputs(cfg)
    ecfg = cfg_lib.eval_config(cfg.eval)
    assert ecfg.tasks == tuple(cfg.eval.tasks) and ecfg.max_tokens == cfg.eval.perplexity.max_tokens
    recipe = build(cfg)
    assert isinstance(recipe, Chain) and [n for n, _ in recipe.steps] == list(cfg.pipeline)
    OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves


def test_error_feedback_pipelines_ask_for_hessians():
    assert build(composed("+model=smollm2-135m", "pipeline=cq")).needs == Needs()
    for name in ("cq-ef", "gptq"):
        assert build(composed("+model=smollm2-135m", f"pipeline={name}")).needs == Needs(statistics={"hessian"})
    recipe = build(composed("+model=smollm2-135m", "pipeline=cq-ef", "pipeline.pack.basis=unrotated"))
    assert recipe.steps[-1][1].basis == "unrotated"


@pytest.mark.parametrize("pipeline", ["cq", "cq-ef", "rtn", "gptq"])
def test_bpw_puts_the_allocator_first(pipeline):
    from cqjax.ir import TensorMeta
    from cqjax.passes.allocate import AllocateBits

    cfg = composed("+model=smollm2-135m", f"pipeline={pipeline}", "quant.bpw=2.6", "quant.choices=[2,3]",
                   "quant.block=64", "quant.embed_bits=8")
    cfg_lib.validate(cfg)
    recipe = build(cfg)
    name, alloc = recipe.steps[0]
    assert name == "allocate" and isinstance(alloc, AllocateBits) and [n for n, _ in recipe.steps[1:]] == list(cfg.pipeline)
    assert alloc.bpw == 2.6 and alloc.choices == (2, 3)
    assert alloc.recipe.steps == recipe.steps[1:]  # it measures exactly the steps that follow
    assert alloc.proxy == "fisher" and "fisher" in recipe.needs.statistics
    embed = TensorMeta(role="embedding", hf_name="e", shape=(64, 64), dtype="float32")
    linear = TensorMeta(role="linear", hf_name="x", shape=(64, 64), dtype="float32")
    assert alloc.fixed.get("embed_tokens/embedding", embed) == 8  # embed_bits stays fixed
    assert alloc.fixed.get("layers/0/mlp/up_proj/kernel", linear) is None  # linears are allocated
    weight = build(composed("+model=smollm2-135m", "pipeline=cq", "quant.bpw=3", "quant.proxy=weight"))
    assert weight.needs == Needs()
    free = build(composed("+model=smollm2-135m", "quant.bpw=3", "quant.embed_bits=null"))
    assert free.steps[0][1].fixed is None  # embeddings allocated too


def test_role_bundle_sets_rules_and_composes_with_the_allocator():
    from cqjax.ir import TensorMeta

    def meta(role, tower="text"):
        return TensorMeta(role=role, hf_name="x", shape=(64, 64), dtype="float32", tower=tower)

    cfg = composed("+model=smollm2-135m", "bundle=mobile", "quant.bits=4")
    cfg_lib.validate(cfg)
    rules = build(cfg).steps[1][1].bits
    assert rules.get("v/l/kernel", meta("linear", "vision")) == 2 and rules.get("a/kernel", meta("linear", "audio")) == 2
    assert rules.get("ple/embedding", meta("per_layer_embedding")) == 2
    assert rules.get("embed/embedding", meta("embedding")) == 4 and rules.get("l/kernel", meta("linear")) == 4
    alloc = build(composed("+model=smollm2-135m", "bundle=mobile", "quant.bpw=3")).steps[0][1]
    assert alloc.fixed.get("v/l/kernel", meta("linear", "vision")) == 2
    assert alloc.fixed.get("l/kernel", meta("linear")) is None


@pytest.mark.parametrize("pipeline, bits", [("cq", 2), ("rtn", 4)])
def test_pipelines_honour_quant_bits(pipeline, bits):
    from cqjax.ir import TensorMeta

    cfg = composed("+model=smollm2-135m", f"pipeline={pipeline}", f"quant.bits={bits}", "quant.embed_bits=8",
                   "quant.block=64")
    passes = [p for _, p in build(cfg).steps]
    with_bits = [p for p in passes if hasattr(p, "bits")]
    assert len(with_bits) == 1
    rules = with_bits[0].bits
    linear = TensorMeta(role="linear", hf_name="x", shape=(64, 64), dtype="float32")
    embed = TensorMeta(role="embedding", hf_name="e", shape=(64, 64), dtype="float32")
    assert rules.get("layers/0/mlp/up_proj/kernel", linear) == bits
    assert rules.get("embed_tokens/embedding", embed) == 8
    assert all(p.block == 64 for p in passes if hasattr(p, "block"))


def test_pipeline_is_a_dict_of_named_passes():
    cfg = composed("+model=smollm2-135m", "pipeline.codebook.mode=fitted", "~pipeline.rotate")
    assert list(cfg.pipeline) == ["codebook", "pack"] and cfg.pipeline.codebook.mode == "fitted"
    assert not composed("+model=smollm2-135m", "~pipeline").pipeline


def test_experiment_production_is_global_and_tuned():
    cfg = composed("+model=smollm2-135m", "experiment=production", "eval=quick")
    assert cfg.quant.bits == 4 and list(cfg.pipeline) == ["rotate", "codebook", "pack", "tune"]
    assert cfg.pipeline.tune.max_seconds > 0 and cfg.pipeline.tune.rows >= cfg.calib.rows
    assert "experiment" not in cfg


def test_the_default_recipe_is_error_feedback():
    cfg = composed("+model=smollm2-135m")
    assert cfg.pipeline.pack._target_ == "cqjax.passes.gptq.ErrorFeedbackPack"


def test_perplexity_path_maps_onto_eval_config(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    cfg = composed("+model=smollm2-135m", f"eval.perplexity.path={text}", "eval.perplexity.context=64")
    cfg_lib.validate(cfg)
    ecfg = cfg_lib.eval_config(cfg.eval)
    assert ecfg.text_path == str(text) and ecfg.context == 64


@pytest.mark.parametrize("overrides, needles", [
    (["quant.bits=5"], ["quant.bits=5", "1, 2, 3, 4, 8"]),
    (["quant.embed_bits=6"], ["quant.embed_bits=6", "1, 2, 3, 4, 8"]),
    (["quant.block=100"], ["quant.block=100", "power of two"]),
    (["quant.codebook=kmeans"], ["quant.codebook='kmeans'", "analytic, fitted"]),
    (["+quant.overrides.lm_head=7"], ["quant.overrides", "1, 2, 3, 4, 8"]),
    (["eval.tasks=[arc_easy,mmlu]"], ["eval.tasks[1]='mmlu'", "arc_easy", "hellaswag", "piqa"]),
    (["eval.perplexity.text=books"], ["eval.perplexity.text='books'", "wikipedia", "eval.perplexity.path"]),
    (["eval.perplexity.path=/no/such/file.txt"], ["eval.perplexity.path", "/no/such/file.txt", "not found"]),
    (["eval.limit=0"], ["eval.limit=0", ">= 1"]),
    (["quant.bpw=-1"], ["quant.bpw=-1", "positive"]),
    (["quant.choices=[2,5]"], ["quant.choices[1]=5", "1, 2, 3, 4, 8"]),
    (["quant.proxy=magic"], ["quant.proxy='magic'", "fisher, hessian, weight"]),
    (["calib.source=/no/such/text.txt"], ["calib.source", "self, squad", "text file"]),
    (["calib.rows=0"], ["calib.rows=0", ">= 1"]),
    (["runtime.kv_bits=3"], ["runtime.kv_bits=3", "4, 8"]),
    (["mesh.shape=[2,4]", "mesh.axes=[model]"], ["mesh.shape=[2, 4]", "mesh.axes=['model']", "same length"]),
    (["mesh.shape=[0,2]"], ["mesh.shape[0]=0", ">= 1"]),
])
def test_bad_values_name_key_and_allowed_values(overrides, needles):
    with pytest.raises(ConfigError) as e:
        cfg_lib.validate(composed("+model=smollm2-135m", *overrides))
    for n in needles:
        assert n in str(e.value)


@pytest.mark.parametrize("overrides, needles", [
    (["pipeline.codebook.mode=bogus"], ["pipeline.codebook", "bogus", "analytic", "fitted"]),
    (["pipeline.pack.gain=huge"], ["pipeline.pack", "huge", "none", "ls", "norm"]),
    (["+pipeline.pack.foo=1"], ["pipeline.pack", "foo", "allowed keys", "gain", "where"]),
    (["+pipeline.extra._target_=cqjax.passes.cq.NoSuchPass"], ["pipeline.extra", "NoSuchPass"]),
])
def test_bad_pass_settings_fail_at_instantiation(overrides, needles):
    cfg = composed("+model=smollm2-135m", "pipeline=cq", *overrides)
    with pytest.raises(ConfigError) as e:
        build(cfg)
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, needles", [
    (["mode=foo"], ["mode", "convert, eval, generate"]),
    (["quant.bitz=3"], ["bitz", "QuantConfig"]),
    (["eval.perplexity.context=abc"], ["eval.perplexity.context", "abc"]),
    (["+model=nosuch"], ["model/nosuch", "smollm2-135m"]),
])
def test_composition_rejects_bad_keys_and_types(overrides, needles):
    with pytest.raises(ConfigCompositionException) as e:
        composed(*overrides)
    text = str(e.value) + str(e.value.__cause__)
    for n in needles:
        assert n in text, text


@pytest.mark.parametrize("overrides, needle", [
    ([], "+model=<name>"),
    (["mode=eval"], "artifact=DIR"),
    (["mode=generate", "artifact=/nonexistent"], "no manifest.json"),
])
def test_mode_inputs_are_required(overrides, needle):
    cfg = composed(*overrides)
    cfg_lib.validate(cfg)
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        cfg_lib.validate_inputs(cfg)


def test_generate_needs_a_prompt(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    cfg = composed("mode=generate", f"artifact={tmp_path}")
    with pytest.raises(ConfigError, match='prompt="..."'):
        cfg_lib.validate_inputs(cfg)
    cfg_lib.validate_inputs(composed("mode=generate", f"artifact={tmp_path}", "prompt=hi"))


def readme_commands() -> list[list[str]]:
    """The overrides of every single-run conversion in the README's command-line block."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Command line (Hydra)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["python", "-m", "cqjax"] and "-m" not in words[3:] and any(w.startswith("+model=") for w in words):
            out.append(words[3:])
    return out


def test_every_readme_conversion_composes_and_builds_its_recipe(tmp_path, monkeypatch):
    """The README's examples compose, pass validation and instantiate their passes (a pass option
    the chosen pipeline rejects, e.g. a gain under error feedback, fails here, not for a user)."""
    from cqjax.config import validate
    from cqjax.recipes import build

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.txt").write_text("a text file the example names\n")
    commands = readme_commands()
    assert len(commands) >= 10
    for words in commands:
        cfg = composed(*words)
        validate(cfg)
        if cfg.pipeline:
            assert build(cfg).steps, words
