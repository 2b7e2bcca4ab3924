"""A mixed text / image / video training set laid out so every step of a 5-step run meets a plan."""

from __future__ import annotations

import json
import os

from _train_utils import make_tiny_run_config
from PIL import Image

from openspeed.data.schedule import GlobalBatchSchedule

GLOBAL_BATCH, MICRO_BATCH, SEED = 8, 2, 7
# One string per step, one letter per position of the step's global batch (T text only, I image,
# V video, B image and video). At dp=2 rank 0 takes positions 0-3 and rank 1 positions 4-7, two
# micro-batches each; at dp=1 (tp, pp, cp) the four pairs are the micro-batches.
PLAN = (
    "TTTT" "VIIT",  # rank 0 has no image at all, rank 1 a video
    "IIIT" "VTTT",  # rank 0 images only, rank 1 a video and a text-only micro-batch
    "IIBI" "IIII",  # a sample with an image and a video
    "TTTT" "TTTT",  # no media anywhere: the tower still runs (and learns nothing)
    "VVTI" "IVTT",  # videos, images and text-only micro-batches mixed
)
def _video(folder: str, image_path: str) -> None:
    """Four frames of the image sliding right: a short clip as a folder of frames."""
    os.makedirs(folder, exist_ok=True)
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    for k in range(4):
        frame = Image.new("RGB", image.size)
        frame.paste(image, (4 * k, 0))
        frame.save(os.path.join(folder, f"{k}.png"))


def _record(kind: str, source: dict, index: int, root: str, data_dir: str) -> dict:
    question = source["messages"][0]["content"].replace("<image>", "")
    answer = source["messages"][1]["content"]
    image = os.path.join(data_dir, source["images"][0])
    record: dict = {}
    tags = ""
    if kind in "IB":
        tags += "<image>"
        record["images"] = [image]
    if kind in "VB":
        clip = os.path.join(root, "clips", str(index))
        _video(clip, image)
        tags += "<video>"
        record["videos"] = [clip]
    record["messages"] = [{"role": "user", "content": tags + question}, {"role": "assistant", "content": answer}]
    return record


def write_mixed_set(shapes_dir: str, root: str, images_only: bool = False) -> str:
    """A 40-sample set under ``root`` drawn from the shapes set, laid out so each step meets
    :data:`PLAN`; returns the path of a 5-step training config over it (no validation set).
    ``images_only`` (a family without video): each video sample is text-only instead and each image
    and video sample an image one, so rank 0's first step still has no image."""
    with open(os.path.join(shapes_dir, "train.jsonl"), encoding="utf-8") as fh:
        sources = [json.loads(line) for line in fh]
    num = GLOBAL_BATCH * len(PLAN)
    schedule = GlobalBatchSchedule(num, GLOBAL_BATCH, SEED)
    kinds: dict[int, str] = {}
    for step, letters in enumerate(PLAN, start=1):
        for index, kind in zip(schedule.global_batch(step), letters, strict=True):
            kinds[index] = {"V": "T", "B": "I"}.get(kind, kind) if images_only else kind
    assert sorted(kinds) == list(range(num))  # every sample is used exactly once in the 5 steps
    records = [_record(kinds[i], sources[i], i, root, shapes_dir) for i in range(num)]
    train = os.path.join(root, "train.jsonl")
    with open(train, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return make_tiny_run_config(
        root, shapes_dir, data={"train_path": train, "val_path": None},
        train={"seed": SEED, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
    )
