"""Independent C2PA reader for the provenance tests: the official c2pa-python package (the C2PA
reference SDK's Python binding), not the gateway's code.

    python c2pa_read.py IMAGE [TRUST_ANCHORS_PEM]

Prints one JSON object: validation_state (Invalid, Valid or Trusted), failure codes of the
active manifest, the first action with a digital source type, the gateway's com.acc.trace
assertion, the signer, the parent ingredient (with its own manifest label) when there is
one, and the inputTo ingredients (an edit's input images) in order. An image without a
manifest prints {"manifest": false}.
"""
import json
import sys

import c2pa

MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}


def main() -> int:
    path = sys.argv[1]
    anchors = open(sys.argv[2]).read() if len(sys.argv) > 2 else None
    data = open(path, "rb").read()
    mime = next((m for sig, m in MIME.items() if data.startswith(sig)), None)
    if mime is None:
        print(json.dumps({"error": "not PNG, JPEG or WebP"}))
        return 2
    config = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if anchors:
        config["trust"] = {"trust_anchors": anchors}
    context = c2pa.Context(c2pa.Settings.from_dict(config))
    try:
        with open(path, "rb") as f, c2pa.Reader(mime, f, context=context) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "JumbfNotFound" in str(e) or "no JUMBF" in str(e):
            print(json.dumps({"manifest": False, "error": str(e)}))
            return 0
        print(json.dumps({"manifest": True, "validation_state": "Invalid", "error": str(e), "failures": []}))
        return 0
    label = store.get("active_manifest")
    manifest = store.get("manifests", {}).get(label, {})
    results = store.get("validation_results", {}).get("activeManifest", {})
    failures = [s.get("code") for s in results.get("failure", [])]
    if not results:
        failures = [s.get("code") for s in store.get("validation_status", [])]
    out = {
        "manifest": True,
        "label": label,
        "validation_state": store.get("validation_state"),
        "failures": failures,
        "success": [s.get("code") for s in results.get("success", [])],
        "signer": manifest.get("signature_info", {}),
        "claim_generator": manifest.get("claim_generator_info", []),
    }
    for a in manifest.get("assertions", []):
        if a.get("label", "").startswith("c2pa.actions"):
            acts = a.get("data", {}).get("actions", [])
            out["actions"] = [x.get("action") for x in acts]
            with_dst = [x for x in acts if x.get("digitalSourceType")]
            out["digital_source_type"] = with_dst[0]["digitalSourceType"] if with_dst else None
        if a.get("label") == "com.acc.trace":
            out["trace"] = a.get("data")
    parents = [i for i in manifest.get("ingredients", []) if i.get("relationship") == "parentOf"]
    if parents:
        parent_label = parents[0].get("active_manifest")
        out["parent"] = {"title": parents[0].get("title"), "active_manifest": parent_label,
                         "in_store": parent_label in store.get("manifests", {})}
    out["inputs"] = [{"title": i.get("title"), "active_manifest": i.get("active_manifest"),
                      "in_store": i.get("active_manifest") in store.get("manifests", {})}
                     for i in manifest.get("ingredients", []) if i.get("relationship") == "inputTo"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
