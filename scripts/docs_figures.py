"""The attention figures in docs/, made from the quick start's emoji model with sample.py, as a user would.

    python scripts/docs_figures.py [--ckpt runs/quickstart/ldm/checkpoints/last.ckpt] [--docs docs]

1. docs/attention_maps.png: one caption's image and the cross-attention map of each of its tokens.
2. docs/prompt_to_prompt.png: a Prompt-to-Prompt replace edit that swaps one word of a training caption.
3. docs/attend_and_excite.png: a two-subject prompt, four seeds, without Attend-and-Excite (top) and with it
   (bottom). "Without" is the same code path with no step altered (attend_excite.max_iter_to_alter=0) and
   thresholds of 0, which the loss always meets, so nothing is refined: both rows start from the same noise.
Each sample.py command is printed before it runs; the runs themselves go to --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTENTION_PROMPT = "smiling face with sunglasses"
EDIT = ("flag of Japan", "flag of Denmark")
TWO_SUBJECTS = ("pig and elephant", ["pig", "elephant"])


def sample(ckpt: Path, out: Path, *overrides: str) -> None:
    command = [sys.executable, "sample.py", f"ckpt={ckpt}", f"out={out}", "progress=false", *overrides]
    print("$ python " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=ROOT / "runs" / "quickstart" / "ldm" / "checkpoints" / "last.ckpt")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "docs_figures")
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the Attend-and-Excite comparison")
    args = parser.parse_args()
    ckpt, docs, work = args.ckpt.resolve(), args.docs.resolve(), args.work.resolve()
    if not ckpt.is_file():
        sys.exit(f"error: checkpoint not found: {ckpt} (run python scripts/quickstart.py first)")
    docs.mkdir(parents=True, exist_ok=True)

    sample(ckpt, work / "attention", f'prompt="{ATTENTION_PROMPT}"', "attention_maps=true", "seed=0")
    shutil.copy(work / "attention" / "attention_0.png", docs / "attention_maps.png")

    source, target = EDIT
    sample(ckpt, work / "p2p", f'prompt="{source}"', f'target_prompt="{target}"', "edit=replace", "seed=0")
    shutil.copy(work / "p2p" / "edit_0.png", docs / "prompt_to_prompt.png")

    prompt, words = TWO_SUBJECTS
    (work / "ae").mkdir(parents=True, exist_ok=True)
    prompts_file = work / "ae" / "prompts.txt"
    prompts_file.write_text(f"{prompt}\n" * args.seeds)  # prompt i samples seed 0 + i
    tokens = "[" + ",".join(words) + "]"
    rows = {}
    for name, extra in (("without", ["attend_excite.max_iter_to_alter=0", "attend_excite.thresholds={0:0.0,10:0.0,20:0.0}"]), ("with", [])):
        sample(ckpt, work / "ae" / name, f"prompts_file={prompts_file}", f"attend_excite.tokens={tokens}",
               "seed=0", *extra)
        rows[name] = [work / "ae" / name / f"{i:04d}.png" for i in range(args.seeds)]
    losses = {name: [json.loads(line)["losses"] for line in open(work / "ae" / name / "metadata.jsonl")]
              for name in rows}

    from PIL import Image

    from ldm.images import labelled_grid

    images = [Image.open(p) for p in rows["without"] + rows["with"]]
    labels = [f"seed {i}" for i in range(args.seeds)] + [f"seed {i}, A&E" for i in range(args.seeds)]
    labelled_grid(images, labels, ncol=args.seeds, cell=96).save(docs / "attend_and_excite.png")
    # The loss (1 − the weakest subject's peak attention) at the last threshold step, without and with.
    last = max(int(k) for k in (20, 10, 0) if k < len(losses["with"][0]))
    for i in range(args.seeds):
        print(f"RESULT attend_excite_loss_step{last}_seed{i} without={losses['without'][i][last]:.3f} "
              f"with={losses['with'][i][last]:.3f}")
    print(f"wrote {docs / 'attention_maps.png'}, {docs / 'prompt_to_prompt.png'}, {docs / 'attend_and_excite.png'}")


if __name__ == "__main__":
    main()
