"""Every command the README shows is RUN, on tiny inputs (issue 15 item 6: docs that drift).

The commands are read from the README itself: each `python -m ...` line of its ```bash blocks
and each inline `python -m rm.* / ppo.* / sft.* ...` (and `rm.score --workdir A,B,C ...`) of the
text. They run in order in one temporary folder, with the README's relative paths (runs/rm,
train.jsonl, eval.jsonl, prompts.jsonl, scores.jsonl) as written and data files written here;
the placeholders become local things:
  /path/to/sft_model -> a tiny random GPT-2 HF folder (tests/rm_data_gen.make_tiny_policy),
  W -> runs/rm (the README's RM workdir; rm.ensemble's --out W -> runs/warm), FILE -> a
  RewardBench-layout file written here, FILES (rm.ensemble --normalize_on) -> eval.jsonl,
  A,B,C -> the two point workdirs run of the README's sweep (full fine-tunes of one SFT
  folder, as rm.ensemble requires); `mean|wco|uwo` takes `uwo`, `[--opt v]` is passed as `--opt v`.
Each command runs as written plus tiny-size overrides appended (`:size=tiny`, 2 RM steps, 1 PPO
iteration of 4 rollouts and 4 new tokens); the README's RM and PPO runs also get a LoRA rank
(model.lora_rank=2, policy.lora_rank=2), because each block's last export (`--peft_adapter`) is
for LoRA runs ("LoRA runs: adapters alone") and the merged exports work on the same workdirs.
The SFT folder has spare embedding rows, so the RM adapter export has room for its pad token. Each must exit 0 and write what it
promises (config/metrics/checkpoints, scores, HF folders, adapter files, results, sweep
statuses). The trainers run in subprocesses (absl flags are process-global); the score, export,
RewardBench and ensemble CLIs run in this process through their main(argv).

Not run end to end, and why:
  - the sweep plans all 4 points (its --dry_run) but runs 2 (the first learning rate, both
    center_coef values): each point is a full tiny RM run (~12 s CPU);
  - the two install lines (`python3 -m venv ... pip install ...`): no network; the
    quickstart run they end with gets `--print_config` (its documented size is ~10 min) and
    `pytest tests` is this suite;
  - the documented-size experiment drivers (configs/overoptimization.py, configs/algorithms.py:
    minutes to hours): `--print_config` of the same command, so the config resolves;
  - benchmarks.* (timing / memory measurements at documented shapes, tens of seconds to
    minutes; benchmarks have their own tests) and the `configs/NAME.py[:ARG]` template.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

from tests.fixtures import make_tiny_tokenizer
from tests.hf_fixtures import make_tiny_hf_model
from tests.rm_data_gen import NEUTRAL, corpus, make_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS_PRINT_ONLY = (
    "configs/quickstart.py",
    "configs/overoptimization.py",
    "configs/algorithms.py",
    "configs/ensembles.py",
)
TINY_RM = ["--config.train.steps=2"]
TINY_PPO = [
    "--config.train.steps=1",
    "--config.train.batch_size=4",
    "--config.train.num_minibatches=1",
    "--config.train.ppo_epochs=1",
    "--config.sampling.max_new_tokens=4",
]


def readme_commands(text):
    """[(module, argv)] of the README, in order: bash-block lines, then inline commands."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                match = re.search(r"python3? -m (\S+)(.*)", part)
                if match and not part.startswith("python3 -m venv"):
                    out.append((match.group(1), shlex.split(match.group(2))))
    inline = re.findall(r"`(?:python -m )?((?:rm|ppo|sft)\.\w+|experiments\.run) (--[^`]*)`", text)
    for module, rest in inline:
        if "--workdir" not in rest:  # a flag named in the text (`ppo.export --peft_adapter`), not a command
            continue
        rest = rest.replace("mean|wco|uwo", "uwo").replace("[", "").replace("]", "")
        out.append((module, shlex.split(rest)))
    return out


def _tiny_sft_folder(d):
    """make_tiny_policy's GPT-2 and tokenizer, with 4 spare embedding rows (rm.export --peft_adapter
    needs one for the pad token that a pad == EOS tokenizer gets)."""
    from transformers import AutoTokenizer

    tok_dir = make_tiny_tokenizer(str(d / "tok"), texts=corpus(), vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    make_tiny_hf_model(
        "gpt2",
        str(d / "hf"),
        tokenizer_dir=tok_dir,
        vocab_size=len(tok) + 4,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return str(d / "hf")


def _substitute(args, names):
    return [names.get(a, a) for a in args]


def _run_trainer(module, args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{module} {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _config_arg(args):
    i = args.index("--config") + 1
    return i, args[i]


def _tiny_run_args(args, extra):
    args = list(args)
    i, spec = _config_arg(args)
    args[i] = os.path.join(ROOT, spec) + ("" if ":" in spec else ":size=tiny")
    return args + extra


def test_every_readme_command_runs(tmp_path):
    cwd = tmp_path
    hf = _tiny_sft_folder(tmp_path / "sft")
    write_jsonl(cwd / "train.jsonl", make_rows(24, 0))
    write_jsonl(cwd / "eval.jsonl", make_rows(8, 1))
    rng = np.random.default_rng(0)
    write_jsonl(
        cwd / "prompts.jsonl", [{"prompt": "Review: " + " ".join(rng.choice(NEUTRAL, size=3))} for _ in range(8)]
    )
    bench = [dict(r, subset=s) for r, s in zip(make_rows(6, 2), ["alpacaeval-easy", "mt-bench-hard"] * 3)]
    write_jsonl(cwd / "rewardbench.jsonl", bench)
    commands = readme_commands(open(os.path.join(ROOT, "README.md")).read())
    modules = [m for m, _ in commands]
    assert {
        "experiments.run",
        "experiments.sweep",
        "rm.score",
        "rm.export",
        "ppo.export",
        "rm.rewardbench",
        "rm.ensemble",
    } <= set(modules), modules
    names = {
        "/path/to/sft_model": hf,
        "W": "runs/rm",
        "FILE": "rewardbench.jsonl",
        "FILES": "eval.jsonl",
    }  # A,B,C: after the sweep
    ran, printed = [], []
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        for module, args in commands:
            t0, w0 = time.process_time(), time.time()
            joined = " ".join(args)
            if module == "pytest" or module.startswith("benchmarks.") or "NAME.py" in joined:
                continue
            # rm.ensemble's W is the new averaged workdir, not the README's RM workdir
            here = {**names, "W": "runs/warm"} if module == "rm.ensemble" else names
            args = [a.replace("/path/to/sft_model", hf) for a in _substitute(args, here)]
            if module == "experiments.run":
                i, spec = _config_arg(args)
                if spec.split(":")[0] in DRIVERS_PRINT_ONLY:
                    args[i] = os.path.join(ROOT, spec)
                    out = _run_trainer(module, [*args, "--print_config"], cwd)
                    assert "trainer" in out, out[-500:]
                    printed.append(spec)
                    continue
                if spec.startswith("configs/rm.py"):
                    tiny = _tiny_run_args(args, TINY_RM + ["--config.model.lora_rank=2"])
                    # the usage section's --dry_run on the same command (--print_config: the drivers')
                    assert "trainable" in _run_trainer(module, [*tiny, "--dry_run"], cwd).lower()
                else:
                    lora = ["--config.policy.lora_rank=2"] if args[args.index("--workdir") + 1] == "runs/ppo" else []
                    tiny = _tiny_run_args(args, TINY_PPO + lora)
                _run_trainer(module, tiny, cwd)
                workdir = cwd / args[args.index("--workdir") + 1]
                for name in ("config.json", "metrics.jsonl", "provenance.json", "training_curves.png"):
                    assert (workdir / name).exists(), (workdir, name)
                assert os.listdir(workdir / "checkpoints")
            elif module == "experiments.sweep":
                i, spec = _config_arg(args)
                args[i] = os.path.join(ROOT, spec)
                from experiments import sweep

                assert sweep.main([*args, "--dry_run"]) == 0  # all 4 points planned
                # run 2 of the 4 points (the first axis' first value): each point is a full tiny
                # RM run (~12 s); the other two differ only in a float setting
                first = args.index("--sweep") + 1
                axis, values = args[first].split("=", 1)
                args[first] = f"{axis}={values.split(',')[0]}"
                _run_trainer(module, [*args, "--set", "train.steps=2", "--quiet"], cwd)
                root = cwd / args[args.index("--workdir") + 1]
                points = sorted(p for p in os.listdir(root) if (root / p / "config.json").exists())
                assert len(points) == 2, os.listdir(root)
                for j, p in enumerate(points):
                    assert (root / p / "SWEEP_DONE").exists() and (root / p / "checkpoints").exists(), p
                    # point folders are named 'k=v,k=v': commas cannot go in a --workdirs list
                    os.symlink(root / p, cwd / f"member{j}")
                names["A,B,C"] = "member0,member1"
            else:
                import importlib

                if module == "rm.score" and "--data" not in args:  # the ensemble fragment: add the I/O
                    args += ["--data", "eval.jsonl", "--out", "ensemble_scores.jsonl"]
                importlib.import_module(module).main(args)
                _check_outputs(module, args, cwd)
            ran.append((module, args, round(time.process_time() - t0, 1)))
            print(f"{module} {shlex.join(args)}: {time.time() - w0:.1f} s wall", flush=True)
    finally:
        os.chdir(old_cwd)
    # a driver may appear in several commands, and with a variant (configs/overoptimization.py:gold=rm)
    assert sorted({spec.split(":")[0] for spec in printed}) == sorted(DRIVERS_PRINT_ONLY), printed
    assert "configs/overoptimization.py:gold=rm" in printed, printed
    assert len(ran) >= 10, ran


def _check_outputs(module, args, cwd):
    """What each non-training command promises to write."""
    opt = dict(zip(args[::2], args[1::2]))
    if module == "rm.score":
        rows = [json.loads(line) for line in open(cwd / opt["--out"])]
        data = [line for line in open(cwd / opt["--data"]) if line.strip()]
        assert len(rows) == len(data) and all(np.isfinite(r["chosen_score"]) for r in rows), rows[:1]
    elif module in ("rm.export", "ppo.export"):
        out = cwd / opt["--out"]
        files = set(os.listdir(out))
        if "--peft_adapter" in args:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        else:
            assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    elif module == "rm.rewardbench":
        if opt.get("--out"):
            assert json.load(open(cwd / opt["--out"]))
    elif module == "rm.ensemble":
        out = cwd / opt["--out"]
        assert (out / "model_config.json").exists() and os.listdir(out / "checkpoints"), os.listdir(out)
