"""VGG feature extractor for perceptual (content) and Gram-matrix (style) losses.

The network is always *loaded*, never downloaded here: :func:`load_vgg` takes weights in
torchvision's key layout (``features.<index>.weight`` / ``.bias`` of ``vgg16().features`` or
``vgg19().features``; classifier keys are ignored) from a safetensors file, a local
``.pth``/``.pt`` state dict (read with ``weights_only=True``), or a Hub repo (safetensors only).
A file may hold only the first layers (``../shared/weights/vgg19_normalised_relu3_1.safetensors``
stops at conv3_1): the module is built as deep as the weights go, and asking for a deeper
layer is an error that names the deepest one available.

Input: ``(N, 3, H, W)`` RGB in ``[-1, 1]``; it is mapped to ``[0, 1]`` and normalised with the
ImageNet mean and std, exactly as torchvision's VGG expects.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# torchvision's configurations: channels per conv, "M" for max-pooling
_CFGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KEY_RE = re.compile(r"^(?:features\.)?(\d+)\.(weight|bias)$")


def layer_indices(arch: str) -> dict[str, int]:
    """``{"relu1_1": 1, "conv1_1": 0, "pool1": 4, ...}``: layer names -> ``features`` indices."""
    if arch not in _CFGS:
        raise ValueError(f"arch must be one of {sorted(_CFGS)}, got {arch!r}")
    names: dict[str, int] = {}
    index, block, n = 0, 1, 1
    for v in _CFGS[arch]:
        if v == "M":
            names[f"pool{block}"] = index
            index, block, n = index + 1, block + 1, 1
        else:
            names[f"conv{block}_{n}"] = index
            names[f"relu{block}_{n}"] = index + 1
            index, n = index + 2, n + 1
    return names


class VGGFeatures(nn.Module):
    """The first ``depth`` modules of torchvision's ``vgg16/19().features``, frozen.

    Args:
        arch: ``"vgg16"`` or ``"vgg19"``.
        depth: number of ``features`` modules to build (the deepest layer used + 1).
    """

    def __init__(self, *, arch: str = "vgg19", depth: int = 12):
        super().__init__()
        self.arch = arch
        self.names = layer_indices(arch)
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFGS[arch]:
            if len(layers) >= depth:
                break
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers[:depth])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @property
    def available(self) -> list[str]:
        """Layer names this module can return (those within its depth)."""
        return [name for name, i in self.names.items() if i < len(self.features)]

    def train(self, mode: bool = True):  # always in eval mode: it is a fixed loss network
        return super().train(False)

    def forward(self, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        # (N, 3, H, W) in [-1, 1] -> {layer name: (N, C, h, w) activations}
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor in [-1, 1], got shape {tuple(x.shape)}")
        wanted = {}
        for name in layers:
            i = self.names.get(name)
            if i is None:
                raise ValueError(f"unknown VGG layer {name!r}; {self.arch} has e.g. relu1_2, relu2_2, relu3_1")
            if i >= len(self.features):
                raise ValueError(
                    f"VGG layer {name!r} is deeper than these weights go (deepest: {self.available[-1]})"
                )
            wanted[i] = name
        h = ((x + 1) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        last = max(wanted)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in wanted:
                out[wanted[i]] = h
            if i == last:
                break
        return out


def _read_state(source: str | Path, *, filename: str | None, revision: str | None) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            return load_file(str(path)), str(path)
        if path.suffix in (".pth", ".pt", ".bin"):
            # A local file the user chose; weights_only refuses anything but tensors.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{path} does not hold a state dict")
            return state, str(path)
        raise ValueError(f"VGG weights must be .safetensors (or a local .pth state dict), got {path}")
    looks_like_repo = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(source)) and path.suffix not in (
        ".safetensors", ".pth", ".pt", ".bin"
    )
    if path.exists() or not looks_like_repo:
        raise FileNotFoundError(f"VGG weights not found: {source} (give a .safetensors file or an owner/name Hub repo)")
    # A Hub repo: safetensors only (nothing from the network is unpickled).
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:  # huggingface_hub >= 2 talks through httpx2, 1.x through httpx
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        from httpx import TransportError

    hint = "Offline, pass a local .safetensors file (e.g. ../shared/weights/vgg19_normalised_relu3_1.safetensors)."
    try:
        # one request with a timeout (no retries): which commit, which files
        info = HfApi().model_info(str(source), revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (TransportError, OfflineModeIsEnabled) as exc:
        if filename is None:
            raise FileNotFoundError(f"the Hub is not reachable for {source} ({exc.__class__.__name__}). {hint}") from None
        try:  # unreachable: a copy downloaded earlier still serves
            local = hf_hub_download(str(source), filename, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(f"the Hub is not reachable for {source} and {filename} is not cached. {hint}") from None
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"could not get VGG weights from the Hub repo {source}: {exc}") from None
    else:
        files = [s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
        if filename is None:
            if len(files) != 1:
                raise ValueError(f"Hub repo {source} has {len(files)} .safetensors files {files}: pass filename=")
            filename = files[0]
        if not filename.endswith(".safetensors"):
            raise ValueError(f"only .safetensors weights are loaded from the Hub, got {filename}")
        local = hf_hub_download(str(source), filename, revision=revision)
    return load_file(local), f"{source}/{filename}"


def load_vgg(
    source: str | Path,
    *,
    arch: str = "auto",
    filename: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> VGGFeatures:
    """Load torchvision-layout VGG16/VGG19 feature weights (possibly truncated) into :class:`VGGFeatures`.

    ``arch="auto"`` tells VGG16 from VGG19 by the convolution indices present (they differ from
    conv3_4 on); weights that stop before that are the same for both and load as VGG19.
    """
    raw, where = _read_state(source, filename=filename, revision=revision)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if key.startswith("classifier."):
            continue
        m = _KEY_RE.match(key)
        if not m:
            raise ValueError(f"{where}: unexpected key {key!r} (expected torchvision's features.<i>.weight layout)")
        state.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not state:
        raise ValueError(f"{where}: no VGG feature weights found")
    convs = sorted(state)
    if arch == "auto":
        arch = "vgg16" if 17 in state and 16 not in state else "vgg19"
    conv_indices = {i for name, i in layer_indices(arch).items() if name.startswith("conv")}
    bad = [i for i in convs if i not in conv_indices]
    missing = [i for i in conv_indices if i < convs[-1] and i not in state]
    if bad or missing:
        raise ValueError(f"{where}: indices {bad or missing} do not match {arch}'s convolutions")
    net = VGGFeatures(arch=arch, depth=convs[-1] + 2)  # up to the ReLU after the last conv
    sd = {}
    for i, params in state.items():
        if set(params) != {"weight", "bias"}:
            raise ValueError(f"{where}: layer features.{i} needs weight and bias, got {sorted(params)}")
        for k, v in params.items():
            sd[f"features.{i}.{k}"] = v.float()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: weights do not fit {arch}: {exc}") from None
    return net.to(device)


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` features -> ``(N, C, C)`` Gram matrices normalised by ``C * H * W``."""
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w).float()
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)
