import pytest

from loadtests.cli import main
from loadtests.config import load_settings
from serving.config import SettingsError


def test_scenario_then_env_then_flags(tmp_path, monkeypatch):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(
        "url: http://gpu-box:8000\nsweep-rate: '1,2,4'\nduration: 30\nimages: 'choice:0=0.5,1=0.5'\n"
        "image_mode: repeated\nkey: ['clinic=sk-a@3', 'research=sk-b']\n"
    )
    monkeypatch.setenv("MEDGEMMA_LOADTEST_DURATION", "20")
    settings = load_settings({"warmup": 2.0}, scenario)
    assert settings.url == "http://gpu-box:8000" and settings.duration == 20 and settings.warmup == 2.0
    stages = settings.stages()
    assert [s.rate for s in stages] == [1.0, 2.0, 4.0] and all(s.duration_s == 20 for s in stages)
    spec = settings.workload_spec()
    assert [k.label for k in spec.keys] == ["clinic", "research"] and spec.image_mode == "repeated"
    assert settings.slo_s() == {"ttft": 2.0, "tpot": 0.2}


@pytest.mark.parametrize(
    "flags, message",
    [({}, "exactly one of"), ({"concurrency": 2, "rate": 1.0}, "exactly one of"),
     ({"concurrency": 2, "images": "poisson:3"}, "cannot parse|expected"),
     ({"concurrency": 2, "image_format": "gif"}, "image formats"),
     ({"rate": 1.0, "duration": 5, "warmup": 3, "cooldown": 3}, "warm-up plus cool-down"),
     ({"concurrency": 2, "ramp_to": 4.0}, "--ramp-to needs --rate")],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_request(flags, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(flags)


def test_cli_exits_2_on_refused_settings(capsys):
    assert main(["run", "--concurrency", "2", "--rate", "3"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["ab", "--concurrency", "2"]) == 2
    assert "--url-b" in capsys.readouterr().err
