"""lmms-eval plugin: ``lmms-eval --model mitigate --model_args pretrained=<id>,method=var[,param=value...]``.

Registered through the ``lmms_eval.models`` entry point (pyproject.toml), which lmms-eval's model registry
reads at import. This module stays light (lmms-eval imports it while building its registry); the model
class is in :mod:`.model`.
"""

from __future__ import annotations

MODEL_ID = "mitigate"
CLASS_PATH = "mitigate.integrations.lmms_eval.model.MitigatedLMM"


def manifest():
    """The entry point's payload: lmms-eval's ``ModelManifest`` for the ``mitigate`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
