"""Publishing to the Hub without network: the prepared folder, the uploaded file set, and loading with
trust_remote_code=True in a fresh interpreter where hf_clip cannot be imported."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_clip import hub
from hf_clip.hub import AUTO_MAP, CODE_FILES, add_push_parser, check_model_folder, code_files, prepare_for_hub

# The start of a script for a fresh interpreter: a meta-path finder makes hf_clip unimportable whatever is
# installed (editable installs included).
BLOCK_HF_CLIP = textwrap.dedent(
    """
    import sys

    class BlockHfClip:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_clip" or name.startswith("hf_clip."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
            return None

    sys.meta_path.insert(0, BlockHfClip())
    try:
        import hf_clip  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_clip is importable; the isolation failed")
    """
)

# Then every Auto class loads the folders with trust_remote_code=True.
ISOLATED_LOADER = BLOCK_HF_CLIP + textwrap.dedent(
    """
    import json, traceback

    import numpy as np
    import torch
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForZeroShotImageClassification,
                              AutoProcessor, AutoTokenizer)

    texts = json.loads(sys.argv[1])
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    reports = {}
    def load(folder):
        kw = dict(trust_remote_code=True)
        loaded = {
            "config": AutoConfig.from_pretrained(folder, **kw),
            "model": AutoModel.from_pretrained(folder, **kw).eval(),
            "zero_shot": AutoModelForZeroShotImageClassification.from_pretrained(folder, **kw).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(folder, **kw),
            "image_processor": AutoImageProcessor.from_pretrained(folder, **kw),
            "processor": AutoProcessor.from_pretrained(folder, **kw),
        }
        processor = loaded["processor"]
        inputs = processor(text=texts, images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = loaded["model"](**inputs).logits_per_image
            zs_logits = loaded["zero_shot"](**inputs).logits_per_image
        return {
            "classes": {k: [type(v).__name__, type(v).__module__] for k, v in loaded.items()},
            "input_ids": loaded["tokenizer"](texts, padding=True)["input_ids"],
            "pixel_values": loaded["image_processor"](images=[image], return_tensors="pt")["pixel_values"].tolist(),
            "logits": logits.tolist(),
            "zero_shot_logits": zs_logits.tolist(),
        }

    for folder in sys.argv[2:]:
        try:
            reports[folder] = load(folder)
        except Exception:
            reports[folder] = {"error": traceback.format_exc()}
    reports["hf_clip_modules"] = sorted(m for m in sys.modules if m == "hf_clip" or m.startswith("hf_clip."))
    print("REPORT" + json.dumps(reports))
    """
)

TEXTS = ["a photo of a cat.", "a diagram of a very small dog"]


def tiny_model_and_processor():
    open_clip = pytest.importorskip("open_clip")
    from hf_clip import HfClipConfig, HfClipModel
    from hf_clip.image_processing_hf_clip import HfClipImageProcessor
    from hf_clip.processing_hf_clip import HfClipProcessor
    from hf_clip.tokenization_hf_clip import HfClipTokenizer

    torch.manual_seed(0)
    config = HfClipConfig.from_preset(
        "RN50",
        vision_config={
            "hidden_size": 8,
            "resnet_layers": [1, 1, 1, 1],
            "image_size": 32,
            "num_attention_heads": 2,
        },
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    model = HfClipModel(config).eval()
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    tokenizer = HfClipTokenizer.from_openai_bpe(str(vocab))
    processor = HfClipProcessor(image_processor=HfClipImageProcessor.for_image_size(32), tokenizer=tokenizer)
    return model, processor


def expected_outputs(model, processor) -> dict:
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    inputs = processor(text=TEXTS, images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return {
        "input_ids": processor.tokenizer(TEXTS, padding=True)["input_ids"],
        "pixel_values": processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
        "logits": logits,
    }


def save_folder(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class FakeTransformersApi:
    """Stands in for the HfApi that transformers' push_to_hub uses; keeps a copy of every committed file."""

    def __init__(self, store: Path):
        self.store = store

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            target = self.store / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")


def run_isolated(script: str, args: list[str], root: Path) -> dict:
    """Run `script` (starting with BLOCK_HF_CLIP) offline in a fresh interpreter in `root`: the JSON it printed
    after "REPORT"."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    path = root / "load.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("REPORT", 1)[1])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A folder prepared by hub.prepare_for_hub, one pushed by model/processor.push_to_hub, the expected outputs,
    and the report of loading both in an isolated interpreter."""
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard

    root = tmp_path_factory.mktemp("hub")
    model, processor = tiny_model_and_processor()
    prepared = save_folder(model, processor, root / "prepared")
    prepare_for_hub(prepared)

    pushed = root / "pushed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers_hub, "hf_api", lambda: FakeTransformersApi(pushed))
        mp.setattr(transformers_hub, "create_and_tag_model_card", lambda *a, **k: ModelCard("---\n---\n"))
        model.push_to_hub("someone/tiny-clip")
        processor.push_to_hub("someone/tiny-clip")

    report = run_isolated(ISOLATED_LOADER, [json.dumps(TEXTS), str(prepared), str(pushed)], root)
    return {
        "prepared": prepared,
        "pushed": pushed,
        "expected": expected_outputs(model, processor),
        "report": report,
    }


def test_code_files_are_self_contained():
    names = [p.name for p in code_files()]
    assert names[: len(CODE_FILES)] == list(CODE_FILES)
    for path in code_files():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+hf_clip\b", text, flags=re.MULTILINE), path.name


def test_non_portable_code_is_refused(tmp_path):
    for name in CODE_FILES:
        (tmp_path / name).write_text("import torch\n")
    (tmp_path / "modeling_hf_clip.py").write_text(
        "from .configuration_hf_clip import X\nfrom .helpers import y\n"
    )
    (tmp_path / "helpers.py").write_text("import math\n")
    assert {p.name for p in code_files(tmp_path)} == {*CODE_FILES, "helpers.py"}  # relative imports follow
    (tmp_path / "helpers.py").write_text("from hf_clip.evaluation import x\n")
    with pytest.raises(ValueError, match="helpers.py line 1 imports `hf_clip.evaluation`"):
        code_files(tmp_path)
    (tmp_path / "helpers.py").write_text("from ..training import x\n")
    with pytest.raises(ValueError, match="parent package"):
        code_files(tmp_path)


def test_prepared_folder_has_code_and_auto_map(published):
    folder = published["prepared"]
    for name in CODE_FILES:
        assert (folder / name).read_text() == (Path(hub.__file__).parent / name).read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"] == AUTO_MAP["AutoTokenizer"]
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == AUTO_MAP["AutoProcessor"]
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == AUTO_MAP["AutoImageProcessor"]
    )
    for auto_class in AUTO_MAP:
        module, cls = (
            AUTO_MAP[auto_class][0] if isinstance(AUTO_MAP[auto_class], list) else AUTO_MAP[auto_class]
        ).split(".")
        assert f"class {cls}(" in (folder / f"{module}.py").read_text(), auto_class


@pytest.mark.parametrize("which", ["prepared", "pushed"])
def test_loads_with_trust_remote_code_without_hf_clip(published, which):
    report, expected = published["report"], published["expected"]
    assert report["hf_clip_modules"] == []
    result = report[str(published[which])]
    assert "error" not in result, result.get("error")
    expected_classes = {
        "config": "HfClipConfig",
        "model": "HfClipModel",
        "zero_shot": "HfClipModel",
        "tokenizer": "HfClipTokenizer",
        "image_processor": "HfClipImageProcessor",
        "processor": "HfClipProcessor",
    }
    for key, (cls, module) in result["classes"].items():
        assert cls == expected_classes[key]
        assert module.startswith("transformers_modules."), (key, module)  # the shipped code, not a package
    assert result["input_ids"] == expected["input_ids"]
    torch.testing.assert_close(torch.tensor(result["pixel_values"]), expected["pixel_values"])
    torch.testing.assert_close(torch.tensor(result["logits"]), expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(result["zero_shot_logits"]), expected["logits"], rtol=1e-5, atol=1e-5
    )


def test_push_uploads_the_expected_files(published, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    folder = shutil.copytree(published["prepared"], tmp_path / "model")
    for name in CODE_FILES:
        (folder / name).unlink()  # push must put the code back
    (folder / "pytorch_model.bin").write_bytes(b"pickle")  # never uploaded
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("local state")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, repo_id, ignore_patterns, **kwargs):
        files = []
        for path in Path(folder_path).rglob("*"):
            rel = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns):
                files.append(rel)
        calls["upload_folder"] = (repo_id, sorted(files), kwargs)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.setdefault("branch", kw))
    parser = argparse.ArgumentParser()
    add_push_parser(parser.add_subparsers())
    args = parser.parse_args(["push", str(folder), "someone/tiny-clip", "--private", "--revision", "dev"])
    args.func(args)

    repo_id, kwargs = calls["create_repo"]
    assert repo_id == "someone/tiny-clip" and kwargs["private"] is True
    repo_id, files, kwargs = calls["upload_folder"]
    assert kwargs["revision"] == "dev" and calls["branch"] == {
        "branch": "dev",
        "repo_type": "model",
        "exist_ok": True,
    }
    weights_and_processor = {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert weights_and_processor | set(CODE_FILES) <= set(files)
    assert "pytorch_model.bin" not in files and not any(f.startswith(".cache") for f in files)
    # A tiny model is none of the paper's nine, so no card is invented for it.
    assert "README.md" not in files


def test_model_folder_errors(published, tmp_path):
    folder = shutil.copytree(published["prepared"], tmp_path / "model")
    check_model_folder(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor.save_pretrained"):
        check_model_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickle files"):
        check_model_folder(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_folder(tmp_path / "nothing")


def test_card_written_for_a_paper_model(tmp_path):
    from hf_clip import HfClipConfig
    from hf_clip.cards import render_card

    HfClipConfig.from_preset("ViT-B/16").save_pretrained(tmp_path)
    hub._ensure_card(tmp_path, results=())
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == render_card("ViT-B-16")
    (tmp_path / "README.md").write_text("my own card")
    hub._ensure_card(tmp_path, results=())
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "my own card"  # never overwritten silently


@pytest.mark.parametrize("failure", ["connection", "login"])
def test_push_failure_is_one_line_naming_the_checks(published, tmp_path, monkeypatch, capsys, failure):
    try:  # huggingface_hub's HTTP client: httpx2 from its 2.0 on, httpx before
        import httpx2 as http
    except ImportError:
        http = pytest.importorskip("httpx")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    from hf_clip.cli import main

    def create_repo(self, repo_id, **kwargs):
        if failure == "connection":
            raise http.ConnectError("[Errno 111] Connection refused")
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    folder = shutil.copytree(published["prepared"], tmp_path / "model")
    assert main(["push", str(folder), "someone/tiny-clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-clip push: error: uploading"), err
    assert ("Connection refused" if failure == "connection" else "no token found") in err[0]
    assert "hf auth login" in err[0]
    # Other failures are not disguised as upload problems.
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["push", str(folder), "someone/tiny-clip"])


class FakeHub:
    """HfApi's repository, branch and upload calls against an in-memory Hub that behaves like the real one where
    it matters here: a commit to a branch that does not exist fails (404), and upload_folder filters files with
    huggingface_hub's own pattern matcher."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.branches: dict[str, set[str]] = {}
        self.commits: list[tuple[str, str, list[str], dict]] = []
        hub_ = self

        def create_repo(api, repo_id, **kwargs):
            hub_.branches.setdefault(repo_id, {"main"})
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            if branch in hub_.branches[repo_id] and not exist_ok:
                raise AssertionError("branch exists")
            hub_.branches[repo_id].add(branch)

        def upload_folder(api, *, folder_path, repo_id, revision=None, ignore_patterns=None, **kwargs):
            from huggingface_hub.errors import RevisionNotFoundError
            from huggingface_hub.utils import filter_repo_objects

            try:
                import httpx2 as http
            except ImportError:
                import httpx as http
            if (
                not (revision or "main").startswith("refs/pr/")
                and (revision or "main") not in hub_.branches[repo_id]
            ):
                request = http.Request("POST", f"https://hub.invalid/api/models/{repo_id}/commit/{revision}")
                raise RevisionNotFoundError(
                    f"404 Client Error. Invalid rev id: {revision}",
                    response=http.Response(404, request=request),
                )
            root = Path(folder_path)
            files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            files = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
            hub_.commits.append((repo_id, revision or "main", files, kwargs))
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{len(hub_.commits)}")

        for name, fn in (
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("upload_folder", upload_folder),
        ):
            monkeypatch.setattr(HfApi, name, fn)


def test_push_to_a_new_branch_creates_it(published, tmp_path, monkeypatch, capsys):
    # `--revision` is documented as the branch to push to; upload_folder alone fails on a branch the repository
    # does not have yet, so the push must create it first (as transformers' push_to_hub does).
    from hf_clip.cli import main

    fake = FakeHub(monkeypatch)
    folder = shutil.copytree(published["prepared"], tmp_path / "model")
    assert main(["push", str(folder), "someone/tiny-clip", "--revision", "dev"]) == 0, capsys.readouterr().err
    assert fake.branches["someone/tiny-clip"] == {"main", "dev"}
    assert [(repo, branch) for repo, branch, _, _ in fake.commits] == [("someone/tiny-clip", "dev")]
    # Pushing again to the now existing branch works too, and a pull request ref is not made a branch.
    assert main(["push", str(folder), "someone/tiny-clip", "--revision", "dev"]) == 0
    assert main(["push", str(folder), "someone/tiny-clip", "--revision", "refs/pr/1"]) == 0
    assert fake.branches["someone/tiny-clip"] == {"main", "dev"}
    assert [branch for _, branch, _, _ in fake.commits] == ["dev", "dev", "refs/pr/1"]


def test_push_uploads_only_the_model_files_not_training_state(published, tmp_path, monkeypatch):
    # examples/pretrain.py writes its model into --output_dir next to checkpoints/step_N (each with a full
    # model.safetensors), TensorBoard logs and a tokenizer/ copy; pushing that folder uploads the model only.
    fake = FakeHub(monkeypatch)
    folder = shutil.copytree(published["prepared"], tmp_path / "pretrain")
    for step in (2, 4):
        checkpoint = folder / "checkpoints" / f"step_{step}"
        checkpoint.mkdir(parents=True)
        shutil.copyfile(folder / "model.safetensors", checkpoint / "model.safetensors")
        (checkpoint / "progress.json").write_text("{}")
        (checkpoint / "optimizer.bin").write_bytes(b"pickle")
    (folder / "hf_clip_pretrain" / "123").mkdir(parents=True)
    (folder / "hf_clip_pretrain" / "123" / "events.out.tfevents.1").write_bytes(b"log")
    (folder / "hf_clip_pretrain" / "hparams.yml").write_text("lr: 1\n")
    (folder / "tokenizer").mkdir()
    shutil.copyfile(folder / "tokenizer.json", folder / "tokenizer" / "tokenizer.json")
    hub.push_folder(folder, "someone/tiny-clip")
    ((_, _, files, _),) = fake.commits
    assert [f for f in files if "/" in f] == []
    assert {"config.json", "model.safetensors", "tokenizer.json", *CODE_FILES} <= set(files)


def test_push_refuses_results_without_a_card(published, tmp_path, monkeypatch, capsys):
    # --results only feed the card: with --no-card they were dropped without a word and the upload went ahead.
    from hf_clip.cli import main

    fake = FakeHub(monkeypatch)
    folder = shutil.copytree(published["prepared"], tmp_path / "model")
    results = tmp_path / "zero-shot.json"
    results.write_text(json.dumps({"task": "zero-shot", "model": "m", "dataset": "d", "metrics": {}}))
    assert main(["push", str(folder), "someone/tiny-clip", "--no-card", "--results", str(results)]) == 2
    assert "drop --no-card or --results" in capsys.readouterr().err
    assert fake.commits == []


def test_push_of_a_model_trained_with_hf_clip_never_writes_the_paper_card(tmp_path, monkeypatch):
    """A ViT-B/32 trained with examples/pretrain.py has a paper architecture; its pushed card must describe
    its own run, not claim OpenAI's data and ImageNet figure."""
    from hf_clip import HfClipConfig
    from hf_clip.cards import TRAINING_RECORD

    fake = FakeHub(monkeypatch)
    config = HfClipConfig.from_preset("ViT-B/32")
    setattr(config, TRAINING_RECORD, dict(_RECORD, dataset="my_org/captions"))
    config.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"")  # the card step reads the config only
    monkeypatch.setattr(hub, "check_model_folder", lambda folder: Path(folder))
    monkeypatch.setattr(hub, "prepare_for_hub", lambda folder: None)
    hub.push_folder(tmp_path / "run", "someone/my-clip")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "# CLIP model trained with hf_clip" in card and "| Data | my_org/captions, split `train` |" in card
    assert "- my_org/captions" in card  # the dataset in the card's metadata
    assert "63.2" not in card and "OpenAI (Radford" not in card
    assert "README.md" in fake.commits[0][2]


_RECORD = {
    "script": "examples/pretrain.py",
    "init": "random",
    "dataset": None,
    "dataset_config": None,
    "train_split": "train",
    "steps": 100,
    "global_batch_size": 256,
    "per_device_batch_size": 128,
    "gradient_accumulation_steps": 1,
    "num_processes": 2,
    "learning_rate": 5e-4,
    "weight_decay": 0.2,
    "warmup_steps": 10,
    "loss": "clip",
    "mixed_precision": "bf16",
    "seed": 0,
    "patch_dropout": 0.0,
}
