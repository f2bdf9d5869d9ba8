"""Test setup: 8 simulated CPU devices for mesh tests, set before jax is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (run with -m slow)")
    config.addinivalue_line("markers", "long: a test of a minute or more: left out of a run over the whole suite, "
                                       "run by `python -m pytest -m long` (.ci/run does) or by naming its file")
    config.addinivalue_line("markers", "gpu: needs a GPU")


import pytest  # noqa: E402  (after the environment above)


def pytest_collection_modifyitems(config, items):
    """A run over the whole suite (`python -m pytest`, no paths) leaves the `long` tests out, so it stays within
    ~15 minutes on 2 cores; a run that names files or folders runs every test in them, and `-m` chooses
    explicitly (`-m long`: only those)."""
    if config.args_source == pytest.Config.ArgsSource.ARGS or "long" in (config.option.markexpr or ""):
        return
    kept = [it for it in items if it.get_closest_marker("long") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("long") is not None])
        items[:] = kept

# A tiny multiround system (MLLM + pixel-space DiT) for sampling and evaluation tests.
TINY_RUN = ["model.llm.vocab_size=1024", "model.use_vae=false", "model.dit.in_channels=3", "model.dit.sample_size=32",
            "model.dit.patch_size=8", "model.dit.identity_injection=concat", "model.dit.identity.width=64",
            "model.dit.identity.depth=1", "model.dit.identity.num_tokens=4", "diffusion.num_steps=2",
            "sample.max_new_tokens=4", "train.stage=multiround", "data.source=synthetic"]


def save_tiny_checkpoint(workdir, extra=()):
    """A tiny run with random weights (config + weights + tokenizer) saved as the trainer saves one. The weights
    are drawn with numpy, nothing to compile: norm scales 1, biases 0, the rest N(0, 1 / fan_in). extra: more
    config overrides."""
    from pathlib import Path

    import numpy as np
    from flax import nnx

    from cig_jax.config_io import load_config
    from cig_jax.sample.session import default_mesh
    from cig_jax.train import stages
    from cig_jax.train import checkpoint as train_checkpoint
    from cig_jax.train import state as train_state
    from cig_jax.train.checkpoint import Checkpointer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "model" / "tiny.yaml", TINY_RUN + list(extra) + [f"train.workdir={workdir}"])
    task = stages.build_task(cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(task.make_model))
    rng = np.random.default_rng(0)

    def draw(name, x):
        if name in ("scale", "bias") or x.ndim < 2:
            return np.full(x.shape, float(name == "scale"), x.dtype)
        fan_in = np.prod(x.shape[:-1]) if x.ndim == 4 else x.shape[-2]  # conv [kh, kw, in, out]; [(layers,) in, out]
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    flat = [(path, var.replace(draw(str(path[-1]), var.value))) for path, var in nnx.to_flat_state(abstract)]
    _, params, frozen = nnx.split(nnx.merge(graphdef, nnx.from_flat_state(flat)), task.trainable, ...)
    state, _ = train_state.init_state(params, train_state.make_optimizer(cfg.optimizer, cfg.train.steps), default_mesh(),
                                  cfg.mesh.axis_rules, frozen)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1, keep=1, async_save=False)
    ckpt.save(1, state, None, cfg, force=True)
    ckpt.close()
    train_checkpoint.write_artifacts(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny multiround run saved as the trainer saves one (random weights, nothing trained or compiled)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_run") / "run")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The tiny byte-level tokenizer's chat template with 4 image tokens a block (configs/model/tiny.yaml's)."""
    from cig_jax.data.chat_template import ChatTemplate
    from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer

    return ChatTemplate(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")), num_image_tokens=4)
