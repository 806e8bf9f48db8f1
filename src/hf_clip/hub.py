"""Publishing saved hf_clip folders to the Hugging Face Hub so they load without hf_clip installed.

transformers loads a custom architecture with `trust_remote_code=True` when the repository carries the
model's Python files and an `auto_map` naming, for each Auto class, the module and class to use.
`prepare_for_hub` copies those files next to the weights and writes the `auto_map` into every config file an
Auto class reads (config.json, tokenizer_config.json, preprocessor_config.json, processor_config.json);
`push_folder` then uploads the folder with `HfApi.upload_folder`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_write_text

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent

# The self-contained model code: these modules (and whatever they import relatively) ship with the weights.
CODE_FILES = (
    "configuration_hf_clip.py",
    "modeling_hf_clip.py",
    "tokenization_hf_clip.py",
    "image_processing_hf_clip.py",
    "processing_hf_clip.py",
)

# Auto class -> "module.Class" ([slow, fast] for tokenizers, as transformers reads them).
AUTO_MAP: dict[str, Any] = {
    "AutoConfig": "configuration_hf_clip.HfClipConfig",
    "AutoModel": "modeling_hf_clip.HfClipModel",
    "AutoModelForZeroShotImageClassification": "modeling_hf_clip.HfClipModel",
    "AutoModelForImageClassification": "modeling_hf_clip.HfClipForImageClassification",
    "AutoTokenizer": ["tokenization_hf_clip.HfClipTokenizer", None],
    "AutoImageProcessor": "image_processing_hf_clip.HfClipImageProcessor",
    "AutoProcessor": "processing_hf_clip.HfClipProcessor",
}

# Which config file (and key inside it: transformers v5 nests the image processor's settings under
# "image_processor" in processor_config.json) each Auto class reads its auto_map from; config.json carries the
# whole map as a fallback.
_AUTO_MAP_FILES = {
    ("config.json", None): tuple(AUTO_MAP),
    ("tokenizer_config.json", None): ("AutoTokenizer", "AutoProcessor"),
    ("preprocessor_config.json", None): ("AutoImageProcessor", "AutoProcessor"),
    ("processor_config.json", None): ("AutoProcessor",),
    ("processor_config.json", "image_processor"): ("AutoImageProcessor", "AutoProcessor"),
}

# A fine-tuned image classifier's folder (HfClipForImageClassification) holds the image tower alone: it needs
# no tokenizer, and gets only these entries (AutoModel would build the contrastive model, text tower random).
CLASSIFIER_AUTO_CLASSES = ("AutoConfig", "AutoModelForImageClassification", "AutoImageProcessor")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Only the folder's own files go up: a save_pretrained folder is flat, and a subfolder is training state (the
# pretraining script's checkpoints/step_N with full model copies, TensorBoard logs, a tokenizer/ copy).
UPLOAD_IGNORE = [
    ".*",
    "**/.*",
    "*/*",
    "__pycache__/*",
    "*.pyc",
    "*.tmp",
    *[f"*{s}" for s in UNSAFE_WEIGHT_SUFFIXES],
]


def _check_portable(path: Path) -> list[str]:
    """Relative imports (module names) of a code file; errors for imports that break outside hf_clip."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    relative = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 1 and not node.module):
                raise ValueError(
                    f"{path.name} line {node.lineno} imports from a parent package; code shipped to the Hub must only "
                    "import sibling modules (`from .configuration_hf_clip import ...`)."
                )
            if node.level == 1:
                relative.append(node.module.split(".")[0])
            elif node.module and node.module.split(".")[0] == "hf_clip":
                raise ValueError(
                    f"{path.name} line {node.lineno} imports `{node.module}`; users loading with trust_remote_code "
                    "do not have hf_clip, so use a relative import of a sibling module instead."
                )
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hf_clip" for a in node.names):
            raise ValueError(
                f"{path.name} line {node.lineno} imports hf_clip; use a relative import instead."
            )
    return relative


def code_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """CODE_FILES plus their relative imports, recursively, each checked to run outside the package."""
    queue = [package_dir / name for name in CODE_FILES]
    seen: dict[str, Path] = {}
    while queue:
        path = queue.pop(0)
        if path.name in seen:
            continue
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; hf_clip's model code is incomplete (reinstall hf_clip)."
            )
        seen[path.name] = path
        queue += [package_dir / f"{module}.py" for module in _check_portable(path)]
    return list(seen.values())


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_model_folder(model_dir: str | os.PathLike) -> Path:
    """A saved hf_clip folder with safetensors weights, tokenizer and image-processor files, or a clear error."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}/config.json not found; save the model with save_pretrained first."
        )
    config = _read_json(model_dir / "config.json")
    if config.get("model_type") != "hf_clip":
        raise ValueError(
            f"{model_dir} holds a {config.get('model_type')!r} model, not hf_clip; convert it with `hf-clip convert`."
        )
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        unsafe = sorted(p.name for p in model_dir.iterdir() if p.suffix in UNSAFE_WEIGHT_SUFFIXES)
        hint = f" ({', '.join(unsafe)} are pickle files and are not uploaded)" if unsafe else ""
        raise FileNotFoundError(
            f"No model.safetensors in {model_dir}{hint}; re-save the model with save_pretrained (safetensors)."
        )
    missing = []
    if not _is_classifier(config) and not (model_dir / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not _has_image_processor(model_dir):
        missing.append("the image processor (preprocessor_config.json or processor_config.json)")
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks {' and '.join(missing)}: save the processor next to the model "
            "(processor.save_pretrained(model_dir); an image classifier's image processor) so the repository "
            "can encode text and images."
        )
    return model_dir


def _is_classifier(config: dict[str, Any]) -> bool:
    """A folder saved by HfClipForImageClassification (see CLASSIFIER_AUTO_CLASSES)."""
    return "HfClipForImageClassification" in (config.get("architectures") or [])


def _has_image_processor(model_dir: Path) -> bool:
    if (model_dir / "preprocessor_config.json").is_file():
        return True
    path = model_dir / "processor_config.json"
    return path.is_file() and isinstance(_read_json(path).get("image_processor"), dict)


def prepare_for_hub(model_dir: str | os.PathLike) -> list[Path]:
    """Copy the model code into `model_dir` and write `auto_map` into its config files; returns changed files."""
    model_dir = check_model_folder(model_dir)
    classifier = _is_classifier(_read_json(model_dir / "config.json"))
    changed = []
    for source in code_files():
        target = model_dir / source.name
        shutil.copyfile(source, target)
        changed.append(target)
    for name in dict.fromkeys(name for name, _ in _AUTO_MAP_FILES):
        path = model_dir / name
        if not path.is_file():
            continue
        data = _read_json(path)
        for (file_name, key), auto_classes in _AUTO_MAP_FILES.items():
            section = data if key is None else data.get(key)
            if file_name == name and isinstance(section, dict):
                _add_auto_map(
                    section, [c for c in auto_classes if not classifier or c in CLASSIFIER_AUTO_CLASSES]
                )
        _write_json(path, data)
        changed.append(path)
    return changed


def _add_auto_map(section: dict[str, Any], auto_classes: Sequence[str]) -> None:
    auto_map = section.get("auto_map") or {}
    if isinstance(auto_map, list):  # legacy tokenizer form: [slow, fast]
        auto_map = {"AutoTokenizer": auto_map}
    section["auto_map"] = {**auto_map, **{key: AUTO_MAP[key] for key in auto_classes}}


def _ensure_card(model_dir: Path, results: Sequence[str | os.PathLike]) -> None:
    if (model_dir / "README.md").is_file() and not results:
        return
    from .cards import load_results, render_model_card

    loaded = [load_results(p, model_dir) for p in results]
    try:
        _, card = render_model_card(model_dir, loaded)
    except ValueError as err:
        if results:
            raise
        logger.warning("No model card written: %s", err)
        return
    atomic_write_text(model_dir / "README.md", card)


def push_folder(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload hf_clip model",
    results: Sequence[str | os.PathLike] = (),
    write_card: bool = True,
) -> Any:
    """Prepare `model_dir` (code, auto_map, card) and upload it to `repo_id`; returns the commit info."""
    from huggingface_hub import HfApi

    if results and not write_card:
        raise ValueError(
            "results are rendered into the model card, so they need the card: drop --no-card or --results."
        )
    model_dir = check_model_folder(model_dir)
    prepare_for_hub(model_dir)
    if write_card:
        _ensure_card(model_dir, results)
    skipped = sorted(p.name + "/" for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if skipped:
        logger.warning(
            "Not uploading the subfolders %s of %s: a saved model is flat, and subfolders hold training "
            "state (checkpoints, logs, a spare tokenizer copy).",
            ", ".join(skipped),
            model_dir,
        )
    api = HfApi(token=token, library_name="hf_clip")
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", repo_id)
    if revision is not None and not revision.startswith("refs/pr/"):
        # upload_folder commits only to an existing branch; create it the way transformers' push_to_hub does.
        try:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        except Exception as error:
            # A pull request on a repository one cannot write to: the branch must already exist there.
            if not (create_pr and getattr(getattr(error, "response", None), "status_code", None) == 403):
                raise
    return api.upload_folder(
        folder_path=str(model_dir),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE,
    )


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="Upload a saved model folder to the Hub, loadable with trust_remote_code=True.",
        description="Copy hf_clip's model code and auto_map into DIR, write its model card when missing, and upload "
        "it to the Hub repository REPO_ID (created if needed). Log in first with `hf auth login` or pass --token.",
    )
    parser.add_argument(
        "model_dir", metavar="DIR", help="Folder with config, safetensors weights and processor files."
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. your-name/clip-vit-b-32.")
    parser.add_argument("--token", help="Hub token (default: the stored login).")
    parser.add_argument(
        "--private", action="store_true", default=None, help="Create the repository as private."
    )
    parser.add_argument("--revision", help="Branch to push to (created from main if it does not exist).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit-message", default="Upload hf_clip model")
    parser.add_argument(
        "--results", nargs="*", default=[], help="Results JSON files to render into the card."
    )
    parser.add_argument("--no-card", action="store_true", help="Do not write README.md.")
    parser.set_defaults(func=run_push)
    return parser


class HubUploadError(RuntimeError):
    """The Hub could not be reached or refused the upload (network, login, permissions)."""


def _is_hub_failure(error: Exception) -> bool:
    # huggingface_hub's HTTP errors and a missing login are OSErrors; its HTTP client's connection errors
    # (httpx) are not.
    if isinstance(error, (FileNotFoundError, FileExistsError)):
        return False  # the local folder: already a clear message
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in (
        "httpx",
        "httpx2",
        "requests",
    )


def run_push(args: argparse.Namespace) -> Any:
    try:
        info = push_folder(
            args.model_dir,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            results=args.results,
            write_card=not args.no_card,
        )
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        raise HubUploadError(
            f"uploading {args.model_dir} to {args.repo_id} failed ({type(error).__name__}: {error}). Check the "
            "network connection, the login (`hf auth login` or --token) and write access to the repository."
        ) from error
    print(f"Uploaded {args.model_dir} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return info


__all__ = [
    "AUTO_MAP",
    "CLASSIFIER_AUTO_CLASSES",
    "CODE_FILES",
    "HubUploadError",
    "add_push_parser",
    "check_model_folder",
    "code_files",
    "prepare_for_hub",
    "push_folder",
    "run_push",
]
