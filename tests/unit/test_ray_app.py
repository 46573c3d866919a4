"""build_app's settings and deployment options, validated before any replica starts."""

import pytest

from serving.config import SettingsError
from serving.ray_app import AppSettings, deployment_options


def test_defaults_are_production_ones():
    settings = AppSettings.from_args({})
    scaling = settings.scaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_utilisation) == (1, 4, 0.75)
    assert scaling.downscale_delay_s > scaling.upscale_delay_s  # add fast, remove slowly
    options = deployment_options(settings)
    assert options["ray_actor_options"]["num_gpus"] == 1.0  # a GPU per replica unless cpu-dev
    policy = options["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "serving.autoscale:CostUnitsPolicy"
    assert policy["policy_kwargs"]["target_utilisation"] == 0.75
    # Ray stops a replica only after our drain had its time.
    assert options["graceful_shutdown_timeout_s"] > settings.serve.drain_timeout_s


def test_cpu_dev_replicas_take_a_cpu_and_report_its_capacity():
    settings = AppSettings.from_args({"serve": {"profile": "cpu-dev"}, "scaling": {"max_replicas": 2}})
    options = deployment_options(settings)
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options["autoscaling_config"]["policy"]["policy_kwargs"]["capacity_units"] == 16.0
    assert options["autoscaling_config"]["max_replicas"] == 2
    # Ray never queues in front of our admission queue.
    assert options["max_ongoing_requests"] >= 16 + settings.serve.queue_size


@pytest.mark.parametrize(
    "args, message",
    [({"scaling": {"min_replicas": 0}}, "allow_scale_to_zero"),
     ({"scaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas 3 > max_replicas 2"),
     ({"scaling": {"target_utilisation": 2}}, "target_utilisation"),
     ({"serve": {"profile": "tpu"}}, "profile"),
     ({"serve": {"queue_size": -1}}, "queue_size"),
     ({"replicas": 2}, "unknown build_app argument")],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_reason(args, message):
    with pytest.raises(SettingsError, match=message):
        AppSettings.from_args(args)


def test_scale_to_zero_is_allowed_when_asked_for():
    settings = AppSettings.from_args({"scaling": {"min_replicas": 0, "allow_scale_to_zero": True}})
    assert deployment_options(settings)["autoscaling_config"]["min_replicas"] == 0
