"""The CRD manifests in crds/ are what the pydantic models generate, and they are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conserve.api import crdgen


def test_crds_in_repo_match_the_models() -> None:
    diffs = crdgen.drift()
    assert not diffs, "crds/ is out of date, run `conserve crds generate`:\n" + "".join(diffs)


def test_check_command_fails_on_drift(tmp_path: Path) -> None:
    crdgen.generate(tmp_path)
    assert crdgen.drift(tmp_path) == []
    path = tmp_path / "conserve.dev_conversations.yaml"
    path.write_text(path.read_text().replace("shortNames:\n    - conv", "shortNames:\n    - cv"))
    assert crdgen.drift(tmp_path)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out.extend(_walk(value, f"{path}.{key}"))
        if isinstance(node.get("items"), dict):
            out.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return out


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_schema_is_structural(name: str) -> None:
    crd = crdgen.all_crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert "anyOf" not in node, path
        assert "allOf" not in node, path
        assert "title" not in node, path
        if "properties" in node or "additionalProperties" in node:
            assert node.get("type") == "object", path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path
    status = schema["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert not [p for p, n in _walk(status) if "default" in n]


def test_printer_columns_and_names() -> None:
    conv = crdgen.conversation_crd()["spec"]
    dp = crdgen.decoderpool_crd()["spec"]
    assert conv["names"]["shortNames"] == ["conv"]
    assert dp["names"]["shortNames"] == ["dp"]
    conv_cols = [c["name"] for c in conv["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    dp_cols = [c["name"] for c in dp["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert conv_cols == ["Phase", "Decoder", "Tier", "Reservation", "Turns", "KV", "Age"]
    assert dp_cols == ["Ready", "KV", "Conversations", "Age"]
    assert conv["versions"][0]["subresources"] == {"status": {}}


def test_cel_rules_present() -> None:
    spec = crdgen.conversation_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {p: n["x-kubernetes-validations"][0]["rule"] for p, n in _walk(spec) if "x-kubernetes-validations" in n}
    assert rules[".pool"] == "self == oldSelf"
    assert rules[".usage.turns"] == "self >= oldSelf"
    assert rules[".completed"] == "self || !oldSelf"


def test_rendered_yaml_round_trips() -> None:
    for crd in crdgen.all_crds().values():
        assert yaml.safe_load(crdgen.render(crd)) == crd
