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

from hf_clip._io import umask
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
    # The mode open() gives (transformers writes the weights through a private 0600 temporary file).
    assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    model = AutoModel.from_pretrained(run)
    processor = AutoProcessor.from_pretrained(run)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    classifier = pipeline("zero-shot-image-classification", model=str(run))
    out = classifier(Image.new("RGB", (40, 40), "red"), candidate_labels=["red circle", "blue square"])
    assert {o["label"] for o in out} == {"red circle", "blue square"}
    assert len(logged_losses(run)) == 4
    # Its card is that of the run (recorded in config.json), not a paper card, and `hf-clip card` agrees.
    from hf_clip.cards import render_model_card, training_record

    record = training_record(model.config)
    assert record["steps"] == 4 and record["global_batch_size"] == 8 and record["init"] == "random"
    card = (run / "README.md").read_text()
    assert card == render_model_card(run)[1] and "| zero_shot_top1/shape |" in card
    with pytest.raises(ValueError, match="trained with hf_clip's pretraining"):
        render_model_card(run, preset="ViT-B/32")


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    """--gradient_checkpointing recomputes activations in backward: the same losses, and no deprecation warning
    from transformers (its enable call was renamed in 5.x)."""
    import warnings

    plain = tiny_args(tmp_path / "plain", max_steps=3, train_samples=24)
    run_pretraining(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        checkpointed = tiny_args(
            tmp_path / "ckpt", max_steps=3, train_samples=24, gradient_checkpointing=True
        )
        run_pretraining(checkpointed)
    expected = logged_losses(Path(plain.output_dir))
    assert logged_losses(Path(checkpointed.output_dir)) == pytest.approx(expected, abs=1e-5)


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
    # The killed run had logged steps 4 and 5 already: a resume drops them instead of logging them twice.
    (run_dir / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": -1.0}) + "\n" for s in (1, 2, 3, 4, 5))
    )
    run_pretraining(resumed_args)
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    resumed = {s: loss for s, loss in logged_losses(run_dir).items() if s > 3}
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


def test_resume_refuses_other_batch_settings(tmp_path, capsys):
    # A checkpoint counts batches: under another batch size it silently re-trained rows, and the optimizer and
    # scheduler state it loads silently overrode a new --learning_rate.
    run_pretraining(tiny_args(tmp_path, max_steps=2, checkpointing_steps=2))
    changed = tiny_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        resume_from_checkpoint="latest",
    )
    with pytest.raises(
        ValueError, match=r"--per_device_train_batch_size 8 -> 4; --learning_rate 0.001 -> 0.05"
    ):
        run_pretraining(changed)
    # The same settings resume; a longer run is allowed (its schedule is recomputed over the new length).
    capsys.readouterr()
    run_pretraining(tiny_args(tmp_path, max_steps=3, resume_from_checkpoint="latest"))
    out = capsys.readouterr().out
    assert "resuming with --max_steps 2 -> 3" in out and "Resumed from" in out
    assert len(logged_losses(tmp_path / "run")) == 3


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
    with pytest.raises(ValueError, match="A whole epoch gave no training step on process 0: 40 rows skipped"):
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


def _swatches(path: Path, count: int, bad: set[int] = frozenset()) -> None:
    from datasets import Dataset

    rows = {"image": [], "caption": []}
    for i in range(count):
        image = io.BytesIO()
        Image.new("RGB", (36, 36), (i * 5 % 256, 100, 200 - i * 4 % 200)).save(image, format="PNG")
        rows["image"].append(b"corrupt" if i in bad else image.getvalue())
        rows["caption"].append(f"a colour swatch number {i}")
    Dataset.from_dict(rows).to_parquet(str(path))


def test_streaming_resume_with_more_workers_than_shards(tmp_path):
    # One parquet file is one shard: of 2 DataLoader workers only one has rows, so the batches do not alternate
    # between workers, and a resume that assumed they did replayed a batch.
    _swatches(tmp_path / "data.parquet", 80)

    def args(name: str, **overrides) -> PretrainArguments:
        stream = dict(dataset="parquet", data_files=str(tmp_path / "data.parquet"), streaming=True)
        return tiny_args(tmp_path / name, shuffle_buffer=0, num_workers=2, max_steps=6, **stream, **overrides)

    full = args("full", checkpointing_steps=3)
    run_pretraining(full)
    resumed = args(
        "resumed", resume_from_checkpoint="latest", tokenizer=str(Path(full.output_dir) / "tokenizer")
    )
    shutil.copytree(
        Path(full.output_dir) / "checkpoints" / "step_3", Path(resumed.output_dir) / "checkpoints" / "step_3"
    )
    run_pretraining(resumed)
    uninterrupted, after = logged_losses(Path(full.output_dir)), logged_losses(Path(resumed.output_dir))
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([uninterrupted[s] for s in (4, 5, 6)], abs=1e-6)


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
        if name.endswith("qkv_proj.bias"):
            # The key bias shifts every logit of a query by the same amount, which the softmax cancels: its
            # gradient is zero up to rounding noise, which Adam normalises into steps of up to the full rate,
            # so eager and compiled runs walk it apart. It never changes any output; the query and value
            # biases are compared.
            width = a.shape[0] // 3
            a, b = torch.cat([a[:width], a[2 * width :]]), torch.cat([b[:width], b[2 * width :]])
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


def test_batchnorm_towers_say_they_do_not_see_the_global_batch(tmp_path, capsys):
    # The default ResNet normalises each micro-batch by its own statistics: 2 micro-batches of 4 (or 2 processes
    # of 4) gave loss 2.326 where one batch of 8 gave 2.279, although the README said they were the same.
    args = dict(model="tiny", image_size=None, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    run_pretraining(tiny_args(tmp_path / "resnet", max_steps=1, **args))
    assert "this image tower uses BatchNorm" in capsys.readouterr().out
    run_pretraining(
        tiny_args(tmp_path / "vit", max_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    )
    assert "BatchNorm" not in capsys.readouterr().out


def _launch(
    tmp_path: Path, extra: list[str], *launcher: str, wrapper: Path | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch [launcher] [wrapper] examples/pretrain.py` on the tiny model; `extra` options last."""
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
        *([str(wrapper)] if wrapper else []),
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


def test_two_processes_resume_each_from_its_own_batch(tmp_path):
    # Process 1's first batch holds only unreadable images, so it takes the next one and runs a batch ahead
    # of process 0; resumed from the main process's position, it replayed a batch. Each has 6 batches per
    # epoch, so by step 6 process 1 is one batch into epoch 1 while process 0 is still in epoch 0: resumed
    # in the main process's epoch, process 1 replayed epoch 0.
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    _swatches(tmp_path / "data.parquet", 48, bad=set(order[4:8]))  # process 1's share of the first batch
    data = [
        "--dataset=parquet",
        f"--data_files={tmp_path / 'data.parquet'}",
        "--per_device_train_batch_size=4",
    ]
    full = _launch(
        tmp_path / "full",
        [*data, "--checkpointing_steps=6", "--max_steps=7"],
        *TWO_CPU_PROCESSES,
        "--main_process_port=29534",
    )
    assert full.returncode == 0, full.stderr[-3000:]
    resumed_run = tmp_path / "resumed" / "run"
    shutil.copytree(
        tmp_path / "full" / "run" / "checkpoints" / "step_6", resumed_run / "checkpoints" / "step_6"
    )
    progress = json.loads((resumed_run / "checkpoints" / "step_6" / "progress.json").read_text())
    assert progress["epochs"] == [0, 1]
    resumed = _launch(
        tmp_path / "resumed",
        [
            *data,
            "--max_steps=7",
            "--resume_from_checkpoint=latest",
            f"--tokenizer={tmp_path / 'full' / 'run' / 'tokenizer'}",
        ],
        *TWO_CPU_PROCESSES,
        "--main_process_port=29535",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted, after = logged_losses(tmp_path / "full" / "run"), logged_losses(resumed_run)
    assert after[7] == pytest.approx(uninterrupted[7], abs=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes(tmp_path, stage):
    pytest.importorskip("deepspeed")
    config = ROOT / "examples" / "configs" / f"deepspeed_zero{stage}.yaml"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModel

    # As shipped (bf16): ZeRO-2 with the default ResNet model, whose BatchNorm buffers DeepSpeed leaves in
    # fp32 beside bf16 weights; ZeRO-3 fine-tuning a saved tiny ViT (from_pretrained used to fail there,
    # inside DeepSpeed's zero.Init, on the 0-d temperature).
    extra = ["--model=tiny"]
    if stage == 3:
        from hf_clip import HfClipConfig, HfClipModel, HfClipTokenizer

        start = HfClipModel(HfClipConfig(**TINY_MODEL))
        start.save_pretrained(tmp_path / "start")
        HfClipTokenizer.from_openai_bpe().save_pretrained(tmp_path / "start")
        extra = [f"--model={tmp_path / 'start'}"]
    run = _launch(
        tmp_path,
        [*extra, "--checkpointing_steps=3"],
        f"--config_file={config}",
        "--num_processes=2",
        f"--main_process_port={29540 + stage}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The saved model is the optimizer's fp32 master weights, not the bf16 copies the forward ran on.
    saved = load_file(tmp_path / "run" / "model.safetensors")
    master = get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / "run" / "checkpoints" / "step_3"), tag="pytorch_model"
    )
    assert all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point())
    for name, value in master.items():
        assert torch.equal(saved[name].reshape(value.shape), value.float()), name
    assert AutoModel.from_pretrained(tmp_path / "run").dtype == torch.float32  # config.json says so too
    if stage == 3:  # it trained from the saved weights
        initial = load_file(tmp_path / "start" / "model.safetensors")
        assert set(initial) == set(saved) and not torch.equal(
            initial["text_projection.weight"], saved["text_projection.weight"]
        )
        assert torch.allclose(initial["text_projection.weight"], saved["text_projection.weight"], atol=0.05)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_clamps_the_temperature_like_ddp(tmp_path, stage):
    """A temperature that starts above 100 is clamped after step 1, so step 2 trains at 100, and the
    optimizer's fp32 master copy is clamped too (ZeRO-3 used to train at 199.8 throughout; ZeRO-2 kept
    a master value of 199 that pinned the temperature at 100 when the gradient wanted it lower)."""
    pytest.importorskip("deepspeed")
    import math

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hf_clip import HfClipConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    HfClipConfig(**TINY_MODEL, logit_scale_init_value=math.log(200.0)).to_json_file(tmp_path / "tiny.json")
    config = ROOT / "examples" / "configs" / f"deepspeed_zero{stage}.yaml"
    run = _launch(
        tmp_path,
        ["--checkpointing_steps=3"],
        f"--config_file={config}",
        "--mixed_precision=no",
        "--num_processes=2",
        f"--main_process_port={29550 + stage}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["temperature"] == pytest.approx(200.0, rel=1e-4)
    assert all(row["temperature"] <= 100.0 + 1e-3 for row in log[1:]), [row["temperature"] for row in log]
    master = get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / "run" / "checkpoints" / "step_3"), tag="pytorch_model"
    )
    assert master["logit_scale"].item() <= math.log(100.0) + 1e-6


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
    sigmoid_model = HfClipModel(HfClipConfig(**TINY_MODEL, logit_bias_init_value=-10.0))
    with pytest.raises(ValueError, match="pass --loss siglip"):
        _pretrained_overrides(PretrainArguments(loss="clip"), sigmoid_model)
    _pretrained_overrides(PretrainArguments(loss="siglip"), sigmoid_model)


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


def test_several_captions_per_image_each_serve_in_turn():
    """COCO-style rows (a list of captions per image) trained on their first caption only; each epoch now
    draws one of them, seeded by (seed, epoch, row), so a rerun or a resume draws the same ones."""
    from datasets import Dataset

    from hf_clip.training.data import CaptionDataset

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    captions = [["a red square", "", "red block", "crimson tile"]]
    rows = CaptionDataset(
        Dataset.from_dict({"image": [png.getvalue()], "caption": captions}), "image", "caption", _no_transform
    )
    drawn = []
    for epoch in range(30):
        rows.epoch = epoch
        drawn.append(rows[0]["caption"])
    assert set(drawn) == {"a red square", "red block", "crimson tile"}  # never the empty one
    again = []
    for epoch in range(30):
        rows.epoch = epoch
        again.append(rows[0]["caption"])
    assert again == drawn


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


SLOW_RANK_SAVE = """
import runpy, sys, time
import accelerate.accelerator as accelerator_module

original = accelerator_module.save_accelerator_state

def slow_on_other_ranks(output_dir, *args, **kwargs):
    process_index = args[4]  # (weights, optimizers, schedulers, dataloaders, process_index, ...)
    if process_index != 0:
        time.sleep(1.0)  # a process that is slower to write its RNG state (or DeepSpeed's optimizer partition)
    return original(output_dir, *args, **kwargs)

accelerator_module.save_accelerator_state = slow_on_other_ranks
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_checkpoint_waits_for_every_process_before_the_rename(tmp_path):
    # accelerate's save_state has no barrier at its end: the main process renamed step_N.tmp while another
    # process was still writing into it ("Parent directory .../step_2.tmp does not exist", seen with ZeRO-2).
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_RANK_SAVE)
    run = _launch(
        tmp_path,
        ["--max_steps=2", "--checkpointing_steps=1"],
        *TWO_CPU_PROCESSES,
        "--main_process_port=29533",
        wrapper=wrapper,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for step in (1, 2):
        saved = tmp_path / "run" / "checkpoints" / f"step_{step}"
        assert (saved / "random_states_0.pkl").exists() and (saved / "random_states_1.pkl").exists()


def _png16(values, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB, and writes I;16 only as greyscale)."""
    import struct
    import zlib

    height, width = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_images_keep_their_brightness():
    import numpy as np

    from hf_clip.training.data import decode_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    expected = np.asarray(decode_image(Image.fromarray((ramp >> 8).astype(np.uint8))), dtype=np.float64)
    for name, data in {"grey": _png16(ramp, 0), "rgb": _png16(np.stack([ramp] * 3, -1), 2)}.items():
        decoded = np.asarray(decode_image({"bytes": data, "path": None}), dtype=np.float64)
        assert decoded.shape == (32, 32, 3), name
        # Pillow's convert("RGB") clipped 16-bit greyscale at 255: 99.6% of the pixels came out white.
        assert np.abs(decoded - expected).max() <= 1.0, name


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer .*no tokenizer folder there"):
        run_pretraining(tiny_args(tmp_path, max_steps=1, tokenizer=str(tmp_path / "no_such_dir")))


def test_final_save_never_leaves_a_half_written_model(tmp_path, monkeypatch):
    from hf_clip import HfClipProcessor

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(HfClipProcessor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        run_pretraining(tiny_args(tmp_path, max_steps=1))
    run_dir = tmp_path / "run"
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "config.json").exists()
    assert not list(run_dir.glob(".model.tmp.*"))


def test_training_record_names_the_data_files(tmp_path):
    """`--dataset webdataset --data_files .../shards/{00000..00009}.tar` (or csv, json, parquet) names only the
    loader: the card's Data row said "webdataset" of a model whose abilities and biases are its data's."""
    from hf_clip import HfClipConfig
    from hf_clip.cards import TRAINING_RECORD, render_training_card
    from hf_clip.training.pretraining import _training_record

    args = tiny_args(tmp_path, dataset="webdataset", data_files="/home/alice/laion/shards/{00000..00009}.tar")
    record = _training_record(args, steps=4, processes=1, precision="no", pretrained_dir=None)
    assert record["data_files"] == "{00000..00009}.tar"  # the trainer's folders stay private
    config = HfClipConfig()
    setattr(config, TRAINING_RECORD, record)
    card = render_training_card(config)
    assert "| Data | webdataset, files `{00000..00009}.tar`, split `train` |" in card
    assert "/home/alice" not in card


def test_extended_run_takes_its_first_new_step_at_the_new_schedules_rate(tmp_path):
    # A finished 2-step run extended to 4 steps: the optimizer state it loads holds the rate the 2-step
    # schedule set for step 3 (0, the end of its cosine). Step 3 trained at that rate instead of the 4-step
    # schedule's, so the extended run diverged from an uninterrupted 4-step run.
    run_pretraining(tiny_args(tmp_path / "a", max_steps=2, checkpointing_steps=2))
    run_pretraining(tiny_args(tmp_path / "a", max_steps=4, resume_from_checkpoint="latest"))
    run_pretraining(tiny_args(tmp_path / "b", max_steps=4))
    extended, uninterrupted = (
        [json.loads(line) for line in (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()]
        for name in ("a", "b")
    )
    assert [r["step"] for r in extended] == [1, 2, 3, 4]
    # Warm-up 1, then a cosine over 3 steps: step 3 (index 2) trains at 0.5 * (1 + cos(pi / 3)) of the peak.
    assert extended[2]["lr"] == pytest.approx(0.75e-3)
    assert [r["lr"] for r in extended] == pytest.approx([r["lr"] for r in uninterrupted], rel=1e-6)
    assert [r["loss"] for r in extended] == pytest.approx([r["loss"] for r in uninterrupted], abs=1e-6)
