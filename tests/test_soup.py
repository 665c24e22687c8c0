"""cxr-soup: the uniform weight average of runs of one recipe, finished by train_hf itself."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from cxr_train.soup import SoupError, average_state_dicts, check_members, main as soup_main
from tests.helpers import base_args


def _copy(folder, dest, **run_changes):
    shutil.copytree(folder, dest)
    if run_changes:
        run = yaml.safe_load((dest / "run_config.yaml").read_text())
        run.update(run_changes)
        (dest / "run_config.yaml").write_text(yaml.safe_dump(run))
    return dest


def test_average_is_the_mean_of_floating_tensors_and_keeps_counters(trained_folder, tmp_path):
    import torch
    from safetensors.torch import save_file

    a = load_file(str(trained_folder / "model.safetensors"))
    b = {k: (v * 3 if v.is_floating_point() else v + 7) for k, v in a.items()}
    save_file(b, str(tmp_path / "b.safetensors"))
    avg = average_state_dicts([trained_folder / "model.safetensors", tmp_path / "b.safetensors"])
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(avg[k], v * 2, atol=1e-6), k
        else:
            assert torch.equal(avg[k], v), k            # counters: the first member's


def test_members_must_share_their_start(trained_folder, tmp_path):
    same = _copy(trained_folder, tmp_path / "b", data_seed=1)
    assert len(check_members([trained_folder, same])) == 2          # another data order: a soup member
    other_seed = _copy(trained_folder, tmp_path / "c", seed=7)
    with pytest.raises(SoupError, match="seed differs"):
        check_members([trained_folder, other_seed])
    with pytest.raises(SoupError, match="at least two"):
        check_members([trained_folder])
    with pytest.raises(SoupError, match="named twice"):
        check_members([trained_folder, trained_folder])
    broken = _copy(trained_folder, tmp_path / "d")
    (broken / "model.safetensors").unlink()
    with pytest.raises(SoupError, match="missing model.safetensors"):
        check_members([trained_folder, broken])
    relabelled = _copy(trained_folder, tmp_path / "e")
    cfg = json.loads((relabelled / "config.json").read_text())
    cfg["id2label"] = {"0": "NORMAL", "1": "EFFUSION"}
    (relabelled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SoupError, match="different labels"):
        check_members([trained_folder, relabelled])


def test_bad_members_write_nothing(trained_folder, tmp_path, capsys):
    other_seed = _copy(trained_folder, tmp_path / "c", seed=7)
    out = tmp_path / "soup"
    assert soup_main(["--members", str(trained_folder), str(other_seed), "--", "--output_dir", str(out)]) == 2
    assert "seed differs" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "soup-average").exists()


@pytest.mark.slow
def test_soup_of_two_runs_is_a_complete_served_folder(kermany_folder, tmp_path):
    import torch

    import train_hf
    from cxr.inference import Predictor
    from tests.helpers import xrays

    members = []
    for seed in ("1", "2"):
        out = tmp_path / f"member{seed}"
        assert train_hf.main(base_args(kermany_folder, out, "--data_seed", seed, "--ood_fit", "false")) == 0
        members.append(out)
    soup = tmp_path / "soup"
    assert soup_main(["--members", *map(str, members), "--", *base_args(kermany_folder, soup)]) == 0

    weights = load_file(str(soup / "model.safetensors"))
    parts = [load_file(str(m / "model.safetensors")) for m in members]
    for k, v in weights.items():               # no training step ran on the average
        if v.is_floating_point():
            assert torch.allclose(v, (parts[0][k] + parts[1][k]) / 2, atol=1e-6), k
    cfg = json.loads((soup / "config.json").read_text())
    assert cfg["cxr_soup"]["members"] == ["member1", "member2"]
    assert cfg["cxr_soup"]["data_seeds"] == [1, 2]
    assert "threshold" in cfg["cxr_operating_point"]
    assert (soup / "ood.safetensors").is_file()                 # complete: the OOD check of the soup itself
    card = (soup / "README.md").read_text()
    assert "## Weight soup" in card and card.index("## Weight soup") < card.index("## Evaluation")
    assert "0 epoch" not in card, [l for l in card.splitlines() if "0 epoch" in l]   # the members were trained
    assert "-average" not in card, [l for l in card.splitlines() if "-average" in l]   # their start, not the average
    assert "| base model | tiny-resnet-scratch |" in card and "cxr-soup --members" in card
    assert cfg["cxr_training"]["base_model"] == cfg["cxr_soup"]["base_model"] == "tiny-resnet-scratch"
    pred = Predictor.from_pretrained(str(soup))
    assert pred.ood is not None                                  # the Predictor uses the soup's own OOD check
    r = pred.predict(xrays([3], size=96)[0])
    assert set(r.probabilities) == {"NORMAL", "PNEUMONIA"} and abs(sum(r.probabilities.values()) - 1) < 1e-6
