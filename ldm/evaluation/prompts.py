"""Prompt sets for evaluation, read from a file.

    prompts.txt    one prompt per line (blank lines skipped)
    prompts.tsv    tab-separated with a header row and a ``caption`` column, e.g. MLPerf's COCO-2014 subset
    prompts.csv    (val2014_30k.tsv: image_id, id, caption): the captions, in file order; quoted fields work
"""

from __future__ import annotations

import csv
from pathlib import Path

CAPTION_COLUMN = "caption"


def read_prompts(path: str | Path) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts file not found: {file}")
    if file.suffix.lower() in (".tsv", ".csv"):
        delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if CAPTION_COLUMN not in (reader.fieldnames or []):
                raise ValueError(f"prompts file {file} has no '{CAPTION_COLUMN}' column (columns: {reader.fieldnames})")
            prompts = [" ".join(row[CAPTION_COLUMN].split()) for row in reader if (row[CAPTION_COLUMN] or "").strip()]
    else:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {file} holds no prompts")
    return prompts
