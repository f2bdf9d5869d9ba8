"""Face backends live in one registry (`cig_jax/faces/backends.py`): a backend added there (here a fake one,
for the duration of a test) is offered by every command line, accepted by the config and checked by the schema."""
import json
from pathlib import Path

import numpy as np
import pytest

from cig_jax.config import Config, override_config
from cig_jax.config_base import ConfigError
from cig_jax.data import schema, schema_io
from cig_jax.data.synthetic import make_conversation
from cig_jax.faces import backends
from cig_jax.faces.backends import BACKENDS, Backend

FAKE_DIM = 7


class FakeEmbedder:
    name = "fake"
    embedding_dim = FAKE_DIM

    def detect(self, image):
        return []

    def embed_crops(self, crops):
        return np.ones((len(crops), FAKE_DIM), np.float32) / np.sqrt(FAKE_DIM)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(BACKENDS, "fake", Backend(FAKE_DIM, lambda model_root=None, pack=None, **_: FakeEmbedder(),
                                                  note="fake cosine", same_person=0.5, track_link=0.4))
    return "fake"


def _help(main_or_args, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main_or_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_a_registered_backend_is_offered_by_every_identity_flag(fake, capsys):
    from cig_jax.data import video
    from cig_jax.eval import metrics, nonmarkov
    from cig_jax.eval import run as eval_run
    from cig_jax.sample import cli as sample_cli

    assert "fake" in _help(sample_cli._args, ["--help"], capsys).split("--identity-backend")[1].split("\n")[0]
    args = sample_cli._args(["--checkpoint", "c", "--chat", "x.json", "--out", "o", "--identity-backend", "fake"])
    assert args.identity_backend == "fake"
    for main in (eval_run.main, metrics.main, nonmarkov.main, video.main):
        text = _help(main, ["--help"], capsys)
        flag = "--identity" if main is not video.main else "--backend"
        assert "fake" in text.split(flag)[1].split("\n")[0], (main.__module__, text)
    assert backends.make_identity_embedder("fake").embedding_dim == FAKE_DIM


def test_the_config_checks_the_identity_backend_against_the_registry(fake):
    cfg = Config()
    ok = override_config(cfg, ["model.dit.identity.backend=fake", f"model.dit.identity.embedding_dim={FAKE_DIM}"])
    assert ok.model.dit.identity.backend == "fake"
    with pytest.raises(ConfigError, match=r"backend' fake gives 7-d embeddings but .*embedding_dim' is 512"):
        override_config(cfg, ["model.dit.identity.backend=fake", "model.dit.identity.embedding_dim=512"])
    with pytest.raises(ConfigError, match=r"backend' must be one of insightface, dlib, synthetic, fake"):
        override_config(cfg, ["model.dit.identity.backend=facenet"])


def test_the_config_refuses_a_backend_once_it_leaves_the_registry():
    with pytest.raises(ConfigError, match=r"backend' must be one of insightface, dlib, synthetic \(or null\)"):
        override_config(Config(), ["model.dit.identity.backend=fake", f"model.dit.identity.embedding_dim={FAKE_DIM}"])


def test_the_schema_checks_a_registered_backends_width(fake, tmp_path):
    conv = make_conversation("single_turn", 0, 0)
    conv.people[0].identity = schema.PersonIdentity.of("fake", np.arange(FAKE_DIM, dtype=np.float32))
    schema.validate(conv)
    schema_io.save_conversation(conv, tmp_path / "c.json")
    assert schema_io.load_conversation(tmp_path / "c.json").people[0].identity == conv.people[0].identity
    conv.people[0].identity = schema.PersonIdentity.of("fake", np.zeros(FAKE_DIM + 1, np.float32))
    with pytest.raises(schema.SchemaError, match=r"a fake embedding has 7 values, got 8"):
        schema.validate(conv)


def test_the_video_tool_and_metrics_read_thresholds_and_notes_from_the_registry(fake):
    from cig_jax.data import video
    from cig_jax.eval.identity_score import identity_similarity

    assert video.default_thresholds(FakeEmbedder(), None, None) == (0.5, 0.4)
    assert video.default_thresholds(backends.make_identity_embedder("fake"), None, None) == (0.5, 0.4)
    face = np.zeros((8, 8, 3), np.uint8)
    assert identity_similarity([face], [face], FakeEmbedder())["note"] == "fake cosine"


def test_the_published_json_schema_lists_the_registry():
    """conversation.schema.json is a published file, not read at run time: it must agree with BACKENDS."""
    spec = json.loads((Path(schema.__file__).parent / "conversation.schema.json").read_text())

    def find(node):
        if isinstance(node, dict):
            if "identity" in node and isinstance(node["identity"], dict) and "oneOf" in node["identity"]:
                return node["identity"]
            for v in node.values():
                if (hit := find(v)) is not None:
                    return hit
        return None

    obj = [o for o in find(spec)["oneOf"] if o.get("type") == "object"][0]
    assert obj["properties"]["backend"]["enum"] == list(BACKENDS)
    widths = {rule["if"]["properties"]["backend"]["const"]: rule["then"]["properties"]["embedding"]["minItems"]
              for rule in obj["allOf"]}
    assert widths == {name: b.dim for name, b in BACKENDS.items() if b.dim is not None}
