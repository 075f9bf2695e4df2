"""Measure the attention tools on the shapes model: where each word's cross-attention lands, whether a word swap
keeps the layout, whether Attend-and-Excite brings a neglected object back, what a negative prompt removes.

    python scripts/attention_benchmark.py --run DIR   # DIR: python train.py experiment=shapes_ldm hydra.run.dir=DIR
    python scripts/attention_benchmark.py             # trains both stages into --out first (train.py subprocesses)
        [--out runs/shapes] [--seeds 64] [--steps 50] [--figures docs] [--json FILE] [-- train.py overrides]
        [--sections p2p attend_excite ...] [--attend-excite-scales 20 5 1]

Every image is measured by the detector of `ldm.evaluation.shapes` (colour segmentation, connected components,
shape from moments), validated first on the ground-truth images. Sections, each ending in `RESULT name=value`:

1. detector: its agreement with the ground truth of the training, held-out and validation images, and on the
   autoencoder's reconstructions of the training images (what the decoder can draw at best).
2. faithfulness: share of samples that show exactly the prompted objects (colour and shape, nothing more), for
   one- and two-object prompts of seen and of held-out combinations; baseline: the same seeds sampled from the
   empty prompt, scored against the same prompts (a model that ignores the text).
3. localisation (`generate_with_attention_maps`): for each colour and shape word of a prompt whose object the
   sample shows, the pointing game (the argmax of the word's map, bilinearly upsampled, inside the object's
   mask) and the IoU of the map's top region (≥ half its range) with the mask. Chance of the pointing game:
   the mean share of the image the masks cover; IoU baseline: each map against the mask of another sample.
4. Prompt-to-Prompt replace (`prompt_to_prompt`): "a red circle" → "a blue circle", same seed. The share of
   edits whose object takes the new colour (and drops the old), and the IoU of the objects' masks (the layout)
   before and after; baseline: the target prompt re-sampled from the same seed without Prompt-to-Prompt.
5. Attend-and-Excite (`attend_and_excite`, on the two shape words) on two-object prompts: the share of samples
   showing both objects, without (plain sampling, the same seeds) and with, at each step size asked for.
6. negative prompts: "a circle" with the negative prompt "a red circle", against "a circle" alone: the share
   of samples showing the negated colour.

Only the public entry points are used: LatentDiffusionPipeline.from_checkpoint(...).generate(...) and the tools
of ldm.editing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.build_shapes import read_manifest, read_shapes_samples, split_shards  # noqa: E402
from ldm.run_folder import saved_config  # noqa: E402
from ldm.evaluation.shapes import (  # noqa: E402
    DetectorScore,
    ShapeDetector,
    find,
    foreground,
    is_faithful,
    mask_iou,
    pointing_hit,
    shows_all,
    top_region_iou,
    validate_detector,
)

# ---------------------------------------------------------------------------------------------- the run


def train(out: Path, overrides: list[str]) -> Path:
    """Both stages with train.py, as a user runs them; returns the stage-2 run folder."""
    autoencoder = out / "autoencoder" / "checkpoints" / "last.ckpt"
    stages = [("shapes_autoencoder", out / "autoencoder", []),
              ("shapes_ldm", out / "ldm", [f"autoencoder.ckpt_path={autoencoder}"])]
    for experiment, run_dir, extra in stages:
        command = [sys.executable, "train.py", f"experiment={experiment}", f"hydra.run.dir={run_dir}", *extra,
                   *overrides]
        print(f"$ python {' '.join(command[1:])}", flush=True)
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        seconds = time.time() - start
        steps = int(run_config(run_dir).trainer.max_steps)
        # Wall time of the whole command (start-up, data build, validation, checkpoints) over the steps taken.
        print(f"RESULT train_seconds_{experiment}={seconds:.0f}", flush=True)
        print(f"RESULT train_seconds_per_step_{experiment}={seconds / steps:.3f}", flush=True)
    return out / "ldm"


def run_config(run: Path):
    """The run's config, resolved as during the run."""
    cfg = saved_config(run)
    if cfg is None:
        sys.exit(f"error: {run / '.hydra' / 'config.yaml'} not found: --run takes the folder of `python train.py "
                 "experiment=shapes_ldm hydra.run.dir=DIR`")
    return cfg


def shapes_data(cfg) -> Path:
    """The run's shapes shards, built again if they are gone (the build is deterministic and idempotent)."""
    from hydra.utils import instantiate

    if "build_shapes" not in str(cfg.data.get("build", {}).get("_target_", "")):
        sys.exit("error: the run's data.build is not the shapes builder: train it with experiment=shapes_ldm")
    instantiate(cfg.data.build)()
    return Path(cfg.data.build.out_dir)


# ---------------------------------------------------------------------------------------------- helpers


def one(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def two(a: tuple[str, str], b: tuple[str, str]) -> str:
    return f"{one(*a)} and {one(*b)}"


def pairs(rng: np.random.Generator, first: list, second: list, n: int, distinct_words: bool) -> list:
    """n random ordered pairs of different combos (with distinct_words: different colours and shapes)."""
    out = []
    while len(out) < n:
        a, b = first[rng.integers(len(first))], second[rng.integers(len(second))]
        if a == b or (distinct_words and (a[0] == b[0] or a[1] == b[1])):
            continue
        out.append((a, b) if rng.random() < 0.5 else (b, a))
    return out


def rate(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def ci95(values) -> float:
    """Half-width of the normal-approximation 95 % interval of the mean (of rates, IoUs or paired differences)."""
    values = np.asarray(list(values), np.float64)
    return float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


SECTIONS = ("detector", "faithfulness", "localisation", "p2p", "attend_excite", "negative")


def result(name: str, value: float | int) -> None:
    print(f"RESULT {name}={value:.4f}" if isinstance(value, float) else f"RESULT {name}={value}", flush=True)


class Benchmark:
    def __init__(self, pipe, detector: ShapeDetector, seen: list, heldout: list, args):
        self.pipe, self.detector, self.seen, self.heldout, self.args = pipe, detector, seen, heldout, args
        self.options = dict(steps=args.steps, cfg_scale=args.cfg_scale, sampler="ddim")
        self.report: dict[str, float | int] = {}
        self.figures: dict[str, list] = {}

    def record(self, name: str, value: float | int) -> None:
        self.report[name] = value
        result(name, value)

    def generate(self, prompts: list[str], seed: int, **kwargs):
        """Image i from seed + i (pipe.generate's rule), in batches."""
        return self.pipe.generate(prompts, n=1, seed=seed, batch_size=self.args.batch_size,
                                  **{**self.options, **kwargs}).images

    # -- 1. the detector ---------------------------------------------------------------------------------------

    def detector_section(self, data: Path) -> None:
        print("\n== 1. detector against the ground truth", flush=True)
        rows = []
        for split in ("train", "heldout", "val"):
            shards = split_shards(data, split)
            if not shards:
                continue
            score = validate_detector(self.detector, read_shapes_samples(shards, limit=self.args.detector_images))
            rows.append((split, score))
        samples = list(read_shapes_samples(split_shards(data, "train"), limit=self.args.detector_images))
        # Samples are softer than drawings: the same images under a Gaussian blur.
        for radius in self.args.blur:
            blurred = [replace(s, image=np.asarray(Image.fromarray(s.image).filter(ImageFilter.GaussianBlur(radius))))
                       for s in samples]
            rows.append((f"train, blur {radius:g} px", validate_detector(self.detector, blurred)))
        # The autoencoder's reconstructions: the best the decoder can draw.
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
        autoencoder = self.pipe.autoencoder
        with torch.no_grad():
            rebuilt = torch.cat([autoencoder.decode(autoencoder.encode(x.to(self.pipe.device)).mode()).cpu()
                                 for x in images.split(64)])
        score = DetectorScore()
        for s, image in zip(samples, rebuilt):
            score.add(self.detector(image), s.objects, s.mask)
        rows.append(("train, reconstructed", score))
        print(f"{'images':24s} {'n':>5s} {'exact':>7s} {'count':>7s} {'found':>7s} {'colour':>7s} {'shape':>7s} "
              f"{'mask IoU':>8s}")
        for name, score in rows:
            r = score.rates()
            print(f"{name:24s} {score.images:5d} {r['exact']:7.3f} {r['count']:7.3f} {r['found']:7.3f} "
                  f"{r['colour']:7.3f} {r['shape']:7.3f} {r['mask_iou']:8.3f}")
            key = name.replace(", reconstructed", "_reconstructed").replace(", blur ", "_blur").replace(" px", "px")
            for metric in ("exact", "colour", "shape", "count"):
                self.record(f"detector_{metric}_{key}", r[metric])
        self.record("detector_images", rows[0][1].images)

    # -- 2. faithfulness ---------------------------------------------------------------------------------------

    def faithfulness_section(self) -> None:
        print("\n== 2. faithfulness: the sample shows exactly the prompted objects", flush=True)
        n, rng = self.args.seeds, np.random.default_rng(2)
        groups = {
            "seen_one": [[c] for c in self.seen] * -(-n // len(self.seen)),
            "heldout_one": [[c] for c in self.heldout] * -(-n // max(len(self.heldout), 1)) if self.heldout else [],
            "seen_two": [list(p) for p in pairs(rng, self.seen, self.seen, n, False)],
            "heldout_two": [list(p) for p in pairs(rng, self.heldout, self.seen + self.heldout, n, False)]
            if self.heldout else [],
        }
        print(f"{'prompts':14s} {'n':>5s} {'faithful':>9s} {'all shown':>9s} {'empty-prompt baseline':>22s}")
        totals = defaultdict(list)
        for name, objects in groups.items():
            if not objects:
                continue
            prompts = [one(*o[0]) if len(o) == 1 else two(*o) for o in objects]
            seed = 1000 * (1 + list(groups).index(name))
            images = self.generate(prompts, seed)
            uncond = self.generate([""] * len(prompts), seed)
            found = [self.detector(im) for im in images]
            faithful = [is_faithful(d, o) for d, o in zip(found, objects)]
            shown = [shows_all(d, o) for d, o in zip(found, objects)]
            chance = [is_faithful(self.detector(im), o) for im, o in zip(uncond, objects)]
            print(f"{name:14s} {len(prompts):5d} {rate(faithful):9.3f} {rate(shown):9.3f} {rate(chance):22.3f}")
            self.record(f"faithful_{name}", rate(faithful))
            self.record(f"all_shown_{name}", rate(shown))
            self.record(f"faithful_{name}_empty_prompt", rate(chance))
            self.record(f"faithful_{name}_samples", len(prompts))
            totals[name.split("_")[0]] += faithful
            self.figures.setdefault("faithfulness", []).append((prompts[:4], images[:4], faithful[:4]))
        for split, values in totals.items():
            self.record(f"faithful_{split}", rate(values))

    # -- 3. localisation -----------------------------------------------------------------------------------------

    def localisation_section(self) -> None:
        from ldm.editing import generate_with_attention_maps, token_indices

        print("\n== 3. localisation: each word's cross-attention map against its object's mask", flush=True)
        n, rng = self.args.seeds, np.random.default_rng(3)
        objects = [[self.seen[rng.integers(len(self.seen))]] for _ in range(n // 2)]
        objects += [list(p) for p in pairs(rng, self.seen, self.seen, n - n // 2, True)]
        per_word = defaultdict(lambda: defaultdict(list))  # kind → measure → values
        by_word = defaultdict(list)
        kept = []  # (map, mask, kind) for the shuffled baseline
        drawn = 0
        for i, prompt_objects in enumerate(objects):
            prompt = one(*prompt_objects[0]) if len(prompt_objects) == 1 else two(*prompt_objects)
            res, maps, _ = generate_with_attention_maps(self.pipe, prompt, seed=3000 + i, keep="all",
                                                        **self.options)
            detections = self.detector(res.images[0])
            if "maps" not in self.figures and len(prompt_objects) == 2 and shows_all(detections, prompt_objects):
                self.figures["maps"] = [(prompt, res.images[0], maps)]  # the first two-object sample drawn right
            for colour, shape in prompt_objects:
                obj = find(detections, colour, shape)
                if obj is None:
                    continue
                drawn += 1
                for kind, word in (("colour", colour), ("shape", shape)):
                    positions = token_indices(self.pipe.conditioner, prompt, [word])
                    word_map = maps[positions].mean(dim=0)  # (h, w)
                    hit, iou = pointing_hit(word_map, obj.mask), top_region_iou(word_map, obj.mask)
                    per_word[kind]["hit"].append(hit)
                    per_word[kind]["iou"].append(iou)
                    per_word[kind]["area"].append(obj.mask.mean())
                    by_word[word].append(hit)
                    kept.append((word_map, obj.mask, kind))
        print(f"{'words':8s} {'n':>5s} {'pointing':>15s} {'chance':>7s} {'IoU':>15s} {'shuffled':>9s}")
        for kind in ("colour", "shape"):
            values = per_word[kind]
            own = [k for k in kept if k[2] == kind]
            # Each map against the mask of the next sample's object of the same word kind.
            shuffled = [top_region_iou(m, own[(j + 1) % len(own)][1]) for j, (m, _, _) in enumerate(own)] if own else []
            print(f"{kind:8s} {len(values['hit']):5d} {rate(values['hit']):7.3f} ± {ci95(values['hit']):5.3f} "
                  f"{rate(values['area']):7.3f} {rate(values['iou']):7.3f} ± {ci95(values['iou']):5.3f} "
                  f"{rate(shuffled):9.3f}")
            self.record(f"pointing_{kind}_words", rate(values["hit"]))
            self.record(f"pointing_{kind}_words_chance", rate(values["area"]))
            self.record(f"iou_{kind}_words", rate(values["iou"]))
            self.record(f"iou_{kind}_words_shuffled", rate(shuffled))
            self.record(f"localisation_{kind}_words_samples", len(values["hit"]))
        print("per word: " + ", ".join(f"{w} {rate(v):.2f} (n={len(v)})" for w, v in sorted(by_word.items())))
        for word, values in sorted(by_word.items()):
            self.record(f"pointing_word_{word}", rate(values))
        self.record("localisation_prompts", len(objects))
        self.record("localisation_objects_drawn", drawn)

    # -- 4. Prompt-to-Prompt -------------------------------------------------------------------------------------

    def p2p_section(self) -> None:
        from ldm.editing import prompt_to_prompt

        print("\n== 4. Prompt-to-Prompt replace: swap the colour word, same seed", flush=True)
        n, rng = self.args.seeds, np.random.default_rng(4)
        colours = sorted({c for c, _ in self.seen})
        edits = []
        while len(edits) < n:
            colour, shape = self.seen[rng.integers(len(self.seen))]
            targets = [c for c in colours if c != colour and (c, shape) in self.seen]
            if targets:
                edits.append((colour, targets[rng.integers(len(targets))], shape))
        seed = 4000
        targets = self.generate([one(new, shape) for _, new, shape in edits], seed)
        measures = defaultdict(list)
        for i, (old, new, shape) in enumerate(edits):
            res = prompt_to_prompt(self.pipe, one(old, shape), one(new, shape), edit="replace", seed=seed + i,
                                   **self.options)
            source, edited, resampled = (self.detector(im) for im in (res.images[0], res.images[1], targets[i]))
            if not source:
                continue  # no layout to keep
            size = res.images.shape[-2:]
            layout = foreground(source, size)
            for name, dets in (("p2p", edited), ("resample", resampled)):
                measures[f"{name}_new_colour"].append(find(dets, new) is not None and find(dets, old) is None)
                measures[f"{name}_layout_iou"].append(mask_iou(layout, foreground(dets, size)))
            if len(self.figures.get("p2p", [])) < 6:
                self.figures.setdefault("p2p", []).append(
                    ((one(old, shape), one(new, shape)), (res.images[0], res.images[1], targets[i]),
                     (measures["p2p_layout_iou"][-1], measures["resample_layout_iou"][-1])))
        count = len(measures["p2p_new_colour"])
        print(f"{'':22s} {'n':>5s} {'new colour':>11s} {'layout IoU':>17s}")
        for name, label in (("p2p", "Prompt-to-Prompt"), ("resample", "re-sampled target")):
            print(f"{label:22s} {count:5d} {rate(measures[f'{name}_new_colour']):11.3f} "
                  f"{rate(measures[f'{name}_layout_iou']):9.3f} ± {ci95(measures[f'{name}_layout_iou']):5.3f}")
            self.record(f"{name}_new_colour", rate(measures[f"{name}_new_colour"]))
            self.record(f"{name}_layout_iou", rate(measures[f"{name}_layout_iou"]))
        gain = np.subtract(measures["p2p_layout_iou"], measures["resample_layout_iou"])
        print(f"layout IoU gain of Prompt-to-Prompt over re-sampling, same seeds: {rate(gain):.3f} ± {ci95(gain):.3f}")
        self.record("p2p_layout_iou_gain", rate(gain))
        self.record("p2p_layout_iou_gain_ci95", ci95(gain))
        self.record("p2p_samples", count)
        self.record("p2p_pairs_without_source_object", len(edits) - count)

    # -- 5. Attend-and-Excite -------------------------------------------------------------------------------------

    def attend_excite_section(self) -> None:
        print("\n== 5. Attend-and-Excite on two-object prompts (on the two shape words)", flush=True)
        n, rng = self.args.seeds, np.random.default_rng(5)
        objects = [list(p) for p in pairs(rng, self.seen, self.seen, n, True)]
        prompts = [two(*o) for o in objects]
        seed = 5000
        without = self.generate(prompts, seed)
        for scale in self.args.attend_excite_scales:
            self.attend_excite_at(scale, prompts, objects, seed, without)

    def attend_excite_at(self, scale: float, prompts: list[str], objects: list, seed: int, without: list) -> None:
        """One step size (A&E's scale_factor; 20 is the reference's, made for SD's 64×64 latents). Results of
        the first scale have plain names, the others end in _scale<s>."""
        from ldm.editing import attend_and_excite
        from ldm.editing.attend_excite import DEFAULT_THRESHOLDS

        first = scale == self.args.attend_excite_scales[0]
        suffix = "" if first else f"_scale{scale:g}"
        print(f"-- step size (scale_factor) {scale:g}", flush=True)
        shown, losses = defaultdict(list), []
        for i, (prompt, objs) in enumerate(zip(prompts, objects)):
            res, loss = attend_and_excite(self.pipe, prompt, [objs[0][1], objs[1][1]], seed=seed + i,
                                          scale_factor=scale, **self.options)
            losses.append(loss)
            for name, image in (("without", without[i]), ("with", res.images[0])):
                dets = self.detector(image)
                shown[f"{name}_both"].append(shows_all(dets, objs))
                shown[f"{name}_faithful"].append(is_faithful(dets, objs))
                shown[f"{name}_two_objects"].append(len(dets) >= 2)
            if first and len(self.figures.get("ae", [])) < 8:
                self.figures.setdefault("ae", []).append(
                    (prompt, without[i], res.images[0], shown["without_both"][-1], shown["with_both"][-1]))
        print(f"{'':22s} {'n':>5s} {'both shown':>11s} {'exactly':>8s} {'2+ objects':>11s}")
        for name in ("without", "with"):
            print(f"{name + ' A&E':22s} {len(prompts):5d} {rate(shown[f'{name}_both']):11.3f} "
                  f"{rate(shown[f'{name}_faithful']):8.3f} {rate(shown[f'{name}_two_objects']):11.3f}")
            if first or name == "with":
                self.record(f"attend_excite_{name}_both_shown{suffix}", rate(shown[f"{name}_both"]))
                self.record(f"attend_excite_{name}_faithful{suffix}", rate(shown[f"{name}_faithful"]))
        gain = np.subtract(shown["with_both"], shown["without_both"], dtype=float)
        print(f"both shown, with minus without, same seeds: {rate(gain):+.3f} ± {ci95(gain):.3f} "
              f"({int((gain > 0).sum())} seeds gained the missing object, {int((gain < 0).sum())} lost one)")
        self.record(f"attend_excite_both_shown_gain{suffix}", rate(gain))
        self.record(f"attend_excite_both_shown_gain_ci95{suffix}", ci95(gain))
        # What it does to its own objective: 1 − the weaker subject's smoothed peak attention, after the
        # refinement at each threshold step (targets 0.95, 0.5, 0.2 at steps 0, 10, 20).
        for step in sorted(DEFAULT_THRESHOLDS):
            values = [x[step] for x in losses if len(x) > step and np.isfinite(x[step])]
            if values:
                print(f"A&E loss at step {step} (target {1 - DEFAULT_THRESHOLDS[step]:.2f}): {rate(values):.3f}")
                self.record(f"attend_excite_loss_step{step}{suffix}", rate(values))
        if first:
            self.record("attend_excite_samples", len(prompts))

    # -- 6. negative prompts -------------------------------------------------------------------------------------

    def negative_section(self) -> None:
        print('\n== 6. negative prompts: "a <shape>" with and without the negative prompt "a <colour> <shape>"',
              flush=True)
        n = self.args.seeds
        cases = self.seen * -(-n // len(self.seen))
        prompts = [f"a {shape}" for _, shape in cases]
        seed = 6000
        plain = self.generate(prompts, seed)
        negated = self.generate(prompts, seed, negative_prompt=[one(c, s) for c, s in cases])
        shows = {name: [find(self.detector(im), colour) is not None for im, (colour, _) in zip(images, cases)]
                 for name, images in (("without", plain), ("with", negated))}
        print(f"{'':30s} {'n':>5s} {'negated colour shown':>21s}")
        for name in ("without", "with"):
            print(f"{name + ' the negative prompt':30s} {len(cases):5d} {rate(shows[name]):21.3f}")
            self.record(f"negative_colour_shown_{name}", rate(shows[name]))
        change = np.subtract(shows["with"], shows["without"], dtype=float)
        print(f"negated colour shown, with minus without, same seeds: {rate(change):+.3f} ± {ci95(change):.3f}")
        self.record("negative_colour_shown_change", rate(change))
        self.record("negative_colour_shown_change_ci95", ci95(change))
        self.record("negative_samples", len(cases))


# ---------------------------------------------------------------------------------------------- figures


def write_figures(bench: Benchmark, out: Path) -> None:
    from ldm.editing import attention_figure, content_positions
    from ldm.images import labelled_grid, to_pil

    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "maps" in bench.figures:
        prompt, image, maps = bench.figures["maps"][0]
        labels = bench.pipe.conditioner.token_strings(prompt)
        content = content_positions(bench.pipe.conditioner, prompt)
        attention_figure(image, maps[content], [labels[p] for p in content], cell_size=96).save(
            out / "shapes_attention_maps.png")
        written.append("shapes_attention_maps.png")
    if "p2p" in bench.figures:
        cells, labels = [], []
        for (source, target), images, (iou_p2p, iou_resampled) in bench.figures["p2p"][:4]:
            cells += to_pil(torch.stack(images))
            labels += [source, f"{target.split()[1]}: P2P {iou_p2p:.2f}", f"re-sampled {iou_resampled:.2f}"]
        labelled_grid(cells, labels, ncol=3 * 2, cell=96).save(out / "shapes_prompt_to_prompt.png")
        written.append("shapes_prompt_to_prompt.png")
    if "ae" in bench.figures:
        entries = bench.figures["ae"][:8]
        cells = to_pil(torch.stack([e[1] for e in entries])) + to_pil(torch.stack([e[2] for e in entries]))
        labels = [("both" if e[3] else "missing") for e in entries] + [("A&E: both" if e[4] else "A&E: missing")
                                                                        for e in entries]
        labelled_grid(cells, labels, ncol=len(entries), cell=96).save(out / "shapes_attend_and_excite.png")
        (out / "shapes_attend_and_excite.txt").write_text("\n".join(e[0] for e in entries) + "\n")
        written.append("shapes_attend_and_excite.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path,
                        help="stage-2 run folder (python train.py experiment=shapes_ldm hydra.run.dir=DIR)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "shapes", help="where to train without --run")
    parser.add_argument("--ckpt", default="last.ckpt", help="checkpoint file name in RUN/checkpoints")
    parser.add_argument("--seeds", type=int, default=64, help="samples per measured condition (at least)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's sampling setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--detector-images", type=int, default=512, help="ground-truth images per split")
    parser.add_argument("--blur", type=float, nargs="*", default=[1.0, 1.5],
                        help="Gaussian blur radii (px) under which the detector is also validated")
    parser.add_argument("--attend-excite-scales", type=float, nargs="+", default=[20.0],
                        help="Attend-and-Excite step sizes (scale_factor) to measure; the first gets the plain "
                             "RESULT names (20: the reference's)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the sections to run (default: all)")
    parser.add_argument("--figures", type=Path, default=None, help="write the docs figures into this folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the RESULT values here")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both stages (without --run)")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)

    from ldm.pipeline import LatentDiffusionPipeline

    run = args.run.resolve() if args.run else train(args.out.resolve(), args.overrides)
    ckpt = run / "checkpoints" / args.ckpt
    if not ckpt.is_file():
        sys.exit(f"error: checkpoint not found: {ckpt}")
    data = shapes_data(run_config(run))
    manifest = read_manifest(data)
    seen = [tuple(c.split()) for c in manifest["seen_combos"]]
    heldout = [tuple(c.split()) for c in manifest["heldout_combos"]]
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    detector = ShapeDetector(colours=manifest["options"]["colours"])
    print(f"model {ckpt}; data {data}: seen {len(seen)} combinations, held out {[' '.join(c) for c in heldout]}; "
          f"{args.steps} DDIM steps, guidance {args.cfg_scale or pipe.defaults.get('cfg_scale')}, "
          f"{torch.get_num_threads()} threads", flush=True)

    bench = Benchmark(pipe, detector, seen, heldout, args)
    sections = [getattr(bench, f"{name}_section") for name in SECTIONS if name in args.sections]
    for section in sections:
        start = time.time()
        section(data) if section == bench.detector_section else section()
        result(f"seconds_{section.__name__.replace('_section', '')}", round(time.time() - start))
    if args.figures:
        write_figures(bench, args.figures)
    if args.json:
        args.json.write_text(json.dumps(bench.report, indent=2) + "\n")
    result("benchmark_seconds", round(time.time() - started))


if __name__ == "__main__":
    main()
