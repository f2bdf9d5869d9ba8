"""Configs: every YAML under configs/ loads; full-size configs carry nothing of the demo; bad keys are refused
at load with the key named (before any model exists); a recipe with a bad late stage fails before stage 1;
the package layers point one way."""
import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from cig_jax import config, config_base, config_model
from cig_jax.config import field_paths
from cig_jax.config_base import ConfigError
from cig_jax.config_io import dump_yaml, load_config
from cig_jax.train import recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
FULL_SIZE = [p for p in CONFIGS if p.stem.endswith(("_13b", "_1b"))]


def _loaded(path: Path):
    """(path, Config) for a config file, or one per stage of a recipe."""
    if recipe.is_recipe(path):
        return recipe.load_recipe(path)[1]
    return [(path, load_config(path))]


def test_every_config_and_recipe_stage_loads_and_dumps_back_equal():
    n = 0
    for path in CONFIGS:
        assert path.read_text().startswith("# COMMAND"), f"{path}: the first line names the command that runs it"
        for stage_path, cfg in _loaded(path):
            again = config_base.from_dict(config.Config, yaml.safe_load(dump_yaml(cfg)), source=str(stage_path))
            assert again == cfg, stage_path
            n += 1
    assert n >= len(CONFIGS) + 2  # the demo recipe holds three stages


def test_full_size_configs_resolve_to_no_demo_value():
    assert len(FULL_SIZE) >= 5
    demo = load_config(ROOT / "configs" / "model" / "demo.yaml")
    for path in FULL_SIZE:
        cfg = load_config(path)
        where = str(path)
        assert cfg.data.tokenizer, f"{where}: data.tokenizer must name a real tokenizer folder"
        assert not cfg.model.dit.visual_grid_injection, where
        assert cfg.model.use_vae, where
        assert cfg.diffusion.prediction == "velocity" or cfg.diffusion.objective == "ddpm", where
        # the demo's few-step, identity-guided drawing recipe (tuned on toy faces) is not a full-size default
        d, dd = cfg.diffusion, demo.diffusion
        assert d.num_steps > dd.num_steps, where
        assert (d.identity_guidance_scale, d.p_drop_visual, d.logit_mean) != (
            dd.identity_guidance_scale, dd.p_drop_visual, dd.logit_mean), where
        assert cfg.model.llm.vocab_size > 1024, where  # not the tiny tokenizer's
        assert not cfg.data.dir.startswith("workdir/demo") and not cfg.train.workdir.startswith("workdir/demo"), where
        assert not cfg.train.init_from.startswith("workdir/demo"), where
        # nothing of configs/model/demo.yaml reaches it through a base chain
        assert "demo.yaml" not in json.dumps(_base_chain(path)), where


def _base_chain(path: Path) -> list:
    tree = yaml.safe_load(path.read_text()) or {}
    bases = tree.get("base") or []
    bases = bases if isinstance(bases, list) else [bases]
    return [str(b) for b in bases] + [x for b in bases for x in _base_chain(path.parent / b)]


def test_stage_files_say_only_train_data_optimizer():
    stages = sorted((ROOT / "configs" / "stages").glob("*.yaml"))
    assert len(stages) == 3
    for path in stages:
        tree = yaml.safe_load(path.read_text())
        assert set(tree) <= {"train", "data", "optimizer", "diffusion"}, path
        objective = field_paths("objective")
        assert all(f"diffusion.{k}" in objective for k in tree.get("diffusion", {})), path  # not architecture
        assert tree["train"]["stage"] in typing.get_args(config.Stage)


# (override, the key the message must name)
BAD = [
    ("model.vit.hidden_act=foo", "model.vit.hidden_act"),
    ("model.mllm.reg_loss=bogus", "model.mllm.reg_loss"),
    ("model.llm.remat_policy=sometimes", "model.llm.remat_policy"),
    ("model.dit.identity_injection=sideways", "model.dit.identity_injection"),
    ("model.vae.act_fn=tanh", "model.vae.act_fn"),
    ("model.input_resampler.pos_interpolation=nearest", "model.input_resampler.pos_interpolation"),
    ("model.input_resampler.kv_dim=96", "model.input_resampler.kv_dim"),
    ("model.output_resampler.num_queries=9", "model.output_resampler.num_queries"),
    ("model.mllm.num_image_tokens=9", "model.mllm.num_image_tokens"),
    ("model.dit.caption_channels=64", "model.dit.caption_channels"),
    ("model.llm.num_kv_heads=3", "model.llm.num_kv_heads"),
    ("diffusion.sampler=ddim", "diffusion.sampler"),
    ("diffusion.prediction=epsilon", "diffusion.prediction"),
    ("train.stage=nonexistent", "train.stage"),
    ("train.trainable=[llm,wings]", "train.trainable[1]"),
    ("train.trainable=[vit]", "train.trainable"),
    ("data.source=nowhere", "data.source"),
    ("data.kinds=[single_turn,smalltalk]", "data.kinds[1]"),
    ("data.source=random_tokens", "data.source"),  # an MLLM stage on LM smoke data
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("model.llm.dtype=float8", "model.llm.dtype"),
]


def test_bad_overrides_are_refused_at_load_naming_the_key_before_any_model_exists():
    """All in one fresh interpreter: each override is refused by load_config, the message names the key, and
    neither the models nor flax were ever imported."""
    code = f"""
import json, sys
from cig_jax.config_base import ConfigError
from cig_jax.config_io import load_config
out = []
for ov, key in {BAD!r}:
    try:
        load_config({str(ROOT / "configs" / "stage3_multiround.yaml")!r}, [ov])
        out.append([ov, None])
    except ConfigError as e:
        out.append([ov, str(e)])
print(json.dumps([out, sorted(m for m in sys.modules if m.startswith(("cig_jax.models", "flax", "jax")))]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=_env())
    assert res.returncode == 0, res.stderr
    results, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == len(BAD) >= 10
    for (ov, msg), (_, key) in zip(results, BAD):
        assert msg is not None, f"{ov}: accepted"
        assert f"'{key}" in msg and "stage3_multiround.yaml" in msg, (ov, msg)
    assert imported == [], imported
    load_config(ROOT / "configs" / "stage3_multiround.yaml")  # the same file without overrides is fine


def test_sections_built_in_code_are_checked_too():
    good = config.DiffusionConfig()
    config.check(good)
    with pytest.raises(ConfigError, match="'diffusion.objective' must be one of"):
        config.check(dataclasses.replace(good, objective="sde"), key="diffusion")
    with pytest.raises(ConfigError, match="'model.vit.pool: cls' needs"):
        config.check(config_model.ModelConfig(vit=config_model.ViTConfig(pool="cls")), key="model")
    # every section is frozen and hashable (models keep them as static graph attributes)
    cfg = load_config(ROOT / "configs" / "stage3_multiround.yaml")
    assert hash(cfg) == hash(load_config(ROOT / "configs" / "stage3_multiround.yaml"))
    for section in (cfg.model.vae, cfg.model.dit, cfg.model.dit.identity, cfg.mesh, cfg.data, cfg.train):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, dataclasses.fields(section)[0].name, None)


def test_field_kinds_name_what_may_differ_between_stages():
    execution = field_paths("execution")
    assert {"model.llm.scan_layers", "model.llm.remat_policy", "model.vit.attn_pool.dtype", "model.dit.dtype",
            "model.llm.attention_impl"} <= execution
    assert "model.llm.param_dtype" not in execution and "model.llm.hidden_size" in field_paths("architecture")
    assert field_paths("adapter") == ({f"model.llm.lora_{k}" for k in ("rank", "alpha", "dropout", "targets")}
                                      | {"model.mllm.person_slots", "model.mllm.person_key_dim"})
    assert {"model.mllm.reg_loss", "model.mllm.reg_weight", "model.mllm.lm_weight"} <= field_paths("objective")
    kinds = [field_paths(k) for k in config_base.KINDS]
    assert sum(map(len, kinds)) == len(frozenset().union(*kinds))  # each field has one kind


def test_enumerations_agree_with_the_code_that_reads_them():
    from cig_jax.data import schema
    from cig_jax.models import cig, layers, vae, vit
    from cig_jax.train import stages

    assert set(typing.get_args(config.RecordKind)) == set(schema.KNOWN_KINDS)
    assert set(typing.get_args(config.Part)) == set(cig.PARTS)
    assert set(typing.get_args(config.Stage)) == set(stages.STAGES)
    assert set(typing.get_args(config_model.RematPolicy)) == set(layers.REMAT_POLICIES) | {"none"}
    assert set(typing.get_args(typing.get_type_hints(config_model.ViTConfig)["hidden_act"])) == set(vit.ACTIVATIONS)
    assert set(typing.get_args(typing.get_type_hints(config_model.VAEConfig)["act_fn"])) == set(vae.ACTIVATIONS)


def test_recipe_with_a_bad_stage3_key_exits_2_before_stage_1(tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("demo.yaml", "tiny.yaml"):
        (tmp_path / "model" / name).write_text((ROOT / "configs" / "model" / name).read_text())
    (tmp_path / "stages").mkdir()
    for p in (ROOT / "configs" / "stages").glob("*.yaml"):
        (tmp_path / "stages" / p.name).write_text(p.read_text())
    for i, name in enumerate(("stage1_detokenizer.yaml", "stage2_personalize.yaml", "stage3_multiround.yaml"), 1):
        tree = yaml.safe_load((ROOT / "configs" / name).read_text())
        tree["train"]["workdir"] = str(tmp_path / f"stage{i}")
        tree["data"]["dir"] = str(tmp_path / "data")
        if i == 3:
            tree["model"] = {"mllm": {"reg_loss": "bogus"}}
        (tmp_path / name).write_text(yaml.safe_dump(tree))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"recipe": {
        "data": {"dir": str(tmp_path / "data"), "num_train": 4, "num_val": 2},
        "stages": ["stage1_detokenizer.yaml", "stage2_personalize.yaml", "stage3_multiround.yaml"]}}))
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "recipe.yaml")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, env=_env())
    assert res.returncode == 2, res.stdout + res.stderr
    assert "model.mllm.reg_loss" in res.stderr and "stage3_multiround.yaml" in res.stderr, res.stderr
    assert not (tmp_path / "stage1").exists() and not (tmp_path / "data").exists()
    assert "[recipe] stage 1" not in res.stdout


def _env():
    import os

    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ----------------------------------------------------------------------------------------------------------
# Package layers
# ----------------------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _product_modules():
    files = sorted((ROOT / "cig_jax").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
    return {str(p.relative_to(ROOT)): _imports(p) for p in files}


def test_models_import_neither_sampling_nor_training():
    for name, imports in _product_modules().items():
        if name.startswith("cig_jax/models/"):
            bad = sorted(m for m in imports if m.startswith(("cig_jax.sample", "cig_jax.train")))
            assert not bad, f"{name} imports {bad}"


# The product modules that may open the synthetic renderer (`synthetic.py` and its drawing, `render.py`): as a data source (a draw in memory, the synthetic
# split of the array_record build, the recipe's dataset) and as the attribute classifier's training data.
# Identity codes and the vocabulary live in `cig_jax.data.world`, which anything may use.
SYNTHETIC_IMPORT_ALLOWED = {
    "cig_jax/data/sources.py",  # the 'synthetic' source: a draw in memory
    "cig_jax/data/tfds_builder.py",  # builds the synthetic split
    "cig_jax/eval/attributes.py",  # the attribute classifier is trained on synthetic renders
    "cig_jax/train/recipe.py",  # a recipe draws its dataset
    "cig_jax/data/recall.py",  # the renderer's own recall kind (and its name probe), called by synthetic.py
}


def test_no_product_module_imports_the_synthetic_renderer_beyond_the_allow_list():
    users = set()
    for name, imports in _product_modules().items():
        if name.startswith(("cig_jax/data/synthetic", "cig_jax/data/render", "cig_jax/bench/")):
            continue
        if any(m in ("cig_jax.data.synthetic", "cig_jax.data.render") or m.startswith("cig_jax.data.synthetic.")
               for m in imports):
            users.add(name)
    new = sorted(users - SYNTHETIC_IMPORT_ALLOWED)
    assert not new, f"new importers of cig_jax.data.synthetic: {new}"
    stale = SYNTHETIC_IMPORT_ALLOWED - users
    assert not stale, f"no longer import cig_jax.data.synthetic, drop them from the allow-list: {sorted(stale)}"
