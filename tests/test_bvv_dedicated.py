"""experiments.bvv_dedicated: the dedicated bacterial-vs-viral layout reuses the three-class run's
own validation films (film for film) and keeps the hold-out apart."""

from __future__ import annotations

import pytest

from cxr_train.synthetic import write_kermany3_folder


def test_layout_reuses_the_three_class_validation_split(tmp_path):
    from cxr_train.config import parse_args
    from cxr_train.data import prepare_data
    from experiments.bvv_dedicated import _paths, layout, main

    root = write_kermany3_folder(tmp_path / "k3", n_patients=10, splits=("train", "test"), size=32)
    cfg = tmp_path / "3class.yaml"
    cfg.write_text(f"model_name_or_path: x\ndataset_name: {root / 'train'}\nlabel_from_filename: kermany3\n"
                   f"validation_fraction: 0.2\noutput_dir: {tmp_path / 'o'}\nseed: 42\n")
    counts = layout(str(cfg), root / "test", tmp_path / "bvv")

    _, d, t = parse_args(["--config", str(cfg)])
    data = prepare_data(d, seed=t.seed)
    names = data.id2label
    val = {p.split("/")[-1] for p, y in zip(_paths(data.splits["validation"]), data.splits["validation"]["label"])
           if names[y] != "NORMAL"}
    written = {p.name for p in (tmp_path / "bvv" / "pool" / "validation").rglob("*.jpeg")}
    assert written == val and val                                   # the same films, no NORMAL film
    assert all(p.is_symlink() for p in (tmp_path / "bvv").rglob("*.jpeg"))
    train = {p.name for p in (tmp_path / "bvv" / "pool" / "train").rglob("*.jpeg")}
    assert not train & written and not any(n.startswith("IM-") for n in train)
    assert counts["holdout"] == {"BACTERIAL": 20, "VIRAL": 20}       # 10 patients x 2 films each
    assert {p.parent.name for p in (tmp_path / "bvv" / "holdout").rglob("*.jpeg")} == {"BACTERIAL", "VIRAL"}
    with pytest.raises(SystemExit):                                  # never writes into a used folder
        main(["--config", str(cfg), "--holdout", str(root / "test"), "--out", str(tmp_path / "bvv")])
