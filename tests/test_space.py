"""The Space folder built by cxr.space, and push failures (offline: HF_HUB_OFFLINE=1 from conftest)."""

import os
import subprocess
import sys

import pytest
from huggingface_hub import SpaceCard

from cxr.hub import PushError
from cxr.space import DEFAULT_MODEL_ID, SERVING_MODULES, WEIGHT_PATTERNS, build_space_folder, main, push_space

TRAINING_ONLY = {"training", "data", "metrics", "modeling", "config", "hub", "plots", "synthetic", "space",
                 "checkpoints", "ood_fit"}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return build_space_folder(tmp_path_factory.mktemp("space") / "repo", model_id="someone/cxr-model")


def test_space_folder_layout(space):
    for name in ("app.py", "README.md", "requirements.txt", "cxr/__init__.py", "cxr/inference.py",
                 "cxr/imaging.py", "cxr/explain.py", "examples/ATTRIBUTION.md"):
        assert (space / name).is_file(), name
    bundled = {p.name for p in (space / "cxr").iterdir()}
    assert bundled == set(SERVING_MODULES)                # the explicit list, nothing else
    assert not {f"{m}.py" for m in TRAINING_ONLY} & bundled and not (space / "cxr" / "clinical_metrics").exists()
    assert len(list((space / "examples").glob("*.jpeg"))) == 6
    assert not [p for pat in WEIGHT_PATTERNS for p in space.rglob(pat)]
    assert not list(space.rglob("__pycache__"))
    reqs = (space / "requirements.txt").read_text()
    assert "torch==" in reqs and "gradio" in reqs and "pydicom" in reqs
    names = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in reqs.splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"scikit-learn", "datasets", "peft", "accelerate", "evaluate", "matplotlib"}, names


def _cxr_imports(path):
    """cxr modules a file imports (top level or inside functions): relative or absolute."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found |= {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "cxr" and "." in node.module:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxr.")}
    return found


def test_space_modules_are_closed_under_imports(space):
    """Every cxr module that app.py or a bundled module imports (even lazily) is bundled, so
    the Space never meets an ImportError at request time; none of them is training code."""
    bundled = {p.stem for p in (space / "cxr").glob("*.py")}
    for f in [space / "app.py", *(space / "cxr").glob("*.py")]:
        missing = _cxr_imports(f) - bundled
        assert not missing, f"{f.name} imports cxr.{', cxr.'.join(sorted(missing))}, not in SERVING_MODULES"
    assert not bundled & TRAINING_ONLY


def test_space_card(space):
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert str(card.data.sdk_version).startswith("6.")
    assert card.data.models == ["someone/cxr-model"]
    assert {"medical", "research-only"} <= set(card.data.tags)
    assert card.data.license == "cc-by-4.0"
    assert "not a medical device" in card.text and "MODEL_ID" in card.text


def test_local_model_folder_not_copied(trained_folder, tmp_path):
    dest = build_space_folder(tmp_path / "repo", model_id=str(trained_folder))
    assert SpaceCard.load(dest / "README.md").data.models[0] == DEFAULT_MODEL_ID   # the template's list, default first
    assert not [p for pat in WEIGHT_PATTERNS for p in dest.rglob(pat)]
    assert not (dest / "config.json").exists()


def test_bad_destination_and_model_id(space, tmp_path):
    with pytest.raises(FileExistsError):
        build_space_folder(space)
    with pytest.raises(ValueError, match="neither a local folder nor a Hub model id"):
        build_space_folder(tmp_path / "x", model_id="not a/valid id!")


@pytest.mark.slow   # a fresh interpreter imports gradio, torch and transformers
def test_app_imports_cxr_from_beside_itself(space):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import app, cxr, pathlib; here = pathlib.Path.cwd().resolve(); "
            "assert pathlib.Path(cxr.__file__).resolve().parent == here / 'cxr', cxr.__file__; "
            "assert len(app._examples()) == 6; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_push_offline_raises_clear_push_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(PushError) as e:
        push_space("someone/cxr-demo", model_id="someone/cxr-model")
    text = str(e.value)
    assert "push of the Space someone/cxr-demo failed" in text and "HF_HUB_OFFLINE" in text
    assert "Traceback" not in text and "\n" not in text
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_push_uses_space_repo_type_and_sets_model_id():
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            files = sorted(str(p.relative_to(kw["folder_path"])) for p in
                           __import__("pathlib").Path(kw["folder_path"]).rglob("*") if p.is_file())
            calls.append(("upload_folder", kw["repo_id"], {"repo_type": kw["repo_type"], "files": files}))
            return type("Info", (), {"commit_url": "https://huggingface.co/spaces/someone/cxr-demo/commit/1"})()

        def add_space_variable(self, repo_id, key, value, **kw):
            calls.append(("add_space_variable", repo_id, {key: value}))

    url = push_space("someone/cxr-demo", private=True, model_id="someone/cxr-model", api=FakeApi())
    assert url.endswith("/commit/1")
    (_, _, create), (_, _, upload), (_, _, var) = calls
    assert create == {"repo_type": "space", "space_sdk": "gradio", "exist_ok": True, "private": True}
    assert upload["repo_type"] == "space" and "app.py" in upload["files"] and "cxr/inference.py" in upload["files"]
    assert var == {"MODEL_ID": "someone/cxr-model"}


def test_cli_dry_run(tmp_path, capsys):
    assert main(["--dry_run", str(tmp_path / "dry")]) == 0
    assert (tmp_path / "dry" / "app.py").is_file()
    assert main(["--repo_id", "someone/cxr-demo"]) == 2
    assert "push of the Space" in capsys.readouterr().err
