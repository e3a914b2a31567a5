"""Issue 15 pieces tested in-process: bad rows row by row, damaged checkpoints, preflight
checks before any data, tokenizer and workdir refusals, rm.score rows, W&B and the cache."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import configs.rm as rm_config
from common import data_io, tracking
from common.checkpoint import CheckpointManager, NoIntactCheckpoint
from rm import data as rm_data
from tests.fixtures import make_tiny_tokenizer
from tests.rm_data_gen import write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


# ----------------------------------------------------------------------------- bad rows, row by row

MIXED = [
    '{"prompt": "p0", "chosen": " good", "rejected": " bad", "margin": 1.5}',
    '{"prompt": "p1", "chosen": " nice", "rejected": " poor"',  # truncated line
    "INFO 12:00:01 a stray log line",  # not JSON
    '{"prompt": "p2", "chosen": " fine", "rejected": " dull"}',  # lacks the optional margin
    '{"prompt": "p3", "chosen": 7, "rejected": " dull"}',  # wrong type
    "[1, 2, 3]",  # JSON, but not an object
    '{"prompt": "p4", "chosen": " lovely", "rejected": " awful", "margin": null, "subset": "chat"}',
    '{"prompt": "p5", "chosen": " great", "rejected": " boring", "margin": "big"}',  # wrong type
]


def test_mixed_file_skip_keeps_every_good_row_and_error_names_the_first_bad_line(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(MIXED) + "\n")
    data = rm_data.load_preference_data(str(path), tok, max_length=32, on_bad_row="skip")
    s = data.stats
    assert (s["rows"], s["pairs"], s["skipped"]) == (8, 3, 5)
    assert (s["skipped/unparseable"], s["skipped/not_object"], s["skipped/wrong_type"]) == (2, 1, 2)
    np.testing.assert_array_equal(data.margin, [1.5, 0.0, 0.0])  # missing and null margin: the default 0
    assert data.has_margin and data.subset == ["", "", "chat"]
    with pytest.raises(data_io.BadRowError, match=r"mixed\.jsonl: row 1 \(0-based, line 2\): not valid JSON"):
        rm_data.load_preference_data(str(path), tok, max_length=32)


def test_sft_and_ppo_files_follow_the_same_rules(tok, tmp_path):
    from ppo.data import load_prompts
    from sft.data import load_sft_data

    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"text": "Hello there"}\n{"text": "cut\n\n{"text": 5}\n{"text": "The end"}\n')
    data = load_sft_data(str(sft), tok, max_length=16, on_bad_row="skip")
    assert (data.stats["examples"], data.stats["skipped/unparseable"], data.stats["skipped/wrong_type"]) == (2, 1, 1)
    with pytest.raises(data_io.BadRowError, match=r"sft\.jsonl: row 1 \(0-based, line 2\)"):
        load_sft_data(str(sft), tok, max_length=16)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\nnot json\n{"prompt": "b", "extra": 1}\n{"prompt": null}\n')
    p = load_prompts(str(prompts), tok, max_prompt_length=8, on_bad_row="skip")
    assert p.texts == ["a", "b"] and p.stats["skipped/unparseable"] == 1 and p.stats["skipped/missing"] == 1
    with pytest.raises(data_io.BadRowError, match=r"prompts\.jsonl: row 1 \(0-based, line 2\): not valid JSON"):
        load_prompts(str(prompts), tok, max_prompt_length=8)


def test_chat_rows_without_a_chat_template_name_the_file(tok, tmp_path):
    tok2 = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.chat_template = None
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ],
    )
    with pytest.raises(
        data_io.NoChatTemplate,
        match=r"chat\.jsonl: row 0 \(0-based\): .*no.*chat template|chat "
        r"template, but the tokenizer has none",
    ):
        rm_data.load_preference_data(path, tok2, max_length=32, on_bad_row="skip")


def test_tokenizer_folders_without_files_are_refused_by_name(tmp_path):
    empty = tmp_path / "model_only"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model_only has no tokenizer files .*config\.model\.tokenizer"):
        data_io.load_tokenizer(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_io.load_tokenizer(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- checkpoints


def _state(x):
    return {"params": {"w": jnp.full((16, 16), float(x)), "b": jnp.arange(16.0) * x}, "step": jnp.asarray(x)}


def test_damaged_checkpoints_are_reported_and_skipped(tmp_path, capsys):
    d = str(tmp_path / "ck")
    ckpt = CheckpointManager(d, save_every=1, max_to_keep=5, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    assert all(os.path.exists(os.path.join(d, str(s), "checksums.json")) for s in (1, 2, 3))  # async saves too
    os.remove(os.path.join(d, "3", "state", "_METADATA"))  # a missing file
    with open(os.path.join(d, "2", "extra", "metadata"), "w") as f:  # bad metadata, same length
        f.write("{not json!!")
    lines = []
    ckpt = CheckpointManager(d, save_every=1, max_to_keep=5)
    step, state, extra = ckpt.restore_newest_intact(_state(0), report=lines.append)
    assert step == 1 and extra == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((16, 16), 1.0))
    assert lines[0].startswith(f"Checkpoint step 3 in {d} is damaged (state/_METADATA is missing)")
    assert "step 2" in lines[1] and "extra/metadata" in lines[1] and len(lines) == 2
    assert ckpt.all_steps() == [1]
    ckpt.save(3, _state(3), {"step": 3})  # the step can be written again after the quarantine
    assert ckpt.verify(3) is None
    ckpt.close()


def test_no_intact_checkpoint_stops_cleanly(tmp_path):
    d = str(tmp_path / "ck")
    ckpt = CheckpointManager(d, save_every=1, checksums=False)  # no checksums: Orbax's own errors count
    ckpt.save(1, _state(1), {"step": 1})
    with open(os.path.join(d, "1", "state", "_METADATA"), "w") as f:
        f.write("garbage")
    with pytest.raises(NoIntactCheckpoint, match=r"No intact checkpoint in .*step 1: restore failed"):
        ckpt.restore_newest_intact(_state(0), report=lambda line: None)
    ckpt.close()


# ----------------------------------------------------------------------------- checks before any data


def _rm_config(tmp_path, **fields):
    from tests.hf_fixtures import make_tiny_hf_model

    hf = tmp_path / "hf"
    if not hf.exists():
        make_tiny_hf_model("gpt2", str(hf))
    c = rm_config.get_config("size=tiny")
    c.model.init_from = str(hf)
    c.data.train_files = write_jsonl(tmp_path / "t.jsonl", [{"chosen": "a b", "rejected": "a c"}])
    for key, value in fields.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mesh.shape": (64, 1)}, r"config\.mesh\.shape=\(64, 1\): make_mesh: shape \(64, 1\) needs 64 devices"),
        ({"model.quant": "int8"}, r"config\.model\.quant='int8' needs config\.model\.lora_rank > 0"),
        ({"model.init_from": "/no/such/sft"}, r"config\.model\.init_from='/no/such/sft': /no/such/sft does not exist"),
        ({"data.eval_files": "/no/eval.jsonl"}, r"config\.data\.eval_files: /no/eval\.jsonl does not exist"),
    ],
)
def test_config_checks_run_before_any_data_is_read(tmp_path, monkeypatch, fields, message):
    from rm.train import train

    def no_reading(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(data_io, "read_table", no_reading)
    workdir = tmp_path / "w"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(_rm_config(tmp_path, **fields), str(workdir))
    assert not workdir.exists()  # nothing half-written


# ----------------------------------------------------------------------------- rm.score / rm.export


def test_reward_tools_name_what_a_non_reward_workdir_holds(tmp_path):
    from rm.model import load_reward_model

    workdir = tmp_path / "ppo"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"trainer": "ppo"}))
    (workdir / "model_config.json").write_text("{}")
    ckpt = CheckpointManager(str(workdir / "checkpoints"), save_every=1)
    ckpt.save(1, {"params": {"policy": {"w": jnp.ones(3)}, "value": {"w": jnp.ones(3)}}, "step": 1}, {"step": 1})
    ckpt.close()
    with pytest.raises(
        ValueError,
        match=r"is not a reward-model workdir: it is a PPO workdir \(checkpoint params: "
        r"policy, value\)",
    ):
        load_reward_model(str(workdir))


def test_score_rows_that_are_bad_name_row_and_key(tok):
    from rm.score import tokenize_single

    for row, key in (
        ({"text": ""}, "key 'text'"),
        ({"text": 5}, "key 'text'"),
        ({"other": "x"}, "expected preference columns.*got keys"),
        ({"prompt": "p", "response": 3}, "key 'response'"),
    ):
        with pytest.raises(data_io.BadRowError, match=rf"f\.jsonl: row 1 \(0-based\): {key}"):
            tokenize_single(tok, [{"text": "fine"}, row], file="f.jsonl", max_length=16)
    number = data_io.UnreadableRow(2, "not_object", "expected a JSON object, got int 5")  # a line holding `5`
    with pytest.raises(data_io.BadRowError, match=r"f\.jsonl: row 1 \(0-based, line 2\): expected a JSON object"):
        tokenize_single(tok, [{"text": "fine"}, number], file="f.jsonl", max_length=16)


# ----------------------------------------------------------------------------- W&B, compilation cache


def test_wandb_is_fed_the_metrics_offline_and_only_imported_when_enabled(tmp_path, monkeypatch):
    c = rm_config.get_config("size=tiny")
    c.logging.tensorboard = False
    writer = tracking.open_metrics(str(tmp_path / "a"), c, resume_step=-1)
    writer.write(1, {"train/loss": 0.5})
    writer.close()
    assert "wandb" not in sys.modules
    c.logging.wandb = True
    if tracking.importlib.util.find_spec("wandb") is None:
        with pytest.raises(ModuleNotFoundError, match="the wandb package is not installed: `pip install wandb`"):
            tracking.check_logging(c)
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "calls = []\n"
        "class _Run:\n"
        "    def log(self, data, step): calls.append(('log', step, data))\n"
        "    def finish(self): calls.append(('finish',))\n"
        "def init(**kw):\n"
        "    calls.append(('init', kw))\n"
        "    return _Run()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    tracking.check_logging(c)
    writer = tracking.open_metrics(str(tmp_path / "b"), c, resume_step=-1)
    writer.write(3, {"train/loss": 0.25, "note": "text"})
    writer.close()
    calls = sys.modules["wandb"].calls
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["resume"] == "allow"
    assert calls[1] == ("log", 3, {"train/loss": 0.25}) and calls[2] == ("finish",)
    assert json.loads(open(tmp_path / "b" / "metrics.jsonl").readline()) == {
        "step": 3,
        "train/loss": 0.25,
        "note": "text",
    }
    monkeypatch.delitem(sys.modules, "wandb")


def test_compilation_cache_setting(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    c = rm_config.get_config("size=tiny")
    try:
        c.runtime.compilation_cache = str(tmp_path / "xla")
        assert tracking.setup_compilation_cache(c) == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        c.runtime.compilation_cache = "auto"
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert tracking.setup_compilation_cache(c) == str(tmp_path / "cache" / "rlhf-jax" / "xla")
        c.runtime.compilation_cache = ""
        assert tracking.setup_compilation_cache(c) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
