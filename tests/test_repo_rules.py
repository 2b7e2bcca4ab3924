"""Project rules that are cheap to check mechanically."""

import dataclasses
import os
import re

from openspeed.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_files(folder):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def test_no_torch_cuda_outside_the_accelerator():
    offenders = []
    for path in _python_files("openspeed"):
        if path.endswith(os.path.join("openspeed", "accelerator.py")):
            continue
        with open(path, encoding="utf-8") as fh:
            if re.search(r"torch\.cuda\b", fh.read()):
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_every_config_key_is_documented():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as fh:
        doc = fh.read()
    from openspeed.models.families import families

    cfg = RunConfig()
    sections = [(section.name, type(getattr(cfg, section.name))) for section in dataclasses.fields(cfg)]
    sections += [(family.name, family.section) for family in families() if family.section is not None]
    assert any(name == "wan" for name, _ in sections)
    missing = []
    for name, section in sections:
        for key in dataclasses.fields(section):
            if f"`{name}.{key.name}`" not in doc:
                missing.append(f"{name}.{key.name}")
    assert missing == []
