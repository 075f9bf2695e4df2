"""The README's commands, as written, through bash.

Every command in the README's bash blocks is accounted for in PLAN below. Each `train.py` / `sample.py` line is
expanded by bash (quotes, braces, variables) and composed by Hydra as `train.py` composes it (fast). The commands
then run in the README's order, in a folder laid out as the README assumes (tests/conftest.py: `project`), each
as `bash -c "<the README's text> <small sizes>"` (Hydra takes the last value of a key). The two training commands
of "Training" are the `stage1` and `stage2` runs the other end-to-end tests use; the own-shards line (a quarter of
its samples broken), plain sampling and an attention edit run here; everything else is marked slow. Commands that
need hardware or services this machine does not have (GPUs, torchrun across machines, SLURM) are composed only;
the quick start has its own timed run (README, "The quick-start results").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cli import README_ENV, TINY_DATA, TINY_LDM, readme_commands, run_in_shell

SMALL_TRAIN = [*TINY_DATA, "trainer.max_steps=2"]
SMALL_LDM = [*SMALL_TRAIN, *[o for o in TINY_LDM if "sample_images.prompts" not in o]]
SMALL_SHARDS = ["trainer.max_steps=2", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=10",
                "trainer.enable_progress_bar=false", "callbacks.sample_images.steps=2", "model.sampling.steps=2"]
SMALL_OWN = [*SMALL_SHARDS, *[o for o in TINY_LDM if "sample_images.prompts" not in o]]
SMALL_SD = [*[o for o in SMALL_SHARDS if "sample_images" not in o], "data.resolution=32"]  # default callbacks: no grid
SMALL_SAMPLE = ["steps=2", "n=1", "progress=false"]
SMALL_EVAL = ["evaluation.steps=2", "evaluation.inception.features=64"]
SMALL_BOOTH = ["num_class_images=2", "trainer.max_steps=2", "data.progress=false", "callbacks.sample_images.steps=2",
               "model.sampling.steps=2", "data.resolution=32", "trainer.enable_progress_bar=false"]

# (pattern, how, small sizes). how: "run" | "compose" (needs GPUs, several machines or SLURM) | "fixture" (the
# stage1 / stage2 runs, tests/conftest.py) | "own" (checked elsewhere). Every README command matches one pattern.
PLAN: list[tuple[str, str, list[str]]] = [
    (r"^pip install .*quickstart\.py$", "own", []),  # timed end to end (README, "The quick-start results")
    (r"^pip install .*pytest", "own", []),  # CI runs it (.ci/run)
    (r"experiment=emoji_autoencoder hydra.run.dir=runs/ae$", "fixture", []),
    (r"experiment=emoji_ldm autoencoder.ckpt_path=\S+ hydra.run.dir=runs/ldm$", "fixture", []),
    (r"trainer=gpu$", "compose", []),
    (r"trainer=ddp trainer.devices=8$", "compose", []),
    (r"data.train_shards='shards/\{00000..01023\}.tar' data.resolution=32 .*runs/own$", "run", SMALL_OWN),
    (r"^python -m ldm.data.build_emoji ", "run", []),
    (r"^python -m ldm.data.build_folder ", "run", []),
    (r"^torchrun .* train.py ", "compose", []),
    (r"hydra/launcher=slurm", "compose", []),
    (r"^python -m ldm.data.cache_latents ", "run", []),
    (r"data=latents .*runs/cached$", "run", SMALL_OWN),
    (r"^python -m ldm.export runs/ldm", "run", []),
    (r"^python sample.py ckpt=exports/ldm ", "run", SMALL_SAMPLE),
    (r"^python sample.py ckpt=runs/ldm/checkpoints/last.ckpt prompt=\"glass of milk\"", "run", SMALL_SAMPLE),
    (r"prompts_file=prompts.txt", "run", SMALL_SAMPLE),
    (r"attention_maps=true", "run", SMALL_SAMPLE),
    (r"edit=replace$", "run", SMALL_SAMPLE),
    (r"edit=reweight", "run", SMALL_SAMPLE),
    (r"edit=refine", "run", SMALL_SAMPLE),
    (r"attend_excite.tokens=", "run", SMALL_SAMPLE),
    (r"init_from=runs/ldm/checkpoints/last.ckpt hydra.run.dir=runs/finetune$", "run", SMALL_LDM),
    (r"init_from=models/stable-diffusion-v1-5 data=shards", "run", SMALL_SD),
    (r"init_from=models/v1-5-pruned-emaonly.safetensors", "run", SMALL_SD),
    (r"experiment=dreambooth init_from=models/stable-diffusion-v1-5 .*runs/dreambooth$", "run", SMALL_BOOTH),
    (r"experiment=dreambooth init_from=models/stable-diffusion-v1-5 .*lora=true", "run", SMALL_BOOTH),
    (r"init_from=runs/ldm/checkpoints/last.ckpt lora.enabled=true", "run", SMALL_LDM),
    (r"^python -m ldm.export_lora runs/lora/", "run", []),
    (r"lora=my_lora.safetensors", "run", SMALL_SAMPLE),
    (r"experiment=dreambooth init_from=runs/quickstart/.*dreambooth_demo/full", "run", SMALL_BOOTH),
    (r"experiment=dreambooth init_from=runs/quickstart/.*dreambooth_demo/lora", "run", SMALL_BOOTH),
    (r"^python -m ldm.export_lora runs/dreambooth_demo/", "run", []),
    (r"^python -m ldm.evaluation.reference_stats ", "run", ["--max-images", "32", "--features", "64"]),
    (r"evaluation.ref_stats=own_stats.npz .*runs/own_eval$", "run", [*SMALL_OWN, *SMALL_EVAL]),
    (r"^python evaluate.py ", "run", SMALL_EVAL),
    (r"^torchrun .* evaluate.py ", "run", SMALL_EVAL),
    # minutes of stage-1 training each; tests/test_train.py runs the script on the stage1 run, and
    # tests/test_colour.py trains the shipped settings on flat colours
    (r"^python scripts/autoencoder_colour.py --train runs/colour/before ", "own", []),
    (r"^python scripts/autoencoder_colour.py --train runs/colour/now ", "own", []),
    # half an hour of training and sampling; tests/test_attention_benchmark.py runs both stages and the benchmark
    # at tiny sizes
    (r"^python scripts/attention_benchmark.py --out runs/shapes ", "own", []),
    (r"^python scripts/attention_benchmark.py --run runs/shapes/ldm ", "own", []),
]
# Run in the default suite (the rest of the "run" entries: -m slow): own shards, plain sampling, an edit.
DEFAULT = (6, 15, 18)


def plan() -> list[tuple[int, str, str, list[str]]]:
    steps = []
    for command in readme_commands():
        matches = [i for i, (pattern, _, _) in enumerate(PLAN) if re.search(pattern, command)]
        assert len(matches) == 1, f"README command matched by {len(matches)} entries of tests/test_readme.py PLAN " \
                                  f"(add or fix one): {command}"
        i = matches[0]
        steps.append((i, command, PLAN[i][1], PLAN[i][2]))
    unused = sorted(set(range(len(PLAN))) - {i for i, *_ in steps})
    assert not unused, f"PLAN entries that match no README command: {[PLAN[i][0] for i in unused]}"
    return steps


def argv(command: str) -> list[str]:
    """The arguments bash passes for ``command`` (its quoting, brace expansion and variables applied)."""
    out = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + command.split(" #")[0]], capture_output=True,
                         text=True, env={**os.environ, **README_ENV}, check=True).stdout
    return out.split("\0")[:-1]


def test_every_readme_command_is_planned_and_composes():
    from cli import ROOT
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ldm.cli_overrides import quote_brace_patterns
    from ldm.config_checks import check_train_config
    from ldm.config_resolvers import register_resolvers

    register_resolvers()
    checked = 0
    for _, command, how, _ in plan():
        if how == "own":
            continue  # pip ... && ...: not one program's arguments
        args = argv(command)
        if args[0] == "torchrun":
            script = next(a for a in args if a.endswith(".py"))
            args = ["python", *args[args.index(script):]]
        if args[0] != "python" or args[1] not in ("train.py", "sample.py", "evaluate.py"):
            continue
        overrides = quote_brace_patterns([a for a in args[2:] if a != "-m"])
        config = args[1].removesuffix(".py")
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config, overrides=overrides, return_hydra_config=True)
        if config == "train":
            # Interpolations that read Hydra's runtime resolve only inside a real run: check the rest.
            for key in ("trainer", "data"):
                node = OmegaConf.to_container(cfg[key], resolve=False)
                check_train_config(OmegaConf.create({key: {k: v for k, v in node.items() if "${" not in str(v)}}))
        checked += 1
    assert checked >= 20


def _run_plan(project: Path, selected) -> None:
    for i, command, how, small in plan():
        if how != "run" or not selected(i):
            continue
        if "models/" in command and not (project / "models").exists():
            from tiny_sd import (  # tiny random SD-shaped models
                write_diffusers_folder,
                write_single_file,
            )

            write_diffusers_folder(project / "models" / "stable-diffusion-v1-5")
            write_single_file(project / "models" / "v1-5-pruned-emaonly.safetensors")
        if "runs/quickstart/" in command and not (project / "runs" / "quickstart").exists():
            (project / "runs" / "quickstart").mkdir(parents=True)
            (project / "runs" / "quickstart" / "ldm").symlink_to(project / "runs" / "ldm")
        run_in_shell(project, command, *small)


def test_readme_own_shards_sampling_and_editing_run_as_written(project, stage2):
    _run_plan(project, lambda i: i in DEFAULT)
    own = project / "runs" / "own"
    assert (own / "checkpoints" / "last.ckpt").is_file()
    # A quarter of the shards hold an undecodable image: the resampled stream skips and counts them.
    assert re.search(r"train/skipped/corrupt_image=[1-9]", (own / "emoji_ldm.log").read_text())
    assert (project / "samples" / "grid.png").is_file()  # "glass of milk"
    meta = [json.loads(line) for line in (project / "samples" / "metadata.jsonl").read_text().splitlines()]
    assert meta[0]["prompt"] == "red square" and meta[0]["target_prompt"] == "purple square"  # the edit, last


@pytest.mark.slow
def test_every_readme_command_runs_as_written(project, stage2):
    _run_plan(project, lambda i: True)
