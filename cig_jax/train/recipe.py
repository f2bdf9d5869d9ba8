"""Recipes: several stages run one after another from one YAML (the demo is one).

Owns: the `recipe:` file format and running it. A recipe names an optional dataset to draw first and a list
of stage configs (paths relative to the recipe); each stage is an ordinary training run (`trainer.run`),
chained by the stages' own `train.init_from`. Command-line overrides apply to every stage, except those
under `recipe.` (e.g. `--set recipe.data.num_train=64`), which change the recipe itself. A stage whose
checkpoint is complete is skipped by the trainer's auto-resume, so re-running a recipe continues it.

    recipe:
      data: {dir: workdir/demo/data, num_train: 3000, num_val: 100, size: 64, seed: 0}
      stages: [stage1_detokenizer.yaml, stage2_personalize.yaml, stage3_multiround.yaml]
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from cig_jax import sharding
from cig_jax.config_base import apply_override, ConfigError
from cig_jax.config_io import load_config
from cig_jax.train import trainer
from cig_jax.data import synthetic

_DATA_KEYS = {"dir", "num_train", "num_val", "size", "seed", "kinds"}


def is_recipe(path: str | Path) -> bool:
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and "recipe" in tree


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list]:
    """(data spec or {}, [(stage path, Config)]) with every stage config loaded and checked up front."""
    path = Path(path)
    tree = yaml.safe_load(path.read_text()) or {}
    # `--set recipe.data.num_train=64` changes the recipe itself; every other override goes to each stage.
    stage_overrides = []
    for ov in overrides:
        if ov.split("=", 1)[0].strip().startswith("recipe."):
            tree = apply_override(tree, ov)
        else:
            stage_overrides.append(ov)
    extra = sorted(set(tree) - {"recipe"})
    if extra:
        raise ConfigError(f"{path}: a recipe file holds only 'recipe:' (found {extra})")
    recipe = tree["recipe"]
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise ConfigError(f"{path}: 'recipe.stages' must be a non-empty list of stage config files")
    unknown = sorted(set(recipe) - {"data", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown key 'recipe.{unknown[0]}' (known: data, stages)")
    data = recipe.get("data") or {}
    bad = sorted(set(data) - _DATA_KEYS)
    if bad:
        raise ConfigError(f"{path}: unknown key 'recipe.data.{bad[0]}' (known: {sorted(_DATA_KEYS)})")
    stages = []
    for s in recipe["stages"]:
        stage_path = path.parent / str(s)
        stages.append((stage_path, load_config(stage_path, stage_overrides)))
    return data, stages


def run_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    import jax

    data, stages = load_recipe(path, overrides)
    sharding.initialize_distributed()  # once for the whole recipe; every stage's trainer finds it started
    t0 = time.perf_counter()
    if data:
        from cig_jax.data import tfds_builder  # tensorflow-datasets only where array_record files are written

        t = time.perf_counter()
        if jax.process_index() == 0:  # one process draws (data.dir must be shared: a network disk or gs://)
            print(f"[recipe] drawing the synthetic dataset into {data['dir']}", flush=True)
            b = tfds_builder.build_dataset(data["dir"], "synthetic", data.get("num_train", 1000),
                                           data.get("num_val", 100), data.get("seed", 0), data.get("size", 64),
                                           tuple(data.get("kinds", synthetic.KINDS)))
            print(f"[recipe] dataset ready: " + ", ".join(f"{k}={v.num_examples}" for k, v in b.info.splits.items())
                  + f" ({time.perf_counter() - t:.0f}s)", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if jax.process_index():
                print(f"[recipe] waiting for process 0 to draw the dataset into {data['dir']}", flush=True)
            multihost_utils.sync_global_devices("cig_jax recipe dataset drawn")
    metrics = {}
    for i, (stage_path, cfg) in enumerate(stages, 1):
        t = time.perf_counter()
        print(f"[recipe] stage {i}/{len(stages)}: {stage_path.name} (stage {cfg.train.stage!r}, {cfg.train.steps} "
              f"steps, workdir {cfg.train.workdir})", flush=True)
        metrics = trainer.run(cfg)
        if metrics.get("preempted"):  # saved at the step it was on; re-running the recipe continues there
            print(f"[recipe] preempted in stage {i}/{len(stages)}; run the same command again to continue", flush=True)
            return metrics
        print(f"[recipe] stage {i}/{len(stages)} done in {time.perf_counter() - t:.0f}s", flush=True)
    print(f"[recipe] all {len(stages)} stages done in {time.perf_counter() - t0:.0f}s; final checkpoint: "
          f"{stages[-1][1].train.workdir}", flush=True)
    return metrics
