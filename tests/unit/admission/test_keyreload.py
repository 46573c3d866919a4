"""Keys file reload: a good file swaps the keys; a bad one keeps them and says why."""

import asyncio
import logging
import os

from prometheus_client import CollectorRegistry

from serving.admission.keyreload import KeyReloader
from serving.admission.keyadmin import add_key
from serving.metrics import ServingMetrics


class Holder:
    keys = None


def reloads(metrics, result):
    return metrics.registry.get_sample_value("medgemma_keys_reloads_total", {"result": result}) or 0


def test_reload_swaps_keys_and_a_malformed_file_keeps_the_old_ones(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    path.write_text("plans: {two: {concurrency: 2}}\n")
    first = add_key(path, "acme", "two")
    holder, metrics = Holder(), ServingMetrics(CollectorRegistry())
    reloader = KeyReloader(path, holder, metrics)
    assert reloader.reload() and holder.keys.authenticate(first).name == "acme"

    second = add_key(path, "beta", "two")
    assert reloader.check()  # the file changed (atomic replace): picked up without a signal
    assert holder.keys.authenticate(second).name == "beta"
    assert not reloader.check()  # unchanged since

    good = holder.keys
    path.write_text(path.read_text().replace("concurrency: 2", "concurrency: many"))
    with caplog.at_level(logging.WARNING, logger="serving.admission.keyreload"):
        assert not reloader.check()
    assert holder.keys is good and holder.keys.authenticate(first).name == "acme"
    assert "keeping the previous keys" in caplog.text and "plans.two.concurrency" in caplog.text
    assert first not in caplog.text and second not in caplog.text
    assert reloads(metrics, "ok") == 2 and reloads(metrics, "error") == 1

    os.remove(path)
    assert not reloader.reload()  # a missing file: old keys stay
    assert holder.keys is good


def test_the_watch_survives_every_malformed_shape_and_picks_up_the_next_good_file(tmp_path, caplog):
    from tests.unit.admission.test_keys import MALFORMED

    path = tmp_path / "keys.yaml"
    path.write_text("plans: {two: {concurrency: 2}}\n")
    first = add_key(path, "acme", "two")
    good = path.read_text()
    holder, metrics = Holder(), ServingMetrics(CollectorRegistry())
    reloader = KeyReloader(path, holder, metrics)
    assert reloader.reload()
    kept = holder.keys

    async def scenario():
        watch = asyncio.ensure_future(reloader.watch(interval_s=0.005))
        for i, (text, _) in enumerate(MALFORMED, start=1):
            path.write_text(text + "\n" + "#" * i)  # a new size: the poll sees every change
            for _ in range(400):
                await asyncio.sleep(0.005)
                if reloads(metrics, "error") == i:
                    break
            assert reloads(metrics, "error") == i, text
            assert not watch.done(), (text, watch.exception() if watch.done() else None)
            assert holder.keys is kept
        path.write_text(good)
        for _ in range(400):
            await asyncio.sleep(0.005)
            if holder.keys is not kept:
                break
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="serving.admission.keyreload"):
        asyncio.run(scenario())
    assert holder.keys is not kept and holder.keys.authenticate(first).name == "acme"
    assert caplog.text.count("keeping the previous keys") == len(MALFORMED)
    assert first not in caplog.text
