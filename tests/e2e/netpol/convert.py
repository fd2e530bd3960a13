#!/usr/bin/env python3
"""Builds cases.json (the input of tests/e2e/tests/netpol.rs) from the
catalogue of the upstream Kubernetes NetworkPolicy e2e cases
(netpol-cases.json, kubernetes v1.34.4 test/e2e/network/netpol).

Usage: convert.py CATALOGUE.json > cases.json

Per case it keeps what the suite runs: the served ports, the ordered steps
(policies as objects with ${NS_X}-style placeholders that the runner fills
in, label changes, probes with the expected denied pairs) and the name of
the Rust test function. Self pairs are not listed: upstream ignores them.
"""
import json
import re
import sys

PREFIX = {"TCP": "", "UDP": "udp_", "SCTP": "sctp_"}


def snake(name):
    """'allow traffic ... NamespaceSelector' -> 'allow_traffic_..._namespace_selector'."""
    name = name.replace("'", "")
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def context(case):
    base = case["namespace_base"]
    if base.startswith("udp"):
        return "UDP"
    if base.startswith("sctp"):
        return "SCTP"
    return "TCP"


def step(raw):
    action = raw["action"]
    if action in ("create", "update"):
        return {action: raw["policy"]}
    if action == "probe":
        assert raw["target"] == "service-clusterip", raw
        return {
            "probe": {
                "port": raw["port"],
                "protocol": raw["protocol"],
                "denied": sorted(raw["denied"]),
            }
        }
    if action == "label_namespace":
        return {"label_namespace": {"namespace": raw["namespace"], "labels": raw["add_labels"]}}
    if action == "label_pod":
        return {"label_pod": {"pod": raw["pod"], "labels": raw["add_labels"]}}
    if action == "delete_all_policies":
        return {"delete_all_policies": {}}
    if action == "sleep":
        return {"sleep_seconds": raw["seconds"]}
    raise ValueError(f"unknown action {action}")


def main():
    catalogue = json.load(open(sys.argv[1]))
    cases = []
    for raw in catalogue["cases"]:
        ctx = context(raw)
        protocols = raw["protocols"]
        served = [f"{p}/{proto}" for proto in protocols for p in raw["ports"]]
        cases.append(
            {
                "id": raw["id"],
                "context": ctx,
                "name": raw["name"],
                "test": PREFIX[ctx] + snake(raw["name"]),
                "served": served,
                "features": raw["features"],
                "steps": [step(s) for s in raw["steps"]],
            }
        )
    tests = [c["test"] for c in cases]
    assert len(set(tests)) == len(tests), "test names collide"
    out = {
        "source": catalogue["source"],
        "namespaces": {"NS_X": "x", "NS_Y": "y", "NS_Z": "z"},
        "pods": catalogue["pods"],
        "cases": cases,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
