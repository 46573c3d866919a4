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


def test_every_change_a_reload_sees_is_an_audit_record_however_the_file_was_edited(tmp_path):
    import json
    from pathlib import Path

    import jsonschema
    import yaml

    from serving.admission import keyadmin
    from serving.admission.keys import KeyStore, hash_key

    schema = json.loads((Path(__file__).parents[3] / "serving/usage/usage-record.schema.json").read_text())
    path = tmp_path / "keys.yaml"
    path.write_text("plans: {two: {concurrency: 2}, four: {concurrency: 4}}\n")
    first = add_key(path, "acme", "two")
    second = add_key(path, "beta", "two")
    holder, metrics, audit = Holder(), ServingMetrics(CollectorRegistry()), []
    holder.keys = KeyStore.load(path)
    reloader = KeyReloader(path, holder, metrics, audit=audit.append, replica="pod-a:1")

    keyadmin.revoke_key(path, hash_key(first)[:12])
    new = keyadmin.rotate_key(path, "beta", grace_s=3600)
    keyadmin.suspend_account(path, "acme")
    data = yaml.safe_load(path.read_text())  # a hand edit: beta moves to another plan
    data["accounts"]["beta"]["plan"] = "four"
    path.write_text(yaml.safe_dump(data))
    assert reloader.check()

    seen = sorted((r["action"], r["account"], r["key_id"]) for r in audit)
    assert seen == sorted([
        ("revoked", "acme", hash_key(first)[:12]),
        ("added", "beta", hash_key(new)[:12]),
        ("expiry_set", "beta", hash_key(second)[:12]),
        ("account_suspended", "acme", None),
        ("account_plan_changed", "beta", None),
    ])  # fmt: skip
    for record in audit:
        assert record["source"] == "reload" and record["replica"] == "pod-a:1"
        jsonschema.Draft202012Validator(schema).validate(record)
        assert all(secret not in json.dumps(record) for secret in (first, new, hash_key(first), hash_key(new)))
    audit.clear()
    assert reloader.reload() and audit == []  # a reload that changed nothing records nothing
