"""HfClipForImageClassification: Auto loading from a CLIP folder, the zero-shot start, training, the pipeline."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_modeling import pixels, tiny_config
from test_trainer import logged_losses, training_args
from transformers import AutoModel, AutoModelForImageClassification, Trainer, pipeline

from hf_clip import (
    HfClipForImageClassification,
    HfClipImageProcessor,
    HfClipModel,
    HfClipProcessor,
    HfClipTokenizer,
    ZeroShotClassifier,
)
from hf_clip.cards import render_model_card
from hf_clip.cli import main as hf_clip_main

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    open_clip = pytest.importorskip("open_clip")
    return HfClipTokenizer.from_openai_bpe(
        str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    )


def clip_folder(
    tmp_path: Path, vision_type: str, tokenizer: HfClipTokenizer, **kw
) -> tuple[HfClipModel, Path]:
    torch.manual_seed(0)
    config = tiny_config(vision_type, **kw)
    model = HfClipModel(config).eval()
    folder = tmp_path / f"clip_{vision_type}"
    model.save_pretrained(folder)
    HfClipProcessor(
        image_processor=HfClipImageProcessor.for_image_size(config.vision_config.image_size),
        tokenizer=tokenizer,
    ).save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_auto_class_loads_the_image_tower_of_a_clip_folder(tmp_path, tokenizer, vision_type):
    clip, folder = clip_folder(tmp_path, vision_type, tokenizer)
    model = AutoModelForImageClassification.from_pretrained(folder, num_labels=4)
    assert isinstance(model, HfClipForImageClassification) and model.config.num_labels == 4
    assert not any(
        name.startswith(("text_model", "text_projection", "logit")) for name, _ in model.named_parameters()
    )
    source = clip.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("classifier."):
            torch.testing.assert_close(tensor, source[name], rtol=0, atol=0, msg=name)

    x = pixels(clip.config, 4)
    labels = torch.tensor([0, 1, 2, 3])
    out = model(x, labels=labels)
    # The head reads the unit-norm image embedding of the CLIP model it came from.
    with torch.no_grad():
        features = F.normalize(clip.get_image_features(x), dim=-1)
    expected = features @ model.classifier.weight.t() + model.classifier.bias
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0

    # Every token returned with hidden states or attentions changes no logit; multi-label targets get BCE.
    full = model(x, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(full.logits, out.logits, rtol=1e-5, atol=1e-6)
    assert len(full.hidden_states) > 1 and len(full.attentions) >= 1
    model.config.problem_type = "multi_label_classification"
    multi = F.one_hot(labels, 4).float()
    torch.testing.assert_close(
        model(x, labels=multi).loss,
        F.binary_cross_entropy_with_logits(out.logits, multi),
        rtol=1e-5,
        atol=1e-6,
    )
    assert model(x, return_dict=False)[0].shape == (4, 4)


@pytest.mark.parametrize("vision_type,bias", [("vit", None), ("resnet", None), ("vit", -10.0)])
def test_from_zero_shot_gives_the_zero_shot_logits(tmp_path, tokenizer, vision_type, bias):
    clip, _ = clip_folder(tmp_path, vision_type, tokenizer, logit_bias_init_value=bias)
    zero_shot = ZeroShotClassifier.from_model(clip, tokenizer, CLASSES, templates="imagenet", progress=False)
    model = HfClipForImageClassification.from_zero_shot(clip, zero_shot).eval()
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.label2id["dog"] == 1
    x = pixels(clip.config, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, zero_shot(x), rtol=1e-5, atol=1e-5)
    # A copy: fine-tuning the classifier leaves the CLIP model alone.
    assert model.visual_projection is not clip.visual_projection
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(
        model.get_input_embeddings().weight, clip.vision_model.get_input_embeddings().weight
    )

    other = ZeroShotClassifier(torch.randn(3, 7), 1.0, CLASSES, ["{}"])
    with pytest.raises(ValueError, match="embeds in 32 dimensions"):
        HfClipForImageClassification.from_zero_shot(clip, other)


def test_saved_classifier_round_trips_and_serves_the_image_classification_pipeline(
    tmp_path, tokenizer, monkeypatch
):
    # The pipeline looks for a video processor too; it must not ask the user to trust remote code for one.
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail(f"prompted: {args}"))
    clip, folder = clip_folder(tmp_path, "vit", tokenizer)
    zero_shot = ZeroShotClassifier.from_model(clip, tokenizer, CLASSES, progress=False)
    model = HfClipForImageClassification.from_zero_shot(clip, zero_shot).eval()
    out_dir = tmp_path / "classifier"
    model.save_pretrained(out_dir)
    HfClipImageProcessor.from_pretrained(folder).save_pretrained(out_dir)

    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["HfClipForImageClassification"]
    # No entry sends AutoModel to the contrastive model, whose text tower this folder lacks.
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hf_clip.HfClipConfig",
        "AutoModelForImageClassification": "modeling_hf_clip.HfClipForImageClassification",
    }
    loaded = AutoModelForImageClassification.from_pretrained(out_dir).eval()
    x = pixels(clip.config, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)

    images = [
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (40, 48, 3), dtype=np.uint8)) for i in (0, 1)
    ]
    classify = pipeline("image-classification", model=str(out_dir), top_k=None)
    results = classify(images)
    with torch.no_grad():
        expected = zero_shot(
            HfClipImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
        )
    for result, row in zip(results, expected.softmax(-1)):
        assert [r["label"] for r in result] == [CLASSES[i] for i in row.argsort(descending=True)]
        np.testing.assert_allclose([r["score"] for r in result], row.sort(descending=True).values, atol=1e-5)


def test_folders_load_as_classifiers_with_trust_remote_code_where_hf_clip_is_not_installed(
    tmp_path, tokenizer
):
    """A saved CLIP folder starts a classifier (`num_labels=...`), and a classifier folder prepared for the Hub
    (`hf-clip push`: no tokenizer) serves the image-classification pipeline, both from the shipped code."""
    from test_hub import BLOCK_HF_CLIP, run_isolated

    from hf_clip.hub import CLASSIFIER_AUTO_CLASSES, prepare_for_hub

    clip, folder = clip_folder(tmp_path, "vit", tokenizer)
    zero_shot = ZeroShotClassifier.from_model(clip, tokenizer, CLASSES, progress=False)
    out_dir = tmp_path / "classifier"
    HfClipForImageClassification.from_zero_shot(clip, zero_shot).save_pretrained(out_dir)
    HfClipImageProcessor.from_pretrained(folder).save_pretrained(out_dir)
    prepare_for_hub(out_dir)
    # Still no entry sending AutoModel to the contrastive model.
    assert set(json.loads((out_dir / "config.json").read_text())["auto_map"]) == set(CLASSIFIER_AUTO_CLASSES)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    script = BLOCK_HF_CLIP + textwrap.dedent(
        """
        import json

        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline

        clip_dir, classifier_dir, image = sys.argv[1:4]
        fresh = AutoModelForImageClassification.from_pretrained(clip_dir, num_labels=4, trust_remote_code=True)
        tower = {k: v.tolist() for k, v in fresh.state_dict().items() if not k.startswith("classifier.")}
        classify = pipeline("image-classification", model=classifier_dir, trust_remote_code=True, top_k=None)
        report = {"fresh": [type(fresh).__name__, fresh.config.num_labels], "tower": tower}
        print("REPORT" + json.dumps({**report, "results": classify(Image.open(image))}))
        """
    )
    report = run_isolated(script, [str(folder), str(out_dir), str(tmp_path / "image.png")], tmp_path)
    assert report["fresh"] == ["HfClipForImageClassification", 4]
    source = clip.state_dict()
    for name, values in report["tower"].items():
        torch.testing.assert_close(torch.tensor(values), source[name], rtol=0, atol=0, msg=name)
    expected = pipeline("image-classification", model=str(out_dir), top_k=None)(image)
    assert [r["label"] for r in report["results"]] == [r["label"] for r in expected]
    np.testing.assert_allclose(
        [r["score"] for r in report["results"]], [r["score"] for r in expected], atol=1e-6
    )


def test_trainer_fine_tunes_the_classifier(tmp_path, tokenizer):
    clip, folder = clip_folder(tmp_path, "vit", tokenizer)
    model = AutoModelForImageClassification.from_pretrained(folder, num_labels=2)
    generator = torch.Generator().manual_seed(0)
    size = clip.config.vision_config.image_size
    labels = torch.arange(64) % 2
    # Two separable classes: a bright or a dark image, with noise.
    images = torch.randn(64, 3, size, size, generator=generator) * 0.3 + (labels * 2.0 - 1.0).view(
        -1, 1, 1, 1
    )
    rows = [{"pixel_values": image, "labels": int(label)} for image, label in zip(images, labels)]
    args = training_args(
        tmp_path / "run", per_device_train_batch_size=16, num_train_epochs=4, learning_rate=1e-2
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = list(logged_losses(trainer).values())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).logits.argmax(-1) == labels).float().mean()
    assert accuracy == 1.0


def test_classifier_folders_are_refused_where_both_towers_are_needed(tmp_path, tokenizer, capsys):
    clip, folder = clip_folder(tmp_path, "vit", tokenizer)
    out_dir = tmp_path / "classifier"
    AutoModelForImageClassification.from_pretrained(folder, num_labels=3).save_pretrained(out_dir)
    HfClipImageProcessor.from_pretrained(folder).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with pytest.raises(ValueError, match="image classifier.*no text tower.*image-classification"):
        render_model_card(out_dir)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "data.csv").write_text("image,label\na.png,cat\n")
    argv = ["eval", "zero-shot", "--model", str(out_dir), "--dataset", str(tmp_path / "data.csv")]
    argv += ["--classnames", "cat,dog", "--output_dir", str(tmp_path / "out")]
    assert hf_clip_main(argv) == 2
    assert "no text tower" in capsys.readouterr().err
    from test_pretrain import tiny_args

    from hf_clip.training import run_pretraining

    with pytest.raises(ValueError, match="no text tower.*contrastive training"):
        run_pretraining(tiny_args(tmp_path / "pretrain", model=str(out_dir)))
    # Loaded as the contrastive model anyway (AutoModel with hf_clip imported), it says what is missing.
    from transformers.testing_utils import CaptureLogger

    from hf_clip import modeling_hf_clip

    with CaptureLogger(modeling_hf_clip.logger) as captured:
        AutoModel.from_pretrained(out_dir)
    assert "random text tower" in captured.out
    # The contrastive folder itself still loads as the contrastive model.
    assert isinstance(AutoModel.from_pretrained(folder), HfClipModel)


def test_wise_ft_interpolates_the_weights(tmp_path, tokenizer):
    from hf_clip.training import wise_ft

    clip, _ = clip_folder(tmp_path, "resnet", tokenizer)  # BatchNorm statistics are interpolated too
    zero_shot = HfClipForImageClassification.from_zero_shot(
        clip, ZeroShotClassifier.from_model(clip, tokenizer, CLASSES, progress=False)
    )
    fine_tuned = HfClipForImageClassification.from_zero_shot(
        clip, ZeroShotClassifier.from_model(clip, tokenizer, CLASSES, progress=False)
    ).train()
    optimizer = torch.optim.SGD(fine_tuned.parameters(), lr=0.5)
    for _ in range(2):
        fine_tuned(pixels(clip.config, 4), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {k: v.clone() for k, v in zero_shot.state_dict().items()}
    start, end = zero_shot.state_dict(), fine_tuned.state_dict()
    assert not torch.equal(start["vision_model.bn1.running_mean"], end["vision_model.bn1.running_mean"])

    for alpha, expected in ((0, start), (1.0, end)):
        merged = wise_ft(zero_shot, fine_tuned, alpha).state_dict()
        assert all(torch.equal(merged[k], expected[k]) for k in expected), alpha
    half = wise_ft(zero_shot, fine_tuned, np.linspace(0, 1, 3)[1])  # numpy scalars are numbers too
    for key, value in half.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (start[key] + end[key]) / 2, msg=key)
        else:  # counts: from the model alpha is nearer to (the fine-tuned one at 0.5)
            assert torch.equal(value, end[key]), key
    assert all(torch.equal(v, before[k]) for k, v in zero_shot.state_dict().items())  # inputs unchanged
    assert half.config.id2label == zero_shot.config.id2label and half is not zero_shot

    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        wise_ft(zero_shot, fine_tuned, 1.5)
    with pytest.raises(TypeError, match="HfClipForImageClassification with a HfClipModel"):
        wise_ft(zero_shot, clip, 0.5)
    relabelled = HfClipForImageClassification.from_zero_shot(
        clip, ZeroShotClassifier.from_model(clip, tokenizer, CLASSES[::-1], progress=False)
    )
    with pytest.raises(ValueError, match="labels .* differ"):
        wise_ft(zero_shot, relabelled, 0.5)
    other = AutoModelForImageClassification.from_pretrained(
        clip_folder(tmp_path, "vit", tokenizer)[1], num_labels=3
    )
    other.config.id2label = zero_shot.config.id2label
    with pytest.raises(ValueError, match="differ in .* weights"):
        wise_ft(zero_shot, other, 0.5)


def fine_tune_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fine_tune", Path(__file__).parents[1] / "examples/fine_tune.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_fine_tune_example_refuses_a_missing_or_classifier_model_folder(tmp_path, tokenizer, capsys):
    """Before pretraining, the default --model outputs/pretrain does not exist: the example says how to make it
    (transformers would look for a Hub repository of that name and fail on the network). A classifier folder
    has no text tower for the zero-shot start."""
    example = fine_tune_example()
    with pytest.raises(SystemExit):
        example.main(["--model", str(tmp_path / "outputs" / "pretrain")])
    assert "examples/pretrain.py" in capsys.readouterr().err
    _, folder = clip_folder(tmp_path, "vit", tokenizer)
    out_dir = tmp_path / "classifier"
    AutoModelForImageClassification.from_pretrained(folder, num_labels=3).save_pretrained(out_dir)
    HfClipProcessor.from_pretrained(folder).save_pretrained(out_dir)
    with pytest.raises(ValueError, match="no text tower.*zero-shot start"):
        example.main(["--model", str(out_dir)])


def test_fine_tune_example_writes_the_wise_ft_curve(tmp_path, tokenizer):
    """examples/fine_tune.py on a tiny model: alpha = 0 scores exactly as the zero-shot classifier does."""
    from hf_clip.data import load_synthetic_clip_dataset, synthetic_zero_shot_templates
    from hf_clip.evaluation import evaluate_robustness

    clip, folder = clip_folder(tmp_path, "vit", tokenizer)
    example = fine_tune_example()
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--output_dir", str(out), "--max_steps", "3", "--batch_size", "8"]
    results = example.main([*argv, "--train_samples", "32", "--eval_samples", "24", "--alphas", "0,1"])

    processor = HfClipProcessor.from_pretrained(folder)
    data = {
        name: load_synthetic_clip_dataset(split, 24, image_size=32)
        for name, split in ((example.SEEN, "validation"), (example.HELD_OUT, "test"))
    }
    classes = data[example.SEEN].features["shape"].names
    zero_shot = evaluate_robustness(
        clip,
        processor,
        data,
        label_column="shape",
        classnames=classes,
        templates=synthetic_zero_shot_templates("shape"),
    )
    assert results["0"] == pytest.approx({k: v["top1_accuracy"] for k, v in zero_shot.per_dataset.items()})
    record = json.loads((out / "wise_ft.json").read_text())
    assert record["top1"] == results and set(results) == {"0", "1"}
    assert (out / "wise_ft.md").read_text().count("\n") == 4
    assert (out / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
