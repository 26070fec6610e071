"""`python -m models.artifact_check DIR`: loads an artifact as Serve does (fresh process, INT8 compiled and checked)
and prints one JSON line: scheme, input shape, classes, predictions of the probe. Exit status 1 and the reason on
stderr when it cannot be loaded."""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m models.artifact_check ARTIFACT_DIR", file=sys.stderr)
        return 2
    from models.artifact import ArtifactError, load_artifact

    try:
        model, manifest = load_artifact(args[0])
    except ArtifactError as e:
        print(f"ArtifactError: {e}", file=sys.stderr)
        return 1
    summary = {
        "path": args[0],
        "scheme": manifest["quantization"]["scheme"],
        "input_shape": manifest["input_shape"],
        "num_classes": manifest["num_classes"],
        "compiled": bool(getattr(model, "compiled", False)),
        # the fp32 form the sweep timed for it, which replicas on a matching machine run (serve_app.form_choice)
        "inference_form": (manifest.get("inference_form") or {}).get("form"),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
