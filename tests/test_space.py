"""The Space folder built by cxr_train.space, and push failures (offline: HF_HUB_OFFLINE=1 from conftest)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard

from cxr_train.hub import PushError
from cxr_train.space import APP_DIR, DEFAULT_MODEL_ID, WEIGHT_PATTERNS, build_space_folder, main, push_space

import cxr

TRAINING_ONLY = {"cxr_train", "datasets", "peft", "evaluate", "accelerate", "sklearn", "matplotlib"}
SERVING_DIR = Path(cxr.__file__).resolve().parent


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return build_space_folder(tmp_path_factory.mktemp("space") / "repo", model_id="someone/cxr-model")


def _tree(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_space_folder_layout(space):
    for name in ("app.py", "handlers.py", "render.py", "files.py", "README.md", "requirements.txt",
                 "cxr/__init__.py", "cxr/inference.py", "cxr/explain.py", "examples/ATTRIBUTION.md"):
        assert (space / name).is_file(), name
    # app/'s modules, top-level files beside app.py (no package __init__.py, no Gradio *.pyi stubs)
    assert {p.name for p in space.glob("*.py")} == {p.name for p in APP_DIR.glob("*.py")} - {"__init__.py"}
    assert not list(space.rglob("*.pyi"))
    assert _tree(space / "cxr") == _tree(SERVING_DIR)    # the serving package whole, nothing else
    assert len(list((space / "examples").glob("*.jpeg"))) == 6
    assert not [p for pat in WEIGHT_PATTERNS for p in space.rglob(pat)]
    assert not list(space.rglob("__pycache__"))
    reqs = (space / "requirements.txt").read_text()
    assert "torch==" in reqs and "gradio" in reqs and "pydicom" in reqs
    names = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in reqs.splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"scikit-learn", "datasets", "peft", "accelerate", "evaluate", "matplotlib"}, names


def _imports(path, root):
    """(absolute module names, cxr-relative module paths) a file imports, top level or lazily."""
    import ast

    here = path.relative_to(root).with_suffix("").parts[:-1]     # the file's package, e.g. ('cxr', 'imaging')
    absolute, local = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = (*base, *(node.module.split(".") if node.module else ()))
                local |= {mod} if node.module else {(*mod, a.name) for a in node.names}
            else:
                absolute.add(node.module)
        elif isinstance(node, ast.Import):
            absolute |= {a.name for a in node.names}
    local |= {tuple(m.split(".")) for m in absolute if m.split(".")[0] == "cxr"}
    return absolute, local


def test_space_modules_are_closed_under_imports(space):
    """Every cxr module that app.py, its sibling modules or a bundled module imports (even
    lazily) is bundled, so the Space never meets an ImportError at request time; none of them
    imports training code or a training-only dependency. The app's modules import each other
    relatively (the cxr_app package) or, in a Space, absolutely as top-level modules: both ways
    name the same siblings, all at the Space root, and nothing else is left unresolved."""
    for f in [*space.glob("*.py"), *(space / "cxr").rglob("*.py")]:
        absolute, local = _imports(f, space)
        for mod in local:
            target = space.joinpath(*mod)
            assert target.with_suffix(".py").is_file() or (target / "__init__.py").is_file(), (f, mod)
        bad = {m for m in absolute if m.split(".")[0] in TRAINING_ONLY}
        assert not bad, f"{f.relative_to(space)} imports {sorted(bad)}"
    siblings = {p.stem for p in space.glob("*.py")}
    for f in space.glob("*.py"):
        absolute, local = _imports(f, space)
        relative = {m[0] for m in local if m[0] != "cxr"}
        tops = {m.split(".")[0] for m in absolute}
        assert relative == tops & siblings, (f.name, relative, tops & siblings)   # package and Space agree
        unresolved = {m for m in tops - siblings - {"cxr"} - set(sys.stdlib_module_names)
                      if importlib.util.find_spec(m) is None}
        assert not unresolved, f"{f.name} imports {sorted(unresolved)}: neither beside it nor installed"


def test_space_card(space):
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert str(card.data.sdk_version).startswith("6.")
    assert card.data.models == ["someone/cxr-model"]
    assert {"medical", "research-only"} <= set(card.data.tags)
    assert card.data.license == "cc-by-4.0"
    assert "not a medical device" in card.text and "MODEL_ID" in card.text


@pytest.mark.slow   # a trained model: the session's real training
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
    """In the Space, app.py and its sibling modules are top-level modules: app.py finds them,
    and cxr, beside itself, both imported (as Gradio's runner does) and run as a script."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import app, cxr, handlers, pathlib; here = pathlib.Path.cwd().resolve(); "
            "assert pathlib.Path(cxr.__file__).resolve().parent == here / 'cxr', cxr.__file__; "
            "mods = (app, app.files, app.handlers, app.render); "
            "assert all(pathlib.Path(m.__file__).resolve().parent == here for m in mods), mods; "
            "assert app.handlers is handlers and len(handlers.example_paths()) == 6; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    script = subprocess.run([sys.executable, "app.py", "--help"], cwd=space, env=env, capture_output=True,
                            text=True, timeout=300)
    assert script.returncode == 0 and "usage:" in script.stdout, script.stderr[-2000:]


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
    assert {"handlers.py", "render.py", "files.py"} <= set(upload["files"])
    assert var == {"MODEL_ID": "someone/cxr-model"}


def test_cli_dry_run(tmp_path, capsys):
    assert main(["--dry_run", str(tmp_path / "dry")]) == 0
    assert (tmp_path / "dry" / "app.py").is_file()
    assert main(["--repo_id", "someone/cxr-demo"]) == 2
    assert "push of the Space" in capsys.readouterr().err
