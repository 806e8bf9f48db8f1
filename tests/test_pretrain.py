"""End-to-end pretraining: the example script, resume, bad data, real-data formats, multi-process."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_clip.training import PretrainArguments, run_pretraining
from hf_clip.training.pretraining import NonFiniteLossError, _checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "projection_dim": 32,
    "text_config": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "max_position_embeddings": 24,
    },
    "vision_config": {"image_size": 32, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1},
}


def tiny_args(tmp_path: Path, **overrides) -> PretrainArguments:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "tiny.json"
    if not config.exists():
        from hf_clip import HfClipConfig

        HfClipConfig(**TINY_MODEL).to_json_file(config)
    base = dict(
        model=str(config),
        output_dir=str(tmp_path / "run"),
        image_size=32,
        train_samples=64,
        eval_samples=24,
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=1,
        warmup_steps=1,
        num_workers=0,
        report_to="none",
        vocab_size=600,
    )
    return PretrainArguments(**{**base, **overrides})


def logged_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def test_builtin_run_saves_a_loadable_model(tmp_path):
    from transformers import AutoModel, AutoProcessor, pipeline

    metrics = run_pretraining(tiny_args(tmp_path))
    assert set(metrics) == {
        f"zero_shot_top1/{a}" for a in ("shape", "color", "size", "position", "combination")
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and (run / "results.json").exists()
    model = AutoModel.from_pretrained(run)
    processor = AutoProcessor.from_pretrained(run)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    classifier = pipeline("zero-shot-image-classification", model=str(run))
    out = classifier(Image.new("RGB", (40, 40), "red"), candidate_labels=["red circle", "blue square"])
    assert {o["label"] for o in out} == {"red circle", "blue square"}
    assert len(logged_losses(run)) == 4


def test_resume_continues_exactly(tmp_path):
    import shutil

    # Patch dropout draws from the global generator: a resumed run must draw the same numbers.
    full = tiny_args(tmp_path / "a", max_steps=6, checkpointing_steps=3, patch_dropout=0.5)
    run_pretraining(full)
    uninterrupted = logged_losses(Path(full.output_dir))

    # A second run that "died" after step 3: it only has the step-3 checkpoint (and its tokenizer).
    resumed_args = tiny_args(
        tmp_path / "b", max_steps=6, resume_from_checkpoint="latest", checkpointing_steps=3, patch_dropout=0.5
    )
    run_dir = Path(resumed_args.output_dir)
    shutil.copytree(Path(full.output_dir) / "checkpoints" / "step_3", run_dir / "checkpoints" / "step_3")
    shutil.copytree(Path(full.output_dir) / "tokenizer", run_dir / "tokenizer")
    # A save killed half-way leaves a .tmp folder: it must never be picked up as "latest".
    (run_dir / "checkpoints" / "step_5.tmp").mkdir()
    assert [p.name for p in _checkpoints(run_dir)] == ["step_3"]
    run_pretraining(resumed_args)
    resumed = logged_losses(run_dir)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step

    # Resumed from step 3 again, the run writes step 6 over the one already there (a folder cannot be renamed
    # over a full one: this used to crash before the model was saved).
    (run_dir / "checkpoints" / "step_6" / "stale").write_text("from the first resume")
    run_pretraining(
        tiny_args(
            tmp_path / "b",
            max_steps=6,
            resume_from_checkpoint=str(run_dir / "checkpoints" / "step_3"),
            checkpointing_steps=3,
            patch_dropout=0.5,
        )
    )
    step_6 = run_dir / "checkpoints" / "step_6"
    assert (step_6 / "progress.json").exists() and not (step_6 / "stale").exists()
    assert not list((run_dir / "checkpoints").glob("*.old"))  # the replaced one is gone


def test_bad_rows_are_skipped_and_counted(tmp_path):
    from datasets import Dataset

    rows = {"image": [], "caption": []}
    for i in range(40):
        image = io.BytesIO()
        Image.new("RGB", (36, 36), (i * 6, 100, 200 - i * 4)).save(image, format="PNG")
        rows["image"].append(image.getvalue())
        rows["caption"].append(f"a colour swatch number {i}")
    rows["image"][3] = b"not a png at all"
    rows["image"][7] = rows["image"][7][:60]  # truncated file
    rows["caption"][11] = "   "
    rows["caption"][2] = None  # a missing caption: skipped in training, left out of tokenizer training
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "data.parquet"))
    args = tiny_args(
        tmp_path,
        dataset="parquet",
        data_files=str(tmp_path / "data.parquet"),
        max_steps=4,
        eval_split="train",
    )
    metrics = run_pretraining(args)
    log = [json.loads(line) for line in (Path(args.output_dir) / "train_log.jsonl").read_text().splitlines()]
    # 32 of the 40 rows are drawn by 4 steps of 8; the skipped count is cumulative.
    assert 1 <= log[-1]["skipped_samples"] <= 4
    # The evaluation decodes the same raw bytes and skips the same bad rows (it used to crash on them).
    assert 0.0 <= metrics["retrieval_recall@1/image_to_text"] <= 1.0

    # Nothing usable at all: a clear error, not an endless loop over empty epochs.
    rows["image"] = [b"broken"] * 40
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "broken.parquet"))
    broken = tiny_args(tmp_path / "b", dataset="parquet", data_files=str(tmp_path / "broken.parquet"))
    with pytest.raises(ValueError, match="A whole epoch gave no training step: 40 rows skipped"):
        run_pretraining(broken)


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(24):
            Image.new("RGB", (40, 30), (200, i * 10, 0)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"an orange picture {i}"}) + "\n")
    args = tiny_args(tmp_path, dataset=str(folder), caption_column="text", max_steps=2, eval_split="train")
    metrics = run_pretraining(args)
    assert 0.0 <= metrics["retrieval_recall@1/image_to_text"] <= 1.0


def test_webdataset_shards_streaming(tmp_path):
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(40):
            for ext, payload in (("png", None), ("txt", f"a green picture {i}".encode())):
                if payload is None:
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (0, 5 * i, 0)).save(buf, format="PNG")
                    payload = buf.getvalue() if i != 5 else b"corrupt"  # skipped, not fatal
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    def args(name: str, **overrides) -> PretrainArguments:
        stream = dict(dataset="webdataset", data_files=str(shard), image_column="png", caption_column="txt")
        return tiny_args(
            tmp_path / name, streaming=True, max_steps=5, **stream, **overrides
        )  # 5 x 8 = 40 rows

    full = args("full", checkpointing_steps=2)
    run_pretraining(full)
    assert (Path(full.output_dir) / "model.safetensors").exists()
    uninterrupted = logged_losses(Path(full.output_dir))
    log = (Path(full.output_dir) / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["skipped_samples"] == 1

    # "latest" on a first launch starts from step 0; a given tokenizer means no output folder existed yet.
    tokenizer = str(Path(full.output_dir) / "tokenizer")
    fresh = args("fresh", resume_from_checkpoint="latest", tokenizer=tokenizer)
    run_pretraining(fresh)
    assert logged_losses(Path(fresh.output_dir)) == pytest.approx(uninterrupted, abs=1e-6)

    # Resumed after step 2, the stream continues where it was instead of replaying its first batches.
    resumed = args("resumed", resume_from_checkpoint="latest", tokenizer=tokenizer)
    shutil.copytree(
        Path(full.output_dir) / "checkpoints" / "step_2", Path(resumed.output_dir) / "checkpoints" / "step_2"
    )
    run_pretraining(resumed)
    after = logged_losses(Path(resumed.output_dir))
    assert sorted(after) == [3, 4, 5]
    resumed_log = (Path(resumed.output_dir) / "train_log.jsonl").read_text().splitlines()
    assert json.loads(resumed_log[-1])["skipped_samples"] == 1  # the count from before the resume carried on
    assert [after[s] for s in (3, 4, 5)] == pytest.approx([uninterrupted[s] for s in (3, 4, 5)], abs=1e-6)


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler on CPU"
)
def test_torch_compile_trains_the_same_model(tmp_path):
    """--torch_compile really compiles (also for a second run in one process, which accelerate's own
    dynamo setting ignored), trains the same model, and saves it without the compile wrapper's prefix."""
    from torch._dynamo.utils import counters

    from hf_clip import HfClipModel

    run_pretraining(tiny_args(tmp_path / "eager"))
    compiled_frames = counters["frames"]["ok"]
    run_pretraining(tiny_args(tmp_path / "compiled", torch_compile=True))
    assert counters["frames"]["ok"] > compiled_frames
    eager, compiled = (logged_losses(tmp_path / run / "run") for run in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-5)
    eager_model = HfClipModel.from_pretrained(tmp_path / "eager" / "run")
    compiled_model = HfClipModel.from_pretrained(tmp_path / "compiled" / "run")
    for (name, a), (other, b) in zip(
        eager_model.state_dict().items(), compiled_model.state_dict().items(), strict=True
    ):
        assert name == other
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # Adam turns 1e-7 loss noise into ~1e-5


def test_non_finite_loss_names_the_step(tmp_path, monkeypatch):
    from hf_clip.training import pretraining

    class Broken(pretraining.ClipLoss):
        def forward(self, *args):
            return super().forward(*args) * float("nan")

    monkeypatch.setattr(pretraining, "ClipLoss", Broken)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        run_pretraining(tiny_args(tmp_path))


def test_gradcache_accumulation_runs(tmp_path):
    run_pretraining(
        tiny_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2)
    )
    assert len(logged_losses(tmp_path / "run")) == 2


def _launch(tmp_path: Path, extra: list[str], *launcher: str) -> subprocess.CompletedProcess:
    args = tiny_args(tmp_path)
    cli = [
        f"--{k}={v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("max_steps",) and not isinstance(v, bool)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if (
        "--multi_gpu" in launcher
    ):  # two CPU processes (see TWO_CPU_PROCESSES); DeepSpeed configs run as shipped
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        str(ROOT / "examples" / "pretrain.py"),
    ]
    return subprocess.run(
        [*cmd, *cli, "--max_steps=3", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )


# `accelerate launch --cpu --num_processes 2` runs ONE process; two CPU processes take --multi_gpu with
# ACCELERATE_USE_CPU (what `accelerate config` writes for a multi-CPU machine).
TWO_CPU_PROCESSES = ("--multi_gpu", "--num_processes=2")


def test_two_processes_train_as_one_process_with_the_global_batch(tmp_path):
    # 2 processes x 4 rows against 1 process x 8: the same global batches, so the same losses and the same
    # learning rate at every step (accelerate stepped the schedule once per process: twice as fast here).
    run = _launch(
        tmp_path / "two", ["--per_device_train_batch_size=4"], *TWO_CPU_PROCESSES, "--main_process_port=29531"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("zero_shot_top1/combination") == 1  # printed by the main process only
    assert json.loads((tmp_path / "two" / "run" / "results.json").read_text())["num_processes"] == 2
    run_pretraining(tiny_args(tmp_path / "one", max_steps=3, per_device_train_batch_size=8))
    two, one = (
        [json.loads(line) for line in (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()]
        for name in ("two", "one")
    )
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one], rel=1e-6)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert one[0]["lr"] == pytest.approx(1e-3) and one[-1]["lr"] < one[1]["lr"]  # the rate each step used


def test_two_processes_bf16(tmp_path):
    run = _launch(tmp_path, [], *TWO_CPU_PROCESSES, "--mixed_precision=bf16", "--main_process_port=29532")
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes(tmp_path, stage):
    pytest.importorskip("deepspeed")
    config = ROOT / "examples" / "configs" / f"deepspeed_zero{stage}.yaml"
    # ZeRO-2 as shipped (bf16) with the default ResNet model, whose BatchNorm buffers DeepSpeed leaves in
    # fp32 beside bf16 weights; ZeRO-3 in fp32 with the tiny ViT.
    extra = ["--model=tiny"] if stage == 2 else []
    precision = [] if stage == 2 else ["--mixed_precision=no"]
    run = _launch(
        tmp_path,
        extra,
        f"--config_file={config}",
        *precision,
        "--num_processes=2",
        f"--main_process_port={29540 + stage}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_options_on_a_loaded_model_apply_or_say_why_not():
    from hf_clip import HfClipConfig, HfClipModel
    from hf_clip.training.pretraining import _pretrained_overrides

    model = HfClipModel(HfClipConfig(**TINY_MODEL))
    _pretrained_overrides(PretrainArguments(patch_dropout=0.5, image_size=32), model)
    assert model.config.vision_config.patch_dropout == 0.5
    with pytest.raises(ValueError, match="cannot change the checkpoint's image size"):
        _pretrained_overrides(PretrainArguments(image_size=48), model)
    with pytest.raises(ValueError, match="needs a model with a logit bias"):
        _pretrained_overrides(PretrainArguments(loss="siglip"), model)


def _no_transform(image, generator):
    return torch.zeros(1)


def test_streaming_rows_reach_the_loader_once_with_workers():
    """`datasets` already gives each DataLoader worker its own shards (a second split dropped half the rows);
    a resumed stream skips the batches already trained."""
    from datasets import Dataset

    from hf_clip.training.data import StreamingCaptionDataset

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    captions = [f"caption {i}" for i in range(24)]
    stream = Dataset.from_dict({"image": [png.getvalue()] * 24, "caption": captions}).to_iterable_dataset(
        num_shards=2
    )
    rows = StreamingCaptionDataset(stream, "image", "caption", _no_transform)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=workers, collate_fn=list)
        assert sorted(r["caption"] for batch in loader for r in batch) == sorted(captions), workers
    rows.batch_size, rows.start_batch = 4, 2
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=list)
    assert [r["caption"] for batch in loader for r in batch] == captions[8:]


def test_patch_dropout_on_a_resnet_is_refused():
    from hf_clip.training.pretraining import _build_config

    with pytest.raises(ValueError, match="--patch_dropout drops ViT patch tokens"):
        _build_config(PretrainArguments(model="tiny", patch_dropout=0.5), 100, 99, 98)


def test_every_pretrain_option_has_help_with_its_default():
    import dataclasses

    from transformers import HfArgumentParser

    text = HfArgumentParser(PretrainArguments).format_help()  # raises on a stray "%" in a help string
    for option in dataclasses.fields(PretrainArguments):
        assert option.metadata.get("help"), f"--{option.name} has no help"
    assert "(default: outputs/pretrain)" in text and "(default: 0.2)" in text
