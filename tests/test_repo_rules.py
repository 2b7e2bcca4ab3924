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


# torch.distributed calls that move data between ranks: only the communication modules may call them,
# so every collective runs on device tensors, without float64 (see openspeed/distributed/comm.py).
_COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
    "reduce", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "barrier", "monitored_barrier", "all_reduce_coalesced",
    "all_gather_tensor", "all_gather_tensor_autograd", "reduce_scatter_tensor_autograd",
}
_COMM_MODULES = {os.path.join("openspeed", "distributed", "comm.py"),
                 os.path.join("openspeed", "distributed", "context_parallel", "comm.py")}
_DIST_MODULES = {"torch.distributed", "torch.distributed._functional_collectives",
                 "torch.distributed.distributed_c10d"}


def stray_collectives(source: str) -> list[str]:
    """``line: call`` of every torch.distributed collective called in ``source``."""
    import ast

    tree = ast.parse(source)
    modules, functions = set(), set()  # local names bound to torch.distributed, or to its collectives
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in _DIST_MODULES and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in _DIST_MODULES:
                    modules.add(alias.asname or alias.name)
                elif node.module in _DIST_MODULES and alias.name in _COLLECTIVES:
                    functions.add(alias.asname or alias.name)

    def dotted(expr) -> str:
        return f"{dotted(expr.value)}.{expr.attr}" if isinstance(expr, ast.Attribute) else getattr(expr, "id", "?")

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            found.append(f"{node.lineno}: {func.id}")
        elif isinstance(func, ast.Attribute) and func.attr in _COLLECTIVES:
            owner = dotted(func.value)
            if owner in modules or owner in _DIST_MODULES:
                found.append(f"{node.lineno}: {owner}.{func.attr}")
    return found


def test_collectives_only_in_the_communication_modules():
    offenders = []
    for path in _python_files("openspeed"):
        rel = os.path.relpath(path, ROOT)
        if rel in _COMM_MODULES:
            continue
        with open(path, encoding="utf-8") as fh:
            offenders += [f"{rel}:{hit}" for hit in stray_collectives(fh.read())]
    assert offenders == []
    # The rule sees every spelling of a stray collective, and not the wrappers.
    stray = (
        "import torch.distributed as dist\nimport torch\n"
        "from torch.distributed import broadcast as bc\n"
        "from torch.distributed import _functional_collectives as funcol\n"
        "def step(x):\n    dist.all_reduce(x)\n    torch.distributed.barrier()\n    bc(x, 0)\n"
        "    funcol.all_gather_tensor(x, 0, None)\n    funcol.all_reduce(x, 'sum', None)\n"
        "    comm.all_reduce(x)\n    dist.get_rank()\n"
    )
    assert stray_collectives(stray) == ["6: dist.all_reduce", "7: torch.distributed.barrier", "8: bc",
                                        "9: funcol.all_gather_tensor", "10: funcol.all_reduce"]
