"""The installable package: serving (cxr) imports nothing from training (cxr_train) and works
without the extras, base dependencies are serving only, requirements files agree
with pyproject.toml, and (slow) `pip install` of the checkout gives working console scripts
outside the repository."""

import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import ROOT, subprocess_env

SCRIPTS = ("cxr-train", "cxr-predict", "cxr-calibrate", "cxr-soup", "cxr-import-checkpoint", "cxr-push", "cxr-app", "cxr-space")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def _requirements(path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out[_name(line)] = line.replace(" ", "")
    return out


# What `pip install .` (no extras) does not install: the train, gradcam and space extras and
# what they pull in. A fresh interpreter with these made unimportable stands in for that install.
NOT_IN_BASE = ("datasets", "peft", "evaluate", "accelerate", "sklearn", "matplotlib", "scipy", "gradio",
               "pytorch_grad_cam", "cv2", "skimage", "pandas", "pyarrow", "cxr_train")
EXTRAS_ONLY = {"datasets", "peft", "evaluate", "accelerate", "scikit-learn", "matplotlib", "grad-cam", "gradio",
               "scipy", "opencv-python-headless", "scikit-image", "tensorboard"}

SERVE = """
import json, sys, cxr.inference
from pathlib import Path
from cxr.inference import Predictor, main
film = sorted(Path("app/examples").glob("*.jpeg"))[0]
p = Predictor.from_pretrained("models/efficientnet-lite0-imagenet-full")
r = p.predict(str(film), explain=True)
assert r.heatmap is not None and r.ood_score is not None, r
assert main(["--model", "models/efficientnet-lite0-imagenet-full", str(film)]) == 0
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None} & set(BAD))))
"""
# transformers itself imports accelerate (weight loading) and scipy (its loss modules) whenever
# they are installed; that is not the project's import, and the blocked run shows neither is needed.
TRANSFORMERS_OPPORTUNISTIC = ("accelerate", "scipy")


def _serve(block: bool) -> list[str]:
    bad = NOT_IN_BASE if block else tuple(m for m in NOT_IN_BASE if m not in TRANSFORMERS_OPPORTUNISTIC)
    prelude = f"BAD = {bad!r}\n"
    if block:   # None in sys.modules: import raises ImportError, importlib.util.find_spec says absent
        prelude += "import sys\nfor m in BAD: sys.modules[m] = None\n"
    out = subprocess.run([sys.executable, "-c", prelude + SERVE], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow   # fresh interpreters (subprocess snippets)
def test_serving_imports_nothing_from_training():
    """Loading the shipped default, predicting with a heat map and the OOD score, and the CLI
    import none of the training-only packages (nor pytorch_grad_cam: the map is closed-form);
    importing the serving modules imports none at all."""
    assert _serve(block=False) == []
    code = ("import sys, cxr.inference, cxr.explain, cxr.imaging, cxr.ood, cxr.locate; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_IN_BASE!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


@pytest.mark.slow
def test_serving_works_without_the_extras():
    """`pip install .` without extras: the same serving calls with every extra-only package
    unimportable still work (cxr_train and training then say which extra to install)."""
    assert _serve(block=True) == []
    code = "import sys\nsys.modules['datasets'] = None\nimport cxr_train.config"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "pip install 'cxr-transfer[train]'" in out.stderr, out.stderr[-2000:]


def _closure(requirements) -> set[str]:
    """Distributions the requirements install, transitively, as the installed metadata says
    (extras of dependencies are not followed: pip does not install them either)."""
    from importlib import metadata

    todo, seen = [_name(r) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if not (";" in r and "extra" in r.split(";", 1)[1])]
    return {n.replace("_", "-") for n in seen}


def test_base_dependencies_are_serving_only():
    base = pyproject()["project"]["dependencies"]
    pulled = _closure(base)
    assert "torch" in pulled and "transformers" in pulled and "timm" in pulled
    assert not pulled & EXTRAS_ONLY, sorted(pulled & EXTRAS_ONLY)


def test_requirements_agree_with_pyproject():
    project = pyproject()["project"]
    core = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    extras = {_name(r): r.replace(" ", "") for key in ("train", "gradcam", "space", "checkpoints", "track")
              for r in project["optional-dependencies"][key] if not r.startswith("cxr-transfer")}
    reqs = _requirements(ROOT / "requirements.txt")
    assert reqs == {**core, **extras}                                # same packages, same pins
    assert core["torch"] == "torch==2.14.1" and core["torchvision"] == "torchvision==0.29.1"
    app = _requirements(ROOT / "app" / "requirements.txt")
    for name, spec in app.items():                                   # the Space: a subset, same pins
        assert spec == {**core, **extras}[name], name
    assert not {"scikit-learn", "datasets", "peft", "evaluate", "accelerate", "matplotlib"} & set(app)
    train = {_name(r) for r in project["optional-dependencies"]["train"]}
    from cxr_train import TRAIN_REQUIREMENTS
    assert train == set(TRAIN_REQUIREMENTS.values())                # the import-time check names the same
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "playwright"} <= dev


def test_console_scripts_point_at_real_functions():
    import importlib

    scripts = pyproject()["project"]["scripts"]
    assert set(SCRIPTS) <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        module = module.replace("cxr_app", "app")                   # installed name of app/
        assert callable(getattr(importlib.import_module(module), func)), name


def test_markers_registered():
    markers = {m.split(":")[0] for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    assert markers == {"slow", "browser", "gpu", "bench"}


@pytest.mark.slow
def test_pip_install_outside_the_repository(tmp_path):
    """A venv (reusing this interpreter's installed dependencies), `pip install <copy of the
    checkout>` (not editable), then from another folder: import the Predictor and run each
    script's --help; then, with no --model, cxr-predict, cxr-app and python app/app.py serve the
    shipped default from there and from the repository root."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "checkpoints", "outputs", "test-output", "*.egg-info",
                                                              "__pycache__", "build", ".pytest_cache", "runs", "*.pyi"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The dependencies are the running interpreter's, whether it is a system Python or a user's
    # venv (--system-site-packages would see the base interpreter, not the venv): its
    # site-packages go on the new venv's path *after* the venv's own (plain path lines in a
    # .pth file: the parent's own .pth files, e.g. an editable install of this project, do not run).
    parent = [p for p in sys.path if p.rstrip("/").endswith("site-packages")]
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (installed / "_cxr_test_parent.pth").write_text("\n".join(parent) + "\n")
    py = venv / "bin" / "python"
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    # --no-deps: the dependencies are this interpreter's (the .pth above); the build
    # backend (setuptools) comes from the package index in an isolated build, as for a user
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--quiet", str(src)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import cxr, train_hf, cxr_app.app; from cxr.inference import Predictor; "
            "import pathlib; print(pathlib.Path(cxr.__file__).parent)")
    out = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(venv) in out.stdout and str(ROOT) not in out.stdout     # the installed copy
    assert (installed / "cxr_train" / "clinical_metrics" / "clinical_metrics.py").is_file()
    assert (installed / "cxr_train" / "model_card.md").is_file()
    shipped = sorted(p.name for p in (ROOT / "app" / "examples").glob("*.jpeg"))
    assert shipped and sorted(p.name for p in (installed / "cxr_app" / "examples").glob("*.jpeg")) == shipped
    record = next(installed.glob("cxr_transfer-*.dist-info")).joinpath("RECORD").read_text()
    assert "cxr_app/app.py," in record and ".pyi," not in record and "tests/" not in record
    for script in SCRIPTS:
        run = subprocess.run([str(venv / "bin" / script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "usage:" in run.stdout, (script, run.stderr[-2000:])
    _serves_the_default_with_no_model(venv, installed, src, elsewhere, env)


def _serves_the_default_with_no_model(venv, installed, src, elsewhere, env):
    """After the non-editable install, with no --model and no MODEL_ID: the default comes from
    the installed package data (cxr_models), and cxr-predict, cxr-app and python app/app.py
    serve it, from another folder and from the repository root (where the installed package,
    not the checkout, is imported: a default looked up beside it used to be missing)."""
    import socket
    import time
    import urllib.request
    from pathlib import Path

    from cxr.locate import DEFAULT_MODEL

    env = {k: v for k, v in env.items() if k not in ("CXR_MODEL", "MODEL_ID", "SPACE_ID")}
    py = venv / "bin" / "python"
    shipped = installed / "cxr_models" / DEFAULT_MODEL
    assert {"config.json", "model.safetensors", "ood.safetensors"} <= {p.name for p in shipped.iterdir()}
    where = subprocess.run([str(py), "-c", "import cxr.locate; print(cxr.locate.default_model_folder())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0 and Path(where.stdout.strip()) == shipped, where.stderr[-2000:]
    for cwd, film in ((elsewhere, str(src / "app" / "examples" / "film-1.jpeg")), (src, "app/examples/film-2.jpeg")):
        run = subprocess.run([str(venv / "bin" / "cxr-predict"), film], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        row = json.loads(run.stdout.strip().splitlines()[-1])
        assert row["file"] == Path(film).name and row["decision"] in ("NORMAL", "PNEUMONIA"), row
        assert row["ood_score"] is not None and DEFAULT_MODEL in run.stderr
        assert "backend is not available" not in run.stderr

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    servers = {}
    try:
        for name, argv in (("cxr-app", [str(venv / "bin" / "cxr-app")]), ("python app/app.py", [str(py), "app/app.py"])):
            port = free_port()
            servers[name] = (port, subprocess.Popen(argv + ["--port", str(port)], cwd=src, env=env, text=True,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for name, (port, proc) in servers.items():
            deadline, body = time.monotonic() + 300, None
            while body is None and time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as r:
                        body = r.read().decode()
                except OSError:
                    time.sleep(1)
            assert body is not None, (name, proc.poll(), proc.stderr.read()[-3000:] if proc.poll() is not None else "")
            assert DEFAULT_MODEL in body, name                                # the page names the model it serves
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
