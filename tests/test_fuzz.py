"""Property-based attacks: random YAML and random byte corruption must end in a clean error
(SpecError / DataError), never another exception or a hang."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_clt.data.store import ActivationStore, StoreWriter
from sae_clt.errors import DataError, SpecError
from sae_clt.spec.models import load_spec

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(["id", "dataset", "source", "target", "model", "train", "evaluate", "export", "k", "lr", "architecture"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(keys, yaml_values, max_size=8))
def test_random_spec_documents_give_spec_errors_only(tmp_path, doc):
    import yaml

    path = tmp_path / "specs" / "fuzz.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    try:
        load_spec(path, "experiments")
    except SpecError as exc:
        assert "fuzz.yaml" in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_text_as_spec_gives_spec_errors_only(tmp_path, text):
    path = tmp_path / "specs" / "fuzz.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    with pytest.raises(SpecError):
        spec = load_spec(path, "experiments")
        raise AssertionError(f"accepted {spec}")  # random text is never a complete experiment


@pytest.fixture(scope="module")
def store_bytes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    writer = StoreWriter(folder, {"h": 8}, "float32", {"n_instances": 40})
    prov = {"instance_id": torch.arange(40), "position": torch.zeros(40, dtype=torch.int32)}
    writer.write_shard({"h": torch.randn(40, 8)}, prov, torch.arange(40))
    writer.finish()
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_of_a_store_gives_data_errors_only(tmp_path, store_bytes, data):
    name = data.draw(st.sampled_from(sorted(store_bytes)))
    blob = bytearray(store_bytes[name])
    mode = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif mode == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob = bytearray(data.draw(st.binary(max_size=300)))
    if bytes(blob) == store_bytes[name]:
        return  # the flips cancelled out: nothing to detect
    for fname, content in store_bytes.items():
        (tmp_path / fname).write_bytes(bytes(blob) if fname == name else content)
    try:
        store = ActivationStore.open(tmp_path)
        store.verify()
        store.read_shard(0, ["h", "instance_id"])
    except DataError:
        return
    # Undetected only if the corruption left the bytes that matter intact (e.g. JSON whitespace).
    assert name == "manifest.json"
