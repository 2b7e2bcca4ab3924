"""Config schema, overrides, aliases and the CLI's one-line errors."""

import os
import subprocess
import sys

import pytest

from openspeed.cli import parse_train_args
from openspeed.config import load_config, resolve_layout
from openspeed.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "qwen2_5_vl", "shapes_demo.yaml")


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "openspeed", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_demo_config_loads_with_typed_values():
    cfg = load_config(DEMO)
    assert cfg.train.max_steps > 0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.generate == "shapes"


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("optim.lr=1e-3", ("optim", "lr"), 1e-3),
        ("optim.lr=0.001", ("optim", "lr"), 1e-3),
        ("train.max_steps=1e2", ("train", "max_steps"), 100),
        ("parallel.sequence_parallel=true", ("parallel", "sequence_parallel"), True),
        ("train.resume=auto", ("train", "resume"), "auto"),
        ("data.val_path=null", ("data", "val_path"), None),
        ("model.freeze=vision,merger", ("model", "freeze"), ["vision", "merger"]),
        ("parallel.cp_algo=megatron_cp_algo", ("parallel", "cp_algo"), "ring"),
    ],
)
def test_overrides_are_coerced(override, field, expected):
    cfg = load_config(DEMO, [override])
    value = getattr(getattr(cfg, field[0]), field[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.bogus_key=1", "train.bogus_key"),
        ("bogus.key=1", "bogus"),
        ("train.max_steps=lots", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.precision=fp16", "train.precision"),
        ("parallel.zero_stage=1", "parallel.zero_stage"),
        ("optim.lr=-1", "optim.lr"),
        ("model.freeze=everything", "model.freeze"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_layout_product_must_equal_world_size():
    cfg = load_config(DEMO, ["parallel.tp=3"])
    with pytest.raises(ConfigError, match="world size 2"):
        resolve_layout(cfg, 2)
    cfg = load_config(DEMO, ["parallel.dp_replicate=2", "parallel.dp_shard=-1", "train.micro_batch_size=8"])
    assert resolve_layout(cfg, 4)["dp_shard"] == 2
    cfg = load_config(DEMO, ["train.global_batch_size=6", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        resolve_layout(cfg, 2)


def test_megatron_aliases_map_onto_keys():
    path, nproc, overrides = parse_train_args(
        ["cfg.yaml", "--tensor-model-parallel-size", "2", "x.y=1", "--train-iters=7", "--nproc", "4",
         "--lr", "2e-4", "--save", "runs/x", "--load", "auto", "--pipeline-model-parallel-size=1",
         "--context-parallel-size", "1", "--micro-batch-size", "1", "--global-batch-size", "8", "--seed", "3"]
    )
    assert path == "cfg.yaml" and nproc == 4
    assert overrides == [
        "parallel.tp=2", "x.y=1", "train.max_steps=7", "optim.lr=2e-4", "train.run_dir=runs/x",
        "train.resume=auto", "parallel.pp=1", "parallel.cp=1", "train.micro_batch_size=1",
        "train.global_batch_size=8", "train.seed=3",
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([DEMO, "train.bogus_key=1"], "train.bogus_key"),
        ([DEMO, "train.max_steps=lots"], "train.max_steps"),
        ([DEMO, "parallel.tp=3", "--nproc", "2"], "world size 2"),
        (["no/such/config.yaml"], "no/such/config.yaml"),
        ([DEMO, "--bogus-flag", "1"], "--bogus-flag"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(args, needle, tmp_path):
    result = run_cli("train", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_config_is_validated_before_torch_is_imported():
    code = (
        "import sys\n"
        "from openspeed.cli import main\n"
        f"rc = main(['train', {DEMO!r}, 'train.max_steps=lots'])\n"
        "assert rc == 2, rc\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
