"""The installable package: serving imports nothing from training, requirements files agree
with pyproject.toml, and (slow) `pip install` of the checkout gives working console scripts
outside the repository."""

import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import ROOT, subprocess_env

TRAINING_MODULES = ("sklearn", "datasets", "scipy", "peft", "evaluate", "accelerate", "gradio",
                    "cxr.training", "cxr.data", "cxr.metrics", "cxr.modeling", "cxr.config", "cxr.hub")
SCRIPTS = ("cxr-train", "cxr-predict", "cxr-import-checkpoint", "cxr-push", "cxr-app", "cxr-space")


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


@pytest.mark.parametrize("module", ["cxr.inference", "cxr.explain", "cxr.imaging"])
def test_serving_imports_nothing_from_training(module):
    code = (f"import sys, {module}; "
            f"bad = sorted(m for m in sys.modules if m in {TRAINING_MODULES!r} or m.split('.')[0] in {TRAINING_MODULES!r}); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_requirements_agree_with_pyproject():
    project = pyproject()["project"]
    core = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    extras = {_name(r): r.replace(" ", "") for key in ("space", "checkpoints")
              for r in project["optional-dependencies"][key]}
    reqs = _requirements(ROOT / "requirements.txt")
    assert reqs == {**core, **extras}                                # same packages, same pins
    assert core["torch"] == "torch==2.14.1" and core["torchvision"] == "torchvision==0.29.1"
    app = _requirements(ROOT / "app" / "requirements.txt")
    for name, spec in app.items():                                   # the Space: a subset, same pins
        assert spec == {**core, **extras}[name], name
    assert not {"scikit-learn", "datasets", "peft", "evaluate", "accelerate", "matplotlib"} & set(app)
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "playwright"} <= dev


def test_console_scripts_point_at_real_functions():
    import importlib

    scripts = pyproject()["project"]["scripts"]
    assert set(SCRIPTS) <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        if module == "cxr.checkpoints" and importlib.util.find_spec(module) is None:
            continue   # written on another branch; the entry point is declared ahead of it
        module = module.replace("cxr_app", "app")                   # installed name of app/
        assert callable(getattr(importlib.import_module(module), func)), name


def test_markers_registered():
    markers = {m.split(":")[0] for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    assert markers == {"slow", "browser", "gpu", "bench"}


@pytest.mark.slow
def test_pip_install_outside_the_repository(tmp_path):
    """A venv (reusing this interpreter's installed dependencies), `pip install <copy of the
    checkout>`, then from another folder: import the Predictor and run each script's --help."""
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
    assert (installed / "cxr" / "clinical_metrics" / "clinical_metrics.py").is_file()
    shipped = sorted(p.name for p in (ROOT / "app" / "examples").glob("*.jpeg"))
    assert shipped and sorted(p.name for p in (installed / "cxr_app" / "examples").glob("*.jpeg")) == shipped
    record = next(installed.glob("cxr_transfer-*.dist-info")).joinpath("RECORD").read_text()
    assert "cxr_app/app.py," in record and ".pyi," not in record and "tests/" not in record
    for script in SCRIPTS:
        if script == "cxr-import-checkpoint" and not (ROOT / "cxr" / "checkpoints.py").is_file():
            continue
        run = subprocess.run([str(venv / "bin" / script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "usage:" in run.stdout, (script, run.stderr[-2000:])
