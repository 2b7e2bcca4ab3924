"""model.freeze: frozen parts get no gradients and no optimizer state."""

import pytest
import torch

from openspeed.config import OptimConfig
from openspeed.data.collator import VLCollator
from openspeed.data.conversation import ConversationDataset
from openspeed.data.processor import VLProcessor
from openspeed.models.init import init_weights
from openspeed.models.loading import read_hf_config
from openspeed.models.registry import get_model_spec
from openspeed.training.model_setup import apply_freeze
from openspeed.training.optim import build_optimizer


@pytest.mark.parametrize("parts", [["vision"], ["merger"], ["llm"], ["vision", "merger"]])
def test_frozen_parts_get_no_grad_and_no_optimizer_state(shapes_dir, parts):
    model_dir = f"{shapes_dir}/model"
    spec = get_model_spec("qwen2_5_vl")
    config = spec.config_from_hf(read_hf_config(model_dir))
    model = spec.build(config)
    init_weights(model, seed=0, std=0.1)
    apply_freeze(model, spec, parts)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if spec.part_of(n) in parts}
    assert frozen and len(frozen) < len(list(model.parameters()))

    processor = VLProcessor.from_pretrained(model_dir)
    dataset = ConversationDataset(f"{shapes_dir}/train.jsonl", processor, max_seq_len=128)
    batch = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)(
        [dataset[0], dataset[1]]
    )
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch).loss.backward()
    optimizer.step()

    named = dict(model.named_parameters())
    for name, param in named.items():
        if name in frozen:
            assert param.grad is None, name
            assert param not in optimizer.state, name
            assert torch.equal(param, before[name]), name
        else:
            assert param.grad is not None, name
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(named[n]) for n in frozen}
    assert any(not torch.equal(named[n], before[n]) for n in named if n not in frozen)
