"""The one-loop core: families plug in through their spec, own their config keys, and every key a
family accepts does what it says.

Repo rules (the generic core names no family; no import cycles), config ownership (old spellings,
cross-family keys, parts, refusals, earlier runs' config.yaml), and end-to-end runs: a Wan run at
dp_shard=2 with ``model.freeze``, ``profile.*``, ``train.eval_interval`` and optimization level 0
against one process at level 2; a Qwen2.5-VL run with ``train.ema_decay`` exported with ``--ema``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from _train_utils import ROOT, make_tiny_run_config, read_metrics, run_train, train_losses

from openspeed.config import load_config
from openspeed.errors import ConfigError
from openspeed.models.families import families

PACKAGE = os.path.join(ROOT, "openspeed")


def _modules() -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The openspeed modules ``path`` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import submodule`` needs the submodule; ``from mod import name`` the module.
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [node.module, *subs]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_generic_core_names_no_family():
    family_packages = {name for name in os.listdir(os.path.join(PACKAGE, "models"))
                       if os.path.isfile(os.path.join(PACKAGE, "models", name, "family.py"))}
    assert {"qwen2_5_vl", "wan"} <= family_packages
    names = {f.name for f in families()} | {t for f in families() for t in f.model_types}
    modules = _modules()
    core = [p for m, p in modules.items() if m.startswith("openspeed.training.")]
    core += [os.path.join(PACKAGE, "cli.py"), os.path.join(PACKAGE, "config.py")]
    offenders = []
    for path in core:
        for module in _imports(path, modules):
            parts = module.split(".") + ["", ""]
            if (parts[1] == "models" and parts[2] in family_packages) or (
                    parts[1] == "tasks" and module not in ("openspeed.tasks", "openspeed.tasks.base")):
                offenders.append(f"{os.path.relpath(path, ROOT)} imports {module}")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} names the family {node.value!r}")
    assert offenders == []


def test_lora_and_data_import_no_training_or_task_and_the_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    def area(module: str) -> str:
        return (module.split(".") + [""])[1]

    upward = [f"{m} -> {d}" for m, deps in graph.items() if area(m) in ("lora", "data")
              for d in deps if area(d) in ("training", "tasks")]
    assert upward == []
    # Depth-first search for a back edge; report one cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


def test_config_front_door_runs_before_torch(tmp_path):
    """A Wan key on the shapes demo (old or new spelling) is one line, exit 2, before torch loads."""
    script = (
        "import sys\n"
        "from openspeed.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    demo = os.path.join(ROOT, "examples", "qwen2_5_vl", "shapes_demo.yaml")
    for key in ("data.caption_dropout=0.2", "wan.caption_dropout=0.2"):
        result = subprocess.run([sys.executable, "-c", script, "train", demo, key, f"train.run_dir={tmp_path}/r"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        spelled = key.split("=")[0]
        assert f"error: {spelled}: a wan key" in result.stderr and "qwen2_5_vl model" in result.stderr


def test_family_keys_parts_and_refusals(shapes_dir, tmp_path):
    model = os.path.join(shapes_dir, "model")
    vlm = load_config(None, [f"model.path={model}"])
    assert vlm.family == "qwen2_5_vl" and "wan" not in vlm.to_dict()
    assert vlm.model.lora.targets[:2] == ["q_proj", "k_proj"]  # the family's default
    with pytest.raises(ConfigError, match=r"^model.freeze: unknown part 'dit' for a qwen2_5_vl model \(choose "
                                          r"from vision, merger, llm\)$"):
        load_config(None, [f"model.path={model}", "model.freeze=dit"])
    with pytest.raises(ConfigError, match=r"^data.generate_jitter: a wan key"):
        load_config(None, [f"model.path={model}", "data.generate_jitter=1"])
    with pytest.raises(ConfigError, match="the same key"):
        load_config(None, ["data.text_len=4", "wan.text_len=4"])
    with pytest.raises(ConfigError, match=r"^data.generate_text_layers: the moving_shapes generator does not read it$"):
        load_config(None, ["data.generate=moving_shapes", "data.generate_text_layers=3",
                           f"model.path={tmp_path}/none"])
    with pytest.raises(ConfigError, match=r"^data.generate: unknown generator 'nope' \(known: llava_shapes, moving_shapes, qwen2_vl_shapes, shapes\)$"):
        load_config(None, ["data.generate=nope"])
    wan = load_config(None, ["data.generate=moving_shapes", f"model.path={tmp_path}/none", "data.text_len=6",
                             "train.flow_shift=2", "model.freeze=head,blocks"])
    assert wan.family == "wan" and wan.wan.text_len == 6 and wan.wan.flow_shift == 2.0
    assert wan.to_dict()["wan"]["text_len"] == 6 and "text_len" not in wan.to_dict()["data"]
    for key, match in [("data.packing=true", "data.packing: not available for wan runs"),
                       ("parallel.pp=2", "parallel.pp: not available for wan runs"),
                       ("train.eval_blank_images=true", "eval_blank_images: not available for wan runs"),
                       ("model.freeze=vision", "unknown part 'vision' for a wan model")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["data.generate=moving_shapes", f"model.path={tmp_path}/none", key])

    # A config.yaml an earlier version wrote: every key at its default, the Wan ones among the
    # generic sections, the Wan LoRA targets as the default for every family.
    old = {"model": {"path": model, "vae": "pipeline", "freeze": [], "lora": {
               "rank": 0, "targets": ["self_attn.*_proj", "cross_attn.*_proj", "ffn.fc1", "ffn.fc2"]}},
           "data": {"train_path": "t.jsonl", "video_buckets": ["81x480x832"], "frame_interval": 1, "text_len": 512,
                    "caption_dropout": 0.1, "generate_jitter": 3.0, "generate_dit": {}},
           "train": {"flow_shift": 5.0, "timestep_sampling": "uniform", "ema_decay": None}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    run_cfg = load_config(str(path), run_config=True)
    assert run_cfg.family == "qwen2_5_vl" and run_cfg.model.lora.targets[0] == "q_proj"
    with pytest.raises(ConfigError, match="a wan key"):
        load_config(str(path))  # the same keys set by a user are refused


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openspeed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_the_registered_commands():
    result = _cli("--help")
    assert result.returncode == 0
    for verb in ("train CONFIG", "generate --checkpoint", "data shapes", "data moving-shapes",
                 "data tiny-wan-pipeline", "data extract-features"):
        assert verb in result.stdout
    bad = _cli("data", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown sub-command 'nope'" in bad.stderr


FRAMES, HEIGHT, WIDTH = 5, 16, 32


def _wan_config(root, pipeline: str, clips: str, name: str, **sections) -> str:
    cfg = {
        "model": {"path": pipeline},
        "data": {"train_path": clips, "val_path": clips},
        "wan": {"video_buckets": [f"{FRAMES}x{HEIGHT}x{WIDTH}"], "text_len": 8, "caption_dropout": 0.25,
                "flow_shift": 3.0, "val_sigmas": [0.3, 0.7]},
        "train": {"run_dir": str(root / name), "max_steps": 3, "seed": 11, "micro_batch_size": 2,
                  "global_batch_size": 4, "eval_interval": 2, "eval_max_samples": 5, "peak_tflops": 0.01},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"interval": 0, "save_final": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_wan_keys_do_what_they_say(tmp_path):
    from openspeed.models.wan.moving_shapes import make_moving_shapes, vocabulary
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    pipeline = str(write_tiny_wan_pipeline(tmp_path / "pipe", words=vocabulary(), seed=4, transformer=dict(
        num_attention_heads=2, attention_head_dim=32, ffn_dim=128)))
    clips = str(make_moving_shapes(tmp_path / "clips", 6, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=5))
    freeze = {"path": pipeline, "freeze": ["head", "condition_embed"]}
    dp2 = _wan_config(tmp_path, pipeline, clips, "dp2", model=freeze, train={"optimization_level": 0},
                      profile={"enabled": True, "step_start": 2, "step_end": 2})
    result = run_train(dp2, "--nproc", "2", "parallel.dp_shard=2")
    assert result.returncode == 0, result.stderr[-3000:]
    one = _wan_config(tmp_path, pipeline, clips, "one", model=freeze, train={"optimization_level": 2})
    reference = run_train(one)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # optimization_level: 0 runs torch's AdamW, 2 the fused step; both train to the same losses.
    runs = {name: read_metrics(str(tmp_path / name)) for name in ("dp2", "one")}
    (start_dp2,) = [r for r in runs["dp2"] if "optimizer" in r]
    (start_one,) = [r for r in runs["one"] if "optimizer" in r]
    assert (start_dp2["optimizer"], start_dp2["fused_ops"], start_dp2["family"]) == ("AdamW", False, "wan")
    assert (start_one["optimizer"], start_one["optimizer_fast"], start_one["fused_ops"]) == ("AdamWEMA", True, True)
    got, ref = train_losses(str(tmp_path / "dp2")), train_losses(str(tmp_path / "one"))
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-4)
    norms = {name: {r["step"]: r["grad_norm"] for r in recs if "loss" in r} for name, recs in runs.items()}
    for step in (1, 2, 3):
        assert norms["dp2"][step] == pytest.approx(norms["one"][step], rel=1e-4)

    # MFU: every step reports its FLOP rate against train.peak_tflops.
    steps = [r for r in runs["dp2"] if "loss" in r]
    assert all(r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.01, rel=1e-9) for r in steps)
    assert all(r["samples"] == 4 for r in steps)

    # eval_interval: validation at step 2 and at the end, the same on both layouts (fixed draws).
    vals = {name: {r["step"]: r for r in recs if "val_loss" in r} for name, recs in runs.items()}
    assert sorted(vals["dp2"]) == [2, 3] and vals["dp2"][3]["val_samples"] == 5
    for step in (2, 3):
        assert vals["dp2"][step]["val_loss"] == pytest.approx(vals["one"][step]["val_loss"], rel=1e-4)
        assert set(vals["dp2"][step]["val_loss_sigma"]) == {"0.3", "0.7"}
    assert vals["dp2"][3]["val_loss"] != vals["dp2"][2]["val_loss"]  # the model moved

    # profile.*: a trace of step 2 from rank 0 only (profile.ranks defaults to [0]).
    traces = sorted(os.listdir(tmp_path / "dp2" / "profile"))
    assert traces == ["trace_rank0_steps2-2.json"]

    # model.freeze: the frozen parts keep the pipeline's weights; the rest trained.
    from safetensors.torch import load_file

    from openspeed.models.wan.generate import load_trained_dit

    trained = dict(load_trained_dit(str(tmp_path / "dp2"), ema=False).model.named_parameters())
    from openspeed.models.wan.convert import hf_to_native
    from openspeed.models.wan.spec import part_of

    config = load_trained_dit(str(tmp_path / "dp2")).config
    start = hf_to_native(load_file(os.path.join(pipeline, "transformer", "diffusion_pytorch_model.safetensors")),
                         config)
    moved = {part_of(n): False for n in trained}
    for name, param in trained.items():
        if not torch.equal(param.detach(), start[name]):
            moved[part_of(name)] = True
    assert moved == {"patch_embed": True, "condition_embed": False, "blocks": True, "head": False}


def test_vlm_ema_is_kept_and_exported(warm_shapes_dir, reference_run, tmp_path):
    from safetensors.torch import load_file

    from openspeed.training.export import export_run

    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir, train={"max_steps": 3, "ema_decay": 0.5},
                                  checkpoint={"save_final": True})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = str(tmp_path / "run")
    state = json.loads(open(os.path.join(run_dir, "checkpoints", "step_3", "train_state.json")).read())
    assert state["ema"] is True
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    export_run(run_dir, plain, to="hf")
    assert "Hugging Face-format" in export_run(run_dir, averaged, to="hf", ema=True)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(averaged / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6  # the average lags the weights
    # A run without train.ema_decay has none to export: one line, exit 2.
    ref_dir, _ = reference_run
    refused = _cli("convert", ref_dir, "--to", "hf", "--out", str(tmp_path / "x"), "--ema")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "has no checkpoint with EMA weights" in refused.stderr
