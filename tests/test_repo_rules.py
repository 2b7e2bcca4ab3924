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


# Words of the work tracker ("issue 6", "the model", "this session") that mean nothing to a
# reader of the project: docs, benchmark results and code describe features in their own words.
_TRACKER_WORDING = re.compile(
    r"\bissue\s*#?\s*\d+|\bthe issue(?:'s)?\b|\b(?:this|previous|next|last|earlier|later)\s+sessions?\b",
    re.IGNORECASE,
)


def test_no_tracker_wording_in_docs_and_code():
    paths = [os.path.join(ROOT, "README.md")]
    for folder in ("docs", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.join(dirpath, n) for n in files if n.endswith(".md")]
    for folder in ("openspeed", "benchmarks", "tests"):
        paths += list(_python_files(folder))
    offenders = []
    for path in paths:
        if path == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                # Bare "session" is a tracker word in prose; code keeps pytest's scope="session".
                prose = path.endswith(".md") and re.search(r"\bsessions?\b", line, re.IGNORECASE)
                if _TRACKER_WORDING.search(line) or prose:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert offenders == []
