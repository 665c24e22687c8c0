"""The per-client decode budget (app/budget.py; reliability 32): fast, no server."""

from __future__ import annotations

import pytest

from app.budget import DecodeBudget, OverBudget, client_key


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_client_over_its_budget_is_refused_until_it_refills_others_are_not():
    clock = Clock()
    b = DecodeBudget(seconds=6, window=60, clock=clock)
    for _ in range(3):                       # three 2-second files
        b.check("attacker")
        b.charge("attacker", 2.0)
    with pytest.raises(OverBudget) as e:
        b.check("attacker")
    assert 1 <= e.value.retry_after <= 3 and "try again" in str(e.value)
    for _ in range(100):                     # a person's films: 0.05 s each, never refused
        b.check("person")
        b.charge("person", 0.05)
        clock.now += 1
    b.check("attacker")                      # 100 s later: refilled
    assert b.refused == 1


def test_spend_charges_the_pools_time_not_the_wait(monkeypatch):
    from app import budget as budget_module

    b = DecodeBudget(seconds=1, window=60, clock=Clock())
    monkeypatch.setattr(budget_module, "last_decode_seconds", lambda reset=False: 0.0 if reset else 1.5)
    with b.spend("c"):
        pass
    with pytest.raises(OverBudget):
        b.check("c")
    with pytest.raises(ValueError):          # a decode that fails is charged too
        with b.spend("d"):
            raise ValueError("bad file")
    with pytest.raises(OverBudget):
        b.check("d")


def test_real_decodes_are_charged_their_worker_time():
    from cxr.imaging import DecodePool, load_image
    from tests.helpers import make_xray
    import io

    buf = io.BytesIO()
    make_xray(1, True, size=128).save(buf, "PNG")
    pool = DecodePool(1).start()
    b = DecodeBudget(seconds=5, window=60)
    assert b.left("c") == 5                  # a client not seen yet: the whole budget
    try:
        with b.spend("c"):
            load_image(buf.getvalue(), isolate=pool)
        left = b.left("c")
        assert 0 < 5 - left < 2              # charged what the worker took (well under a second)
    finally:
        pool.close()


def test_client_key(monkeypatch):
    class R:
        headers = {"x-forwarded-for": "203.0.113.9, 10.0.0.1"}

        class client:
            host = "10.1.2.3"
    assert client_key(R()) == "10.1.2.3" and client_key(None) == "local"     # the header is not trusted...
    monkeypatch.setenv("CXR_TRUST_FORWARDED", "1")
    assert client_key(R()) == "203.0.113.9"                                 # ...unless a proxy is declared


def _slow_jpeg() -> bytes:
    """Within every structural limit (6000 x 6000, 56 scans) but seconds of decoding: the worker
    is stopped at its 2-second limit (as in tests/test_imaging.py)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    marks = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"] + [len(data) - 2]
    sizes = {i: marks[i + 1] - marks[i] for i in range(1, len(marks) - 1)}
    smallest = min(sizes, key=sizes.get)
    return data[:-2] + data[marks[smallest]:marks[smallest + 1]] * 55 + data[-2:]


@pytest.mark.slow
def test_a_client_sending_slow_files_is_held_to_its_share_others_are_served(tmp_path, monkeypatch, request):
    """Reliability 32: after its budget, a client's slow files are refused without using a worker,
    while another client's film is still answered at once."""
    import time

    import gradio as gr

    from app import budget as budget_module
    from app import files, handlers
    from cxr.inference import Predictor
    from tests.helpers import make_model_folder, make_xray

    from cxr.imaging import DecodePool, sandbox

    # a pool whose time limit the slow file always meets (as in test_imaging), and a budget of
    # 1.5 such files: the third slow file is refused without a worker
    pool = DecodePool(1, timeout_s=0.5).start()
    request.addfinalizer(pool.close)
    monkeypatch.setattr(sandbox, "_POOL", pool)
    monkeypatch.setattr(budget_module, "_BUDGET", DecodeBudget(seconds=0.8, window=600))
    predictor = Predictor.from_pretrained(make_model_folder(tmp_path / "m", p_positive=0.7, ood=False),
                                          precision="fp32")
    jan = files.janitor()
    slow = _slow_jpeg()

    def upload(content: bytes, name: str) -> str:
        folder = jan.root / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(content)
        jan.register_upload([str(path)])
        return str(path)

    for i in range(2):                                      # 2 x 0.5 s of worker time: the budget is spent
        with pytest.raises(gr.Error, match="too long"):
            handlers.api_predict({"path": upload(slow, f"slow{i}.jpeg")}, False, predictors=[predictor],
                                 client="10.0.0.66")
    t0 = time.perf_counter()
    with pytest.raises(gr.Error, match="share of image decoding"):
        handlers.api_predict({"path": upload(slow, "slow3.jpeg")}, False, predictors=[predictor], client="10.0.0.66")
    assert time.perf_counter() - t0 < 0.5                   # refused before any worker was used
    import io
    buf = io.BytesIO()
    make_xray(2, True, size=128).save(buf, "PNG")
    t0 = time.perf_counter()
    out = handlers.api_predict({"path": upload(buf.getvalue(), "person.png")}, False, predictors=[predictor],
                               client="10.0.0.7")
    assert out["decision"] in ("NORMAL", "PNEUMONIA") and time.perf_counter() - t0 < 5
