import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests import the shared oracle helpers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
import cli  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The test models are tiny: one thread avoids the oversubscription that makes two-thread torch crawl when
# anything else shares the two cores (subprocess runs keep their own default).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # `slow` checks run only when selected (`-m slow`): the default run must stay within minutes on 2 cores.
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Runs of the real train.py shared by the end-to-end tests of several files: the README's own commands, run as
# written through bash in a folder laid out as the README assumes (tests/cli.py), with small sizes appended.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def project(tmp_path_factory, data_dir) -> Path:
    """The scripts and configs, and the inputs the README names: `shards/{00000..01023}.tar` (one sample each, in
    img2dataset's naming; a quarter of them undecodable, as in real crawled data), `my_images/`, `prompts.txt`,
    `photos/my_dog/`, `runs/dreambooth_demo/instance/`. `data/` is the session's emoji shard cache."""
    root = tmp_path_factory.mktemp("project")
    for name in ("train.py", "sample.py", "evaluate.py", "configs", "scripts"):
        (root / name).symlink_to(cli.ROOT / name)
    (root / "data").symlink_to(data_dir)
    (root / "shards").mkdir()
    image = np.full((32, 32, 3), 255, np.uint8)
    for i in range(1024):
        image[8:24, 8:24] = (i % 256, 80, 200)
        picture = os.urandom(300) if i % 4 == 0 else _png(image)
        with tarfile.open(root / "shards" / f"{i:05d}.tar", "w") as tar:
            for name, data in ((f"{i:05d}.png", picture), (f"{i:05d}.txt", f"square number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "my_images").mkdir()
    for i in range(3):
        Image.fromarray(image).save(root / "my_images" / f"img{i}.png")
        (root / "my_images" / f"img{i}.txt").write_text(f"picture {i}")
    (root / "prompts.txt").write_text("owl\nballoon\n")
    for folder in ("photos/my_dog", "runs/dreambooth_demo/instance"):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(image).save(root / folder / f"subject_{i}.png")
    return root


@pytest.fixture(scope="session")
def stage1(project) -> Path:
    cli.run_in_shell(project, cli.readme_command(r"experiment=emoji_autoencoder hydra.run.dir=runs/ae$"),
                     *cli.TINY_DATA, "trainer.max_steps=3", "model.log_images_every_n_steps=2")
    return project / "runs" / "ae"


@pytest.fixture(scope="session")
def stage2(project, stage1) -> Path:
    cli.run_in_shell(project, cli.readme_command(r"autoencoder.ckpt_path=\S+ hydra.run.dir=runs/ldm$"),
                     *cli.TINY_DATA, *cli.TINY_LDM, "trainer.max_steps=4", "logger=wandb")
    return project / "runs" / "ldm"
