"""--push_to_hub fails early (before any data is read or any step is trained), pushes only
to namespaces the token can write, and cxr-push checks a folder before uploading."""

import huggingface_hub
import pytest
from huggingface_hub import constants

import train_hf
from cxr_train.hub import PushError, check_model_folder, check_push_access, push_main
from tests.helpers import ID2LABEL, base_args

ME = {"name": "alice", "orgs": [{"name": "lab", "roleInOrg": "read"}, {"name": "team", "roleInOrg": "write"}],
      "auth": {"type": "access_token", "accessToken": {"role": "write"}}}


class FakeApi:
    def __init__(self, answer):
        self.answer = answer

    def whoami(self, token=None):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if train_hf.run gets as far as reading data."""
    def refuse(*a, **k):
        raise AssertionError("data loading started: the push check came too late")
    monkeypatch.setattr(train_hf, "prepare_data", refuse)


def _run(tmp_path, capsys, *extra):
    rc = train_hf.main(base_args(tmp_path / "no-data", tmp_path / "out", "--push_to_hub", "true", *extra))
    return rc, capsys.readouterr().err


def test_offline_push_fails_before_training(tmp_path, capsys, no_training):
    assert constants.is_offline_mode()                     # HF_HUB_OFFLINE=1 (conftest)
    rc, err = _run(tmp_path, capsys, "--hub_model_id", "someone/cxr-test")
    assert rc == 2 and "offline mode is on (HF_HUB_OFFLINE=1)" in err and "cxr-push" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_push_without_token_fails_before_training(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc, err = _run(tmp_path, capsys, "--hub_model_id", "someone/cxr-test")
    assert rc == 2 and "needs a Hugging Face token" in err and "hf auth login" in err
    assert err.count("error:") == 1


def test_push_without_repo_id_is_a_config_error(tmp_path, capsys, no_training):
    rc, err = _run(tmp_path, capsys)
    assert rc == 2 and "hub_model_id" in err


@pytest.mark.parametrize("repo_id,expected", [("alice/m", "alice/m"), ("team/m", "team/m"), ("m", "alice/m")])
def test_writable_namespaces(monkeypatch, repo_id, expected):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert check_push_access(repo_id, token="hf_x", api=FakeApi(ME)) == expected


@pytest.mark.parametrize("repo_id", ["bob/m", "lab/m", "cxr-transfer/m"])
def test_namespace_the_token_cannot_write_is_refused(monkeypatch, repo_id):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PushError, match=f"cannot write to the namespace '{repo_id.split('/')[0]}'") as e:
        check_push_access(repo_id, token="hf_x", api=FakeApi(ME))
    assert "alice, team" in str(e.value) and "\n" not in str(e.value)


def test_read_only_and_fine_grained_tokens(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    read = dict(ME, auth={"accessToken": {"role": "read"}})
    with pytest.raises(PushError, match="read-only"):
        check_push_access("alice/m", token="hf_x", api=FakeApi(read))
    fine = dict(ME, auth={"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read", "repo.write"]},
        {"entity": {"type": "org", "name": "team"}, "permissions": ["repo.content.read"]}]}}})
    assert check_push_access("alice/m", token="hf_x", api=FakeApi(fine)) == "alice/m"
    with pytest.raises(PushError, match="read-only for 'team'"):
        check_push_access("team/m", token="hf_x", api=FakeApi(fine))


def test_bad_token_or_network_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PushError, match="cannot check the Hub token .*ConnectionError") as e:
        check_push_access("alice/m", token="hf_x", api=FakeApi(ConnectionError("Name or service not known")))
    assert e.value.__cause__ is None and "\n" not in str(e.value)
    with pytest.raises(PushError, match="not a valid Hub repo id"):
        check_push_access("alice/bad name!", token="hf_x", api=FakeApi(ME))


def test_cxr_push_checks_the_folder_first(tmp_path, capsys):
    from cxr_train.modeling import build_preset, save_model_folder

    assert push_main(["--folder", str(tmp_path / "missing"), "--repo_id", "alice/m"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    model, proc = build_preset("tiny-resnet-scratch", ID2LABEL)
    save_model_folder(model, proc, tmp_path / "m")
    with pytest.raises(PushError, match="missing README.md"):
        check_model_folder(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("card")
    assert check_model_folder(tmp_path / "m") == tmp_path / "m"
    assert push_main(["--folder", str(tmp_path / "m"), "--repo_id", "alice/m"]) == 2   # offline (conftest)
    err = capsys.readouterr().err
    assert "offline mode is on" in err and err.count("error:") == 1
