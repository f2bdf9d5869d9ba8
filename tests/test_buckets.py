"""Length-bucketed conversation batches (`cig_jax.data.buckets`): coverage, bucket choice, determinism,
process shares, resume, and the padding they save on stage-3-like data."""
import dataclasses
import re

import numpy as np
import pytest

from cig_jax.data import schema, synthetic
from cig_jax.data.buckets import make_dataset
from cig_jax.data.pipeline import PipelineOptions, SkipCounter

from batch_checks import assert_same, take

STAGE3_KINDS = ("recall", "recall", "rollback", "markov_edit", "single_turn")  # stages.DEFAULT_KINDS
BUCKETS = (256, 384, 512, 768)
# max_images 6: the 7- and 8-image recall chats are skipped (and counted), so windows lose records
OPTS = PipelineOptions(seq_len=768, max_images=6, image_size=8, batch_size=4, seed=5, length_buckets=BUCKETS,
                       bucket_window=4)


@pytest.fixture(scope="module")
def records():
    return list(synthetic.generate(80, seed=7, kinds=STAGE3_KINDS, size=32))


def _length(conv, template):
    return len(template.encode(conv, add_generation_prompt=False))


def test_three_epochs_log_one_remainder_line_each_and_each_skipped_record_once(records, template, caplog):
    skips = SkipCounter()
    with caplog.at_level("WARNING", logger="cig_jax.data.pipeline"):
        list(make_dataset(records, template, dataclasses.replace(OPTS, num_epochs=3), skips))
    messages = [r.getMessage() for r in caplog.records]
    epochs = [int(re.search(r"^epoch (\d+):", m).group(1)) for m in messages if "wait for the next epoch" in m]
    assert epochs == sorted(set(epochs)) and len(epochs) >= 2  # at most one line per epoch, in order
    skipped = [int(re.search(r"skipping record (\d+)", m).group(1)) for m in messages if "skipping record" in m]
    assert skipped and len(skipped) == len(set(skipped))  # each bad record logged once, not once per epoch
    assert skips.counts["too many images"] == 3 * len(set(skipped))  # ... though counted in every epoch


def test_an_epoch_holds_each_record_once_in_the_smallest_bucket(records, template, caplog):
    skips = SkipCounter()
    with caplog.at_level("WARNING", logger="cig_jax.data.pipeline"):
        batches = list(make_dataset(records, template, dataclasses.replace(OPTS, num_epochs=1), skips))
    # the windows' remainders are counted per record but logged in one line for the epoch
    lines = [r.getMessage() for r in caplog.records if "wait for the next epoch" in r.getMessage()]
    assert len(lines) == 1 and skips.counts["bucket window remainder"] > 1
    assert int(re.search(r"epoch 0: (\d+) records", lines[0]).group(1)) == skips.counts["bucket window remainder"]
    assert not any("bucket window remainder" in r.getMessage() for r in caplog.records)
    seen = [int(i) for b in batches for i in b["record_index"]]
    assert len(seen) == len(set(seen))  # no record twice
    assert len(seen) + sum(skips.counts.values()) == len(records)  # every other one counted as skipped
    too_many = {i for i, c in enumerate(records) if sum(1 for _ in schema.iter_images(c)) > OPTS.max_images}
    assert too_many and skips.counts["too many images"] == len(too_many) and not too_many & set(seen)
    shapes = set()
    for b in batches:
        assert b["input_ids"].shape[0] == OPTS.batch_size
        longest = max(_length(records[int(i)], template) for i in b["record_index"])
        want = min(x for x in BUCKETS if x >= longest)  # the smallest bucket that fits the longest row
        assert b["input_ids"].shape[1] == want and b["loss_mask"].shape[1] == want
        assert int(b["attention_mask"].sum(1).max()) == longest
        shapes.add(want)
    assert len(shapes) >= 2  # the draw spans buckets


def test_same_seed_is_byte_identical_and_another_seed_differs(records, template):
    a, b = take(make_dataset(records, template, OPTS), 6), take(make_dataset(records, template, OPTS), 6)
    for x, y in zip(a, b):
        assert_same(x, y)
    c = take(make_dataset(records, template, dataclasses.replace(OPTS, seed=6)), 6)
    assert [x["record_index"].tolist() for x in a] != [x["record_index"].tolist() for x in c]


def test_the_training_order_is_not_short_to_long(records, template):
    lengths = [b["input_ids"].shape[1] for b in take(make_dataset(records, template, OPTS), 16)]
    assert lengths != sorted(lengths)


def test_two_processes_shares_concatenate_to_the_one_process_batch(records, template):
    one = take(make_dataset(records, template, OPTS), 6)
    shares = [take(make_dataset(records, template, dataclasses.replace(
        OPTS, batch_size=2, process_index=p, process_count=2)), 6) for p in range(2)]
    for j, ref in enumerate(one):
        assert_same(ref, {k: np.concatenate([shares[0][j][k], shares[1][j][k]]) for k in ref})


def test_resume_from_a_saved_iterator_state_continues_identically(records, template):
    it = iter(make_dataset(records, template, OPTS))
    for _ in range(5):  # into the second window
        next(it)
    state = it.get_state()
    ref = [next(it) for _ in range(6)]
    resumed = iter(make_dataset(records, template, OPTS))
    resumed.set_state(state)
    for x in ref:
        assert_same(x, next(resumed))


def test_a_missing_image_is_replaced_by_a_row_of_the_same_block(records, template, tmp_path):
    good = [c for c in records if sum(1 for _ in schema.iter_images(c)) <= OPTS.max_images][:16]
    first = good[0]
    broken = dataclasses.replace(first, base_dir=str(tmp_path), rounds=[dataclasses.replace(
        first.rounds[0], assistant_image=schema.Image(path="nowhere.png"))] + first.rounds[1:])
    skips = SkipCounter()
    opts = dataclasses.replace(OPTS, num_epochs=1)
    batches = list(make_dataset([broken] + good[1:], template, opts, skips))
    assert skips.counts == {"missing image": 1}
    assert len(batches) == 4 and all(b["input_ids"].shape[0] == OPTS.batch_size for b in batches)
    seen = [int(i) for b in batches for i in b["record_index"]]
    assert 0 not in seen and sorted(set(seen)) == list(range(1, 16)) and len(seen) == 16  # one row doubled


def test_buckets_cut_the_padding_of_stage3_data(records, template):
    def padding(opts):
        batches = list(make_dataset(records, template, dataclasses.replace(opts, num_epochs=1)))
        cells = sum(b["attention_mask"].size for b in batches)
        return 1.0 - sum(int(b["attention_mask"].sum()) for b in batches) / cells

    demo = dataclasses.replace(OPTS, max_images=8)  # the demo's stage 3: every drawn chat fits
    plain = padding(dataclasses.replace(demo, length_buckets=()))
    bucketed = padding(demo)
    print(f"padding fraction: {plain:.3f} padded to seq_len, {bucketed:.3f} with buckets {BUCKETS}")
    assert bucketed < plain


@pytest.mark.long  # about 2 minutes: three compiles of the step
def test_a_bucketed_stage3_run_trains_and_compiles_one_step_per_bucket(tmp_path, capsys):
    """A tiny stage-3 run (configs/stage3_multiround.yaml shrunk, in-memory synthetic data) with buckets: the
    loss is finite and falls, one step is compiled per bucket the run's batches use, and tokens/s counts the
    non-padding tokens."""
    import json
    from pathlib import Path

    from cig_jax.config_io import load_config
    from cig_jax.train import trainer
    from cig_jax.train.stages import build_task

    steps = 16
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "stage3_multiround.yaml", [
        "data.source=synthetic", "data.num_records=64", "data.seq_len=256", "data.max_images=4",
        "data.length_buckets=[128,192,256]", "data.bucket_window=4", "data.global_batch_size=4",
        "model.llm.num_layers=1", "model.vit.num_layers=1", "model.dit.num_layers=1", "train.tensorboard=false",
        "train.init_from=", "optimizer.warmup_steps=3", f"train.steps={steps}", "train.log_every=1",
        "train.checkpoint_every=-1", f"train.workdir={tmp_path}"])
    task = build_task(cfg)
    it = iter(task.make_dataset(0, 1))
    lengths = [next(it)["input_ids"].shape[1] for _ in range(steps)]  # the batches the run will see
    trainer.run(cfg, task)
    out = capsys.readouterr().out
    compiles = re.findall(r"\[compile\] bucket (\d+): train step compiled", out)
    assert sorted(int(c) for c in compiles) == sorted(set(lengths)) and len(set(lengths)) >= 2, (compiles, lengths)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == steps and np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    assert all(r["tokens_per_s"] < r["padded_tokens_per_s"] for r in rows)


def test_length_buckets_are_checked_at_load_and_follow_seq_len():
    from pathlib import Path

    from cig_jax.config_base import ConfigError
    from cig_jax.config_io import load_config

    stage3 = Path(__file__).resolve().parents[1] / "configs" / "stage3_multiround.yaml"
    cfg = load_config(stage3)
    assert cfg.data.effective_buckets() == tuple(cfg.data.length_buckets) and cfg.data.length_buckets[-1] == 768
    assert load_config(stage3, ["data.seq_len=300"]).data.effective_buckets() == (256, 300)
    assert load_config(stage3, ["data.length_buckets=[]"]).data.effective_buckets() == ()
    for bad in ("[384,256,768]", "[256,256,768]", "[250,768]", "[0,768]"):
        with pytest.raises(ConfigError, match="data.length_buckets"):
            load_config(stage3, [f"data.length_buckets={bad}"])
    with pytest.raises(ConfigError, match="data.bucket_window"):
        load_config(stage3, ["data.bucket_window=0"])
