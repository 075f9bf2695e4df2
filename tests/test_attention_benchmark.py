"""The shapes experiments end to end at tiny sizes: train.py for both stages as a user runs them, then
scripts/attention_benchmark.py on that run (it must finish and print every measure; values are not asserted)."""

from __future__ import annotations

import json
import re

import pytest

from test_train import run

TINY_SHAPES = [
    "data.build.count=48", "data.build.val_count=8", "data.build.heldout_count=8", "data.build.shard_size=16",
    "data.batch_size=4", "data.epoch_length=8", "data.num_workers=0", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def tiny_shapes_run(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("shapes_run")
    run("train.py", "experiment=shapes_autoencoder", f"hydra.run.dir={out / 'ae'}", f"paths.data_dir={data}",
        *TINY_SHAPES, "trainer.max_steps=2", "model.log_images_every_n_steps=1")
    run("train.py", "experiment=shapes_ldm", f"hydra.run.dir={out / 'ldm'}", f"paths.data_dir={data}",
        f"autoencoder.ckpt_path={out / 'ae' / 'checkpoints' / 'last.ckpt'}", *TINY_SHAPES, "trainer.max_steps=2",
        "model.unet.model_channels=32", "model.unet.num_heads=2", "callbacks.sample_images.every_n_steps=2",
        "callbacks.sample_images.steps=2")
    return out


def test_shapes_experiments_train_and_the_benchmark_runs_end_to_end(tiny_shapes_run):
    out = tiny_shapes_run
    assert (out / "ldm" / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "ldm" / "images").glob("samples_*.png"))
    proc = run("scripts/attention_benchmark.py", "--run", str(out / "ldm"), "--seeds", "2", "--steps", "2",
               "--detector-images", "8", "--figures", str(out / "figures"), "--json", str(out / "report.json"))
    results = dict(re.findall(r"^RESULT (\S+)=(\S+)$", proc.stdout, flags=re.M))
    for name in ("detector_exact_train", "detector_exact_train_reconstructed", "faithful_seen", "faithful_heldout",
                 "pointing_colour_words", "pointing_shape_words", "pointing_colour_words_chance",
                 "iou_shape_words", "p2p_layout_iou", "resample_layout_iou", "p2p_new_colour",
                 "attend_excite_without_both_shown", "attend_excite_with_both_shown",
                 "negative_colour_shown_without", "negative_colour_shown_with"):
        assert name in results, (name, proc.stdout[-3000:])
    assert float(results["detector_exact_train"]) == 1.0  # the ground truth, whatever the model
    assert json.loads((out / "report.json").read_text())["attend_excite_samples"] == 2
    assert (out / "figures" / "shapes_attend_and_excite.png").is_file()
    assert (out / "figures" / "shapes_prompt_to_prompt.png").is_file()

    # One section at several Attend-and-Excite step sizes: the first keeps the plain names.
    proc = run("scripts/attention_benchmark.py", "--run", str(out / "ldm"), "--seeds", "2", "--steps", "2",
               "--sections", "attend_excite", "--attend-excite-scales", "20", "5")
    results = dict(re.findall(r"^RESULT (\S+)=(\S+)$", proc.stdout, flags=re.M))
    assert {"attend_excite_with_both_shown", "attend_excite_with_both_shown_scale5",
            "attend_excite_both_shown_gain_scale5"} <= results.keys()
    assert "faithful_seen" not in results and "seconds_detector" not in results


def test_benchmark_without_a_shapes_run_is_one_clear_error(tmp_path):
    proc = run("scripts/attention_benchmark.py", "--run", str(tmp_path), check=False)
    assert proc.returncode != 0 and "not found" in proc.stderr and "Traceback" not in proc.stderr
